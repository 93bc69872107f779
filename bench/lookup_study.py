"""Which prompt lookup pays most: each answer's decoding replayed over its token ids for several n-gram sizes.

Prompt lookup guesses only where the text's last n tokens occurred before; every other token is decoded one a step.
Whether a guess is kept does not depend on the hardware, so the steps each lookup would take are counted here by
replaying the answers' own token ids (the fast path's loop: after each token, a verify step with up to `--most`
guesses where the lookup has one, else a one-token step; no switch-off), and a GPU's speed-up is projected from the
step costs a bench/speculative.py run measured there (`--costs`: its ms per token without guesses and per step with
them, per workload). A projection, labelled so; the current lookup's projection against that run's measured speed-up
says how far to trust it.

The answers: the built-in model on llama.cpp (or `--flags`), greedy, bench/speculative.py's prompts, each answer's
prompt and answer ids kept in the result file (`--replay` counts again from one without answering).

  python bench/lookup_study.py --costs=bench/results/speculative-h200-qwen05.json \\
      --out=bench/results/lookup-study-cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.speculative import machine, workloads  # noqa: E402
from quantchat.speculative import PromptLookup  # noqa: E402

# (longest, shortest) n-gram sizes, and whether a copy resumes after a replaced token; the first is the default
LOOKUPS = [(4, 3, False), (4, 2, False), (4, 1, False), (3, 2, False), (3, 1, False), (2, 1, False), (5, 2, False),
           (6, 2, False), (4, 3, True), (4, 2, True)]
RESUME_AFTER = 2  # guesses kept in a step for it to count as copying


def answer_ids(prompts: dict[str, list[str]], new_tokens: int, flags: list[str]) -> dict[str, list[dict]]:
    """Each prompt's ids and its greedy answer's ids: what the model's prompt lookup indexed by the answer's end."""
    from quantchat import loaders
    from quantchat.assembly import build_engine
    from quantchat.cli import parse_flags
    from quantchat.settings import from_flags
    settings = from_flags(parse_flags(["--speculative=True", "--max_seq_len=4096", "--temperature=0",
                                       f"--max_new_tokens={new_tokens}", "--prefix_cache=False", *flags]))
    model = loaders.load(loaders.plan(settings))
    if hasattr(model, "wait_for_fast_decode"):
        model.wait_for_fast_decode()
    engine = build_engine(settings, model)
    out: dict[str, list[dict]] = {}
    for workload, asked in prompts.items():
        out[workload] = []
        for prompt in asked:
            reply = engine.chat([{"role": "user", "content": prompt}])
            reply.finish()
            lookup = (getattr(model, "fast", None) or model).lookup  # (the Hugging Face fast path keeps its own)
            indexed, prompt_tokens = lookup.tokens, reply.stats.prompt_tokens
            out[workload].append({"prompt": indexed[:prompt_tokens], "answer": indexed[prompt_tokens:]})
            print(workload, reply.stats.line(), flush=True)
    model.close()
    return out


def replay(prompt: list[int], answer: list[int], longest: int, shortest: int, most: int, resume: bool = False) -> dict:
    """The steps the fast path's loop takes to decode `answer` after `prompt` with this lookup: the first token
    comes from the prompt's pass; after each token, a verify step over the lookup's guesses (kept up to the first
    that differs from the answer) where it has any, else a one-token step.

    `resume` (a what-if, not the product's lookup): where a step was copying (RESUME_AFTER guesses or more kept) and
    its next token differs from the copy's (a renamed identifier, a changed word), the next step, if the n-grams find
    nothing, guesses that the copy goes on after the replaced token."""
    lookup = PromptLookup(prompt, longest, shortest)
    one_token = verify = guessed = kept = made_in_verify = 0
    copy_at = None  # with `resume`: where a copy that one token broke off would go on
    i = 0  # answer[i] is chosen and now emitted
    while i + 1 < len(answer):
        lookup.extend([answer[i]])
        room = min(most, len(answer) - i - 2)  # (room for the token after them, as the loop keeps)
        at = lookup.match()
        at = copy_at if at is None and resume else at
        guesses = lookup.tokens[at:at + room] if at is not None and room > 0 else []
        if not guesses:
            one_token += 1
            i += 1
            copy_at = None
            continue
        pairs = enumerate(zip(guesses, answer[i + 1:], strict=False))  # (room keeps the guesses within the answer)
        right = next((n for n, (guess, token) in pairs if guess != token), len(guesses))
        verify, guessed, kept = verify + 1, guessed + len(guesses), kept + right
        made_in_verify += right + 1
        copy_at = at + right + 1 if RESUME_AFTER <= right < len(guesses) else None
        lookup.extend(answer[i + 1:i + 1 + right])
        i += right + 1
    return {"one_token_steps": one_token, "verify_steps": verify, "guessed": guessed, "kept": kept,
            "tokens_in_verify_steps": made_in_verify}


def study(answers: dict[str, list[dict]], costs: dict | None, most: int) -> dict:
    """Per lookup and workload: the steps counted over every answer, and with `costs` (per workload: ms per token
    without guesses, ms per step with them) the projected decode speed-up."""
    result = {}
    for longest, shortest, resume in LOOKUPS:
        rows = {}
        for workload, pairs in answers.items():
            counted = [replay(p["prompt"], p["answer"], longest, shortest, most, resume) for p in pairs]
            total = {key: sum(c[key] for c in counted) for key in counted[0]}
            decoded = sum(max(0, len(p["answer"]) - 1) for p in pairs)  # (after the prompt's pass)
            total["share_in_verify_steps"] = round(total["tokens_in_verify_steps"] / max(1, decoded), 3)
            if costs and workload in costs:
                one, step = costs[workload]["ms_per_token_without"], costs[workload]["ms_per_step_with_guesses"]
                total["projected_speedup"] = round(
                    decoded * one / (total["one_token_steps"] * one + total["verify_steps"] * step), 2)
            rows[workload] = total
        result[f"n-grams {longest} to {shortest}" + (", a copy resumed" if resume else "")] = rows
    return result


def table(result: dict) -> str:
    workloads_ = list(next(iter(result["lookups"].values())))
    lines = ["| lookup | " + " | ".join(workloads_) + " |", "|---|" + "---|" * len(workloads_)]
    for lookup, rows in result["lookups"].items():
        cells = [f"{r['kept']} of {r['guessed']} kept, {r['share_in_verify_steps']:.0%} in verify steps" +
                 (f", {r['projected_speedup']}x" if "projected_speedup" in r else "") for r in rows.values()]
        lines.append(f"| {lookup} | " + " | ".join(cells) + " |")
    if measured := result.get("measured_speedup"):
        lines.append("| measured (the current lookup) | " + " | ".join(f"{measured[w]:.2f}x" for w in workloads_) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per_workload", type=int, default=20)
    parser.add_argument("--new_tokens", type=int, default=96)
    parser.add_argument("--most", type=int, default=8, help="guesses per verify step (the fast path's default)")
    parser.add_argument("--flags", default="", help="launcher flags, e.g. --base_model=...")
    parser.add_argument("--costs", help="a bench/speculative.py result file measured on the GPU: project from it")
    parser.add_argument("--replay", help="an earlier result file of this bench: count again from its answers")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.replay:
        result = json.loads(Path(args.replay).read_text())
    else:
        result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "new_tokens": args.new_tokens,
                  "flags": args.flags or "(the built-in model on llama.cpp)",
                  "answers": answer_ids(workloads(args.per_workload), args.new_tokens, args.flags.split())}
    costs = json.loads(Path(args.costs).read_text())["summary"] if args.costs else None
    result.update(what=__doc__.split("\n\n")[0], most=args.most, costs_from=args.costs,
                  lookups=study(result["answers"], costs, args.most))
    if costs:
        result["measured_speedup"] = {w: s["speedup"] for w, s in costs.items()}
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
