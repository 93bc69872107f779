"""Assemble what the front ends share from the settings and a loaded model: the chat engine (prompt format,
generation defaults and limits, reward scoring, saving) and the documents library. The command line, the benchmarks
and the tests build engines here."""
from __future__ import annotations

import sys

from .errors import UserError
from .settings import Settings


def check_engine_flags(s: Settings) -> None:
    """What build_engine would refuse, said before the model loads (a load can take minutes)."""
    from .prompter import prompt_format_name
    from .settings import names_a_missing_folder
    prompt_format_name(s.prompt_type)
    if s.score_model and s.score_model != "auto" and names_a_missing_folder(s.score_model):
        raise UserError(f"--score_model={s.score_model} is not a folder (give a reward model's folder or hub id)")


def build_engine(s: Settings, model):
    from .engine import ChatEngine, Limits
    from .loaders.base import GenParams
    from .prompter import FORMATS, Prompter, make_prompter, system_prompt_for

    info = model.info
    if getattr(model, "takes_messages", False):  # a chat API: the server formats the conversation
        prompter = Prompter("the server's chat template", FORMATS["plain"], system_prompt_for(s.system_prompt, ""),
                            on_server=True)
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
    history = None
    if s.save_dir:
        from .history import History
        history = History(s.save_dir)
        history.check()  # now, not after the first answer
    engine = ChatEngine(model, prompter, defaults, limits, verbose=s.verbose,
                        log=lambda text: print(text, file=sys.stderr), history=history, scorer=scorer)
    if s.top_k_docs is not None:
        engine.top_k_docs = s.top_k_docs
    engine.params()  # validate the defaults once, now, rather than at the first message
    return engine


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
