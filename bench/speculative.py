"""Speculative decoding by prompt lookup (--speculative), measured per workload: by default with the built-in model
on llama.cpp; `--flags` picks another model and backend (e.g. a Hugging Face folder with --fast_decode=True).

Four workloads of 20 prompts each, made here from the project's own files (nothing downloaded):
  chat       questions answered in words (little to quote)
  code       a function from quantchat/ with an edit to make (rename, docstring, type hints): the answer quotes it
  rewrite    a paragraph of docs/ to rewrite or summarize
  documents  documents Q&A: passages of docs/ in front of a question, as the engine puts them (passages.py)
Each prompt is answered greedily without and with speculation (one model each, loaded once, taking turns prompt by
prompt), `--new_tokens` each;
the result file has per prompt: tokens/s both ways, guesses checked and kept, model steps, whether the answers are
the same; and per workload the totals.

  python bench/speculative.py --out bench/results/speculative-cpu.json
  python bench/speculative.py --flags="--base_model=/tmp/smol-hf --fast_decode=True" --out ...
  python bench/speculative.py --table bench/results/speculative-cpu.json
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decode import gpu_name, profiled  # noqa: E402
from quantchat import loaders  # noqa: E402
from quantchat.assembly import build_engine  # noqa: E402
from quantchat.cli import parse_flags  # noqa: E402
from quantchat.documents.passages import Passage, question_with_context  # noqa: E402
from quantchat.settings import from_flags  # noqa: E402

CHAT = ["Why is the sky blue?", "How do bees make honey?", "What causes the seasons?", "Why does bread rise?",
        "How does a refrigerator keep food cold?", "What is the difference between weather and climate?",
        "Why do cats purr?", "How do airplanes stay in the air?", "What makes a good night's sleep?",
        "Why is the sea salty?", "How does a compass work?", "What is photosynthesis?", "Why do leaves change colour?",
        "How do vaccines work?", "What is a black hole?", "Why do we have time zones?", "How is glass made?",
        "What does a CPU do?", "Why do onions make you cry?", "How do tides work?"]
CODE_EDITS = ["Rename the function to a clearer name and give back the whole code.",
              "Add a docstring to this code and give back the whole code.",
              "Add type hints where they are missing and give back the whole code.",
              "Replace double quotes with single quotes in this code and give back the whole code."]
REWRITES = ["Rewrite this paragraph in simpler words.", "Fix any grammar mistakes in this paragraph and give it back.",
            "Summarize this paragraph in three sentences.", "Rewrite this paragraph in British spelling."]
WORKLOADS = ("chat", "code", "rewrite", "documents")
QUESTIONS = ["What does this say about speed?", "Which flags are mentioned?", "What is measured here?",
             "What does the user need to install?", "What happens on an error?"]


def functions(count: int) -> list[str]:
    """`count` functions of 8 to 40 lines from quantchat/, in a fixed order."""
    found = []
    for path in sorted((ROOT / "quantchat").rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and 8 <= node.end_lineno - node.lineno <= 40:
                found.append(ast.get_source_segment(source, node))
    return found[::max(1, len(found) // count)][:count]


def paragraphs(count: int) -> list[tuple[str, str]]:
    """`count` (file, paragraph) pairs of 300 to 900 characters from docs/."""
    found = []
    for path in sorted((ROOT / "docs").glob("*.md")):
        for block in path.read_text().split("\n\n"):
            if 300 <= len(block) <= 900 and not block.lstrip().startswith(("|", "```", "#")):
                found.append((path.name, block.strip()))
    return found[::max(1, len(found) // count)][:count]


def workloads(per: int) -> dict[str, list[str]]:
    blocks = paragraphs(per * 3)
    documents = []
    for i in range(per):
        chosen = blocks[i:i + 3]
        passages = [Passage(text, source, first=1, last=text.count("\n") + 1) for source, text in chosen]
        documents.append(question_with_context(QUESTIONS[i % len(QUESTIONS)], passages))
    return {"chat": CHAT[:per],
            "code": [f"{CODE_EDITS[i % len(CODE_EDITS)]}\n\n```python\n{f}\n```" for i, f in enumerate(functions(per))],
            "rewrite": [f"{REWRITES[i % len(REWRITES)]}\n\n{text}" for i, (_, text) in enumerate(blocks[:per])],
            "documents": documents}


def answer_all(prompts: dict[str, list[str]], new_tokens: int, flags: list[str], profile: bool = False,
               workload_done=lambda answers, model: None) -> tuple:
    """Each prompt answered without speculation and then with it, by two loaded models taking turns prompt by prompt
    (so that the machine's drift over the run falls on both alike); what the model and backend were; and with
    `profile`, where the time of the first code prompt's answer goes, each way (bench/decode.profiled).
    `workload_done(answers so far, model)` after each workload, so that a run cut short keeps what it measured."""
    engines, models = {}, []
    for speculative in (False, True):
        settings = from_flags(parse_flags([f"--speculative={speculative}", "--max_seq_len=4096", "--temperature=0",
                                           f"--max_new_tokens={new_tokens}", "--prefix_cache=False",
                                           *[f for f in flags if speculative or not f.startswith("--draft_model")]]))
        start = time.perf_counter()
        models.append(loaders.load(loaders.plan(settings)))
        if hasattr(models[-1], "wait_for_fast_decode"):  # (a GPU compiles the fast path in the background)
            models[-1].wait_for_fast_decode()
        print(f"{'speculative' if speculative else 'plain'} model ready in {time.perf_counter() - start:.0f} s", flush=True)
        engines[speculative] = build_engine(settings, models[-1])
    info = models[-1].info
    described = f"{info.model}, {info.backend}, {info.dtype}, {info.decode or ''}".rstrip(", ")
    out: dict[bool, dict[str, list[dict]]] = {False: {}, True: {}}
    for workload, asked in prompts.items():
        for speculative in engines:
            out[speculative][workload] = []
        for prompt in asked:
            for speculative, engine in engines.items():
                reply = engine.chat([{"role": "user", "content": prompt}])
                text = reply.finish()
                s, spec = reply.stats, reply.stats.speculation
                out[speculative][workload].append({
                    "text": text, "tokens": s.completion_tokens, "tokens_per_s": s.tokens_per_s, "ttft_s": s.ttft_s,
                    "decode_s": s.total_s - s.ttft_s, "steps": spec.steps if spec else 0,
                    "guessed": spec.drafted if spec else 0, "kept": spec.accepted if spec else 0,
                    "guess_steps_s": spec.seconds if spec else 0.0,
                    "switched_off": bool(spec and spec.switched_off), "resting": bool(spec and spec.resting)})
                print(workload, speculative, s.line(), flush=True)
        workload_done(out, described)
    profiles = {}
    for speculative, engine in engines.items() if profile else ():
        profiles[str(speculative)] = profiled(lambda e=engine: e.chat([{"role": "user", "content": prompts["code"][0]}])
                                              .finish(), new_tokens)
    for model in models:
        model.close()
    return out, described, profiles


def summary(plain: list[dict], guessed: list[dict]) -> dict:
    def rate(rows):  # tokens after the first over the time after the first, over all answers
        return sum(r["tokens"] - 1 for r in rows) / sum(r["decode_s"] for r in rows)
    steps = sum(r["steps"] for r in guessed)
    kept = sum(r["kept"] for r in guessed)
    return {"prompts": len(plain), "tokens_per_s_plain": round(rate(plain), 2),
            "tokens_per_s_speculative": round(rate(guessed), 2), "speedup": round(rate(guessed) / rate(plain), 3),
            "guessed": sum(r["guessed"] for r in guessed), "kept": kept,
            "acceptance": round(kept / max(1, sum(r["guessed"] for r in guessed)), 3),
            "tokens_per_step": round((steps + kept) / steps, 2) if steps else None,
            # a step with guesses (guessing, the step, reading its choices) against a token decoded without guesses
            "ms_per_step_with_guesses": round(1000 * sum(r.get("guess_steps_s", 0) for r in guessed) / steps, 3)
            if steps else None,
            "ms_per_token_without": round(1000 / rate(plain), 3),
            "switched_off": sum(r["switched_off"] for r in guessed),
            "resting": sum(r["resting"] for r in guessed),  # (a draft model's record: DraftRecord)
            "same_answers": sum(a["text"] == b["text"] for a, b in zip(plain, guessed, strict=True))}


def resting(summary: dict) -> str:
    """A draft model's answers without guesses after losing in the ones before, where there were any."""
    return f" (then {summary['resting']} resting)" if summary.get("resting") else ""


def table(path: str) -> str:
    data = json.loads(Path(path).read_text())
    timed = any("ms_per_step_with_guesses" in s for s in data["summary"].values())  # (later result files)
    lines = ["| workload | prompts | tokens/s without | tokens/s with | speed-up | guesses kept | tokens per step "
             "(steps with guesses) | switched off | same answers |" +
             (" ms per step with guesses | ms per token without |" if timed else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if timed else "")]
    for workload, s in data["summary"].items():
        lines.append(f"| {workload} | {s['prompts']} | {s['tokens_per_s_plain']} | {s['tokens_per_s_speculative']} | "
                     f"{s['speedup']:.2f}x | {s['kept']} of {s['guessed']} ({s['acceptance']:.0%}) | "
                     f"{s['tokens_per_step']} | {s['switched_off']}{resting(s)} | {s['same_answers']} of {s['prompts']} |" +
                     (f" {s.get('ms_per_step_with_guesses')} | {s.get('ms_per_token_without')} |" if timed else ""))
    return "\n".join(lines)


def machine() -> str:
    if gpu := gpu_name():
        import torch
        return f"{gpu}, torch {torch.__version__}"
    return f"{platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per_workload", type=int, default=20)
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="which workloads, in this order (a run cut off by a time limit keeps the first ones)")
    parser.add_argument("--new_tokens", type=int, default=96)
    parser.add_argument("--flags", default="", help="launcher flags for both models, e.g. --base_model=...")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the first code prompt's answer each way (a GPU: kernels, busy time)")
    parser.add_argument("--out")
    parser.add_argument("--table")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    chosen = args.workloads.split(",")
    if unknown := set(chosen) - set(WORKLOADS):
        parser.error(f"unknown workload(s) {', '.join(sorted(unknown))}: choose from {', '.join(WORKLOADS)}")
    every = workloads(args.per_workload)
    prompts = {w: every[w] for w in chosen}

    def write(answers: dict, model: str, profiles: dict | None = None) -> None:  # the workloads answered so far
        plain, guessed = answers[False], answers[True]
        done = [w for w in prompts if len(guessed.get(w, [])) == len(prompts[w])]
        result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "model": model,
                  "new_tokens": args.new_tokens, "flags": args.flags,
                  "summary": {w: summary(plain[w], guessed[w]) for w in done},
                  "answers": {w: [{"prompt": p, "plain": a, "speculative": b} for p, a, b in
                                  zip(prompts[w], plain[w], guessed[w], strict=True)] for w in done},
                  **({"profile": profiles} if profiles else {})}
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    answers, model, profiles = answer_all(prompts, args.new_tokens, args.flags.split(), args.profile, write)
    write(answers, model, profiles)
    if args.out:
        print(table(args.out))


if __name__ == "__main__":
    main()
