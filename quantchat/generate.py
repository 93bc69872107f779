"""The command line: flags (parsed by fire, as in h2oGPT) -> Settings -> LoadPlan -> model -> engine -> front end."""
from __future__ import annotations

import os
import sys
from typing import Any

from .errors import UsageError, UserError
from .settings import Settings, from_flags, help_text


def parse_flags(argv: list[str]) -> dict[str, Any]:
    """fire's value parsing (so h2oGPT command lines mean the same), our own names and errors."""
    import fire
    from fire.core import FireExit

    captured: dict[str, Any] = {}

    def take(**flags):
        captured.update(flags)

    stderr, sys.stderr = sys.stderr, open(os.devnull, "w")  # fire's own usage screens; we print one line
    try:
        fire.Fire(take, command=list(argv), name="generate.py")
    except FireExit:
        raise UsageError(f"cannot parse the command line {' '.join(argv)!r}: write flags as --name=value "
                         "(python generate.py --help lists them)") from None
    finally:
        sys.stderr.close()
        sys.stderr = stderr
    return captured


def build_engine(s: Settings, model):
    from .engine import ChatEngine, Limits
    from .loaders.base import GenParams
    from .prompter import FORMATS, Prompter, make_prompter, system_prompt_for

    info = model.info
    if getattr(model, "takes_messages", False):  # a chat API: the server formats the conversation
        prompter = Prompter("the server's chat template", FORMATS["plain"], system_prompt_for(s.system_prompt, ""))
    else:
        prompter = make_prompter(s.prompt_type, s.prompt_dict, s.chat_template, s.system_prompt, info.chat_template,
                                 info.bos_token, info.eos_token)
    if prompter.warning:
        print(f"warning: {prompter.warning}", file=sys.stderr)
    given = {"max_new_tokens": s.max_new_tokens, "min_new_tokens": s.min_new_tokens, "max_time": s.max_time,
             "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "num_beams": s.num_beams,
             "repetition_penalty": s.repetition_penalty, "do_sample": s.do_sample, "seed": s.seed}
    defaults = GenParams(**{k: v for k, v in given.items() if v is not None})
    limits = Limits(info.context_length)
    if s.max_max_new_tokens:
        limits.max_max_new_tokens = s.max_max_new_tokens
    if s.max_max_time:
        limits.max_max_time = s.max_max_time
    if defaults.max_new_tokens > limits.max_max_new_tokens:
        print(f"note: max_new_tokens {defaults.max_new_tokens} capped at max_max_new_tokens "
              f"{limits.max_max_new_tokens}", file=sys.stderr)
        defaults.max_new_tokens = limits.max_max_new_tokens
    scorer = None
    if s.score_model:
        from .scoring import RewardScorer
        scorer = RewardScorer(s.score_model, s.gpu_id)
    engine = ChatEngine(model, prompter, defaults, limits, verbose=s.verbose,
                        log=lambda text: print(text, file=sys.stderr), save_dir=s.save_dir, scorer=scorer)
    if s.top_k_docs is not None:
        engine.top_k_docs = s.top_k_docs
    engine.params()  # validate the defaults once, now, rather than at the first message
    return engine


def start_api(s: Settings):
    """The OpenAI-compatible API starts before the model loads, so /health can say 503 meanwhile."""
    from .api import OpenAIServer, read_api_keys, serve
    from .webui import LOOPBACK
    keys = read_api_keys(s.openai_api_key)
    host = s.server_name
    if host not in LOOPBACK and not keys:
        print(f"warning: no --openai_api_key: the API listens on 127.0.0.1 only, not on {host}", file=sys.stderr)
        host = "127.0.0.1"
    api = OpenAIServer(keys)
    thread = serve(api, host, s.openai_port)
    print(f"OpenAI-compatible API on http://{host}:{s.openai_port}/v1", file=sys.stderr)
    return api, thread


def describe_documents(s: Settings) -> str:
    from .documents.store import DEFAULT_EMBEDDING_MODEL
    from .engine import DEFAULT_TOP_K_DOCS
    embeddings = s.hf_embedding_model or DEFAULT_EMBEDDING_MODEL
    folder = f" from {s.user_path}" if s.user_path else ""
    k = "as many as fit" if s.top_k_docs == -1 else s.top_k_docs or DEFAULT_TOP_K_DOCS
    return (f"documents: {s.langchain_mode}{folder}, database {s.persist_directory}, embeddings {embeddings}, "
            f"{s.chunk_size}-character passages, {k} per question")


def documents_wanted(s: Settings) -> bool:
    return s.langchain_mode != "LLM" or bool(s.user_path)


def documents_for(s: Settings):
    """Documents Q&A: the collections, UserData brought up to date with --user_path; None for plain chat."""
    if not documents_wanted(s):
        return None
    from .documents.library import open_library
    return open_library(s.langchain_mode, s.user_path, s.persist_directory, s.hf_embedding_model, s.chunk_size)


def model_settings(s: Settings, flags: dict[str, Any]) -> list[Settings]:
    """One Settings per model: the command line's, or with --model_lock each entry's flags over the command line's."""
    if not s.model_lock:
        return [s]
    common = {k: v for k, v in flags.items() if k != "model_lock"}
    return [from_flags({**common, **entry}) for entry in s.model_lock]


def run(s: Settings, flags: dict[str, Any] | None = None) -> int:
    from . import loaders

    each = model_settings(s, flags or {})
    plans = [loaders.plan(one) for one in each]
    for i, plan in enumerate(plans):
        heading = f"model {i + 1} of {len(plans)}, " if len(plans) > 1 else ""
        print(heading + plan.describe(), file=sys.stdout if s.dry_run else sys.stderr)
    if documents_wanted(s):
        print(describe_documents(s), file=sys.stdout if s.dry_run else sys.stderr)
    if s.dry_run:
        return 0
    for note in (note for plan in plans for note in plan.notes):
        print(f"note: {note}", file=sys.stderr)
    api, api_thread = start_api(s) if s.openai_server else (None, None)
    library = documents_for(s)
    models = []
    try:
        for plan in plans:
            models.append(loaders.load(plan))
        engines = [build_engine(one, model) for one, model in zip(each, models, strict=True)]
        engine = engines[0]
        for one in engines:
            print(f"prompt format: {one.prompter.source}", file=sys.stderr)
        if len(engines) > 1 and (api or s.cli):
            print("note: with --model_lock the terminal chat and the API use the first model", file=sys.stderr)
        if api:
            api.ready(engine, library)
        if s.cli:
            from .terminal import run_terminal
            run_terminal(engine, s.stream_output, library=library)
        elif s.gradio:
            from .webui import WebUI
            port = s.server_port or int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
            WebUI(engines, s.system_prompt, h2ocolors=s.h2ocolors, library=library).launch(
                s.server_name, port, s.share, s.auth)
        elif api_thread:
            api_thread.join()  # --gradio=False: serve the API only, until Ctrl-C
    finally:
        for model in models:
            model.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(help_text())
        return 0
    try:
        flags = parse_flags(argv)
        return run(from_flags(flags), flags)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 130
