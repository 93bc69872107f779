"""Documents Q&A: how long reading and embedding a folder takes, and what a restart costs.

  python bench/ingest.py --files=200 --out=bench/results/ingest-cpu.json

Writes a folder of generated documents (text and PDF pages, about 2 KB of prose each), then times: the first
ingestion, a re-run with nothing changed, a re-run after one file changed, and a search. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("river valley mirror telescope granite lighthouse keeper harbour ferry morning orchard quince pear apple "
         "survey weather clear cloud north south station engine signal bridge tower market bakery bread winter "
         "summer autumn spring field notes report annual budget council meeting library archive letter").split()


def write_folder(folder: Path, files: int) -> None:
    from fpdf import FPDF
    rng = random.Random(0)
    for i in range(files):
        lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(30)]
        if i % 4 == 0:
            pdf = FPDF()
            pdf.set_font("Helvetica", size=10)
            pdf.add_page()
            for line in lines:
                pdf.cell(0, 6, line, new_x="LMARGIN", new_y="NEXT")
            pdf.output(str(folder / f"doc{i:04d}.pdf"))
        else:
            (folder / f"doc{i:04d}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--out")
    args = parser.parse_args()
    import torch

    from quantchat.documents.ingest import sync_folder
    from quantchat.documents.store import DocumentStore, Embedder
    with tempfile.TemporaryDirectory() as tmp:
        folder, db = Path(tmp) / "docs", Path(tmp) / "db"
        folder.mkdir()
        write_folder(folder, args.files)
        started = time.perf_counter()
        embedder = Embedder()
        load_s = time.perf_counter() - started
        store = DocumentStore(str(db), embedder)
        timings = {}
        for name in ("first", "unchanged", "one changed"):
            if name == "one changed":
                (folder / "doc0001.md").write_text("The Skerry Point lighthouse was built in 1871.\n")
            started = time.perf_counter()
            report = sync_folder(folder, store.user_data, 512)
            timings[name] = {"seconds": round(time.perf_counter() - started, 2), "added": len(report.added),
                             "updated": len(report.updated), "unchanged": report.unchanged}
        passages = store.user_data.count()
        started = time.perf_counter()
        for _ in range(20):
            found = store.user_data.search("When was the lighthouse built?", 4)
        search_ms = (time.perf_counter() - started) / 20 * 1000
    result = {"date": time.strftime("%Y-%m-%d"), "machine": {"cpu_count": torch.get_num_threads(),
              "platform": platform.platform(), "device": embedder.device, "torch": torch.__version__},
              "files": args.files, "passages": passages, "embedder_load_s": round(load_s, 2), "sync": timings,
              "search_ms": round(search_ms, 1), "top_hit": found[0].cite()}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{args.files} files ({passages} passages) on {embedder.device}, {torch.get_num_threads()} threads, "
          f"{result['date']}; embedding model loaded in {result['embedder_load_s']} s\n")
    print("| run | seconds | added | updated | unchanged |\n|---|---|---|---|---|")
    for name, t in timings.items():
        print(f"| {name} | {t['seconds']} | {t['added']} | {t['updated']} | {t['unchanged']} |")
    print(f"\nsearch: {result['search_ms']} ms per question (top hit: {result['top_hit']})")


if __name__ == "__main__":
    main()
