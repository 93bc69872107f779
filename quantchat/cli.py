"""The command line: flags (parsed by fire, as in h2oGPT) -> Settings -> LoadPlan -> model -> engine -> front end."""
from __future__ import annotations

import os
import sys
from typing import Any

from .assembly import build_engine, check_engine_flags, describe_documents, documents_for, documents_wanted
from .errors import UsageError, UserError
from .settings import LOOPBACK, Settings, from_flags, help_text


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


def start_api(s: Settings):
    """The OpenAI-compatible API starts before the model loads, so /health can say 503 meanwhile."""
    from .api import OpenAIServer, read_api_keys, serve
    from .auth import api_keys_from_logins
    keys = read_api_keys(s.openai_api_key) or api_keys_from_logins(s.auth)  # --auth's logins, as USER:PASSWORD
    host = s.server_name
    if host not in LOOPBACK and not keys:
        print(f"warning: no --openai_api_key or --auth: the API listens on 127.0.0.1 only, not on {host}",
              file=sys.stderr)
        host = "127.0.0.1"
    api = OpenAIServer(keys)
    thread = serve(api, host, s.openai_port)
    print(f"OpenAI-compatible API on http://{host}:{s.openai_port}/v1", file=sys.stderr)
    return api, thread


def model_settings(s: Settings, flags: dict[str, Any]) -> list[Settings]:
    """One Settings per model: the command line's, or with --model_lock each entry's flags over the command line's."""
    if not s.model_lock:
        return [s]
    common = {k: v for k, v in flags.items() if k != "model_lock"}
    return [from_flags({**common, **entry}) for entry in s.model_lock]


def run(s: Settings, flags: dict[str, Any] | None = None) -> int:
    from . import loaders

    each = model_settings(s, flags or {})
    for one in each:
        check_engine_flags(one)
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
    models, engines = [], []
    try:
        for plan in plans:
            models.append(loaders.load(plan))
        engines += [build_engine(one, model) for one, model in zip(each, models, strict=True)]
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
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: a clean stop, exit 0
        if not engines:
            raise
        print("\nstopping", file=sys.stderr)
    finally:
        # generations first: a model freed under a running generation crashes the process
        for one in engines:
            if not one.stop_all(timeout=30):
                print("warning: a generation did not stop within 30 s", file=sys.stderr)
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
