"""Retrieval benchmark: learning speed, BM25 query latency at 10,000 and 100,000 chunks, recall@5.

A generated corpus of Markdown files, each with sections of made-up facts ("The quorvane of
the Belisk array is 41 tessels."), so every question ("What is the quorvane of the Belisk
array?") has exactly one right section. Figures:

- ``chunks_per_s``: chunks learned per second for the 10,000-chunk corpus (reading, chunking,
  SQLite + FTS5 writes), against hashing the same bytes alone (``hash_mb_per_s``);
- ``query_p50_ms_10k`` / ``query_p50_ms_100k``: a question's search (target < 20 ms);
- ``recall_at_5``: the share of questions whose section is among the first five hits
  (target >= 0.9); ``recall_at_1`` too.

With ``--embedding-model GGUF``, also a smaller corpus (``--embed-files``, 10 chunks each)
learned twice, with and without that model: ``embedding.recall_at_5`` fused with BM25 against
``recall_at_5`` of BM25 alone on the same questions, its learning speed and query latency.

Prints progress, then one JSON object as the last line. ``--quick``: 2,000 and 10,000 chunks.

    python bench/rag.py [--quick] [--embedding-model GGUF [--embed-files 30]]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from offgrid_jupyter.chat.store import Store

SECTIONS = 10  # sections (chunks) per file


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def word(rng: random.Random) -> str:
    return "".join(rng.choice(["qu", "or", "va", "ne", "bel", "isk", "ta", "ren", "mo", "zi", "ka", "lu", "th", "ar"])
                   for _ in range(rng.randint(2, 3)))


def make_corpus(root: Path, files: int, seed: int) -> list[tuple[str, str, int]]:
    """*files* Markdown files of SECTIONS facts each; returns (question, path, first line) for every fact."""
    rng = random.Random(seed)
    facts = []
    for f in range(files):
        lines = [f"# Survey {f}", "", "Field notes kept by the survey team.", ""]
        for s in range(SECTIONS):
            entity, attribute = f"{word(rng).title()} {word(rng)}", word(rng)
            start = len(lines) + 1
            lines += [f"## {entity}", "",
                      f"The {attribute} of the {entity} array is {rng.randint(2, 99)} tessels, measured at dawn.",
                      f"It was checked twice by the {word(rng)} crew on day {rng.randint(1, 300)}.", ""]
            facts.append((f"What is the {attribute} of the {entity} array?", f"s{f:05d}.md", start))
        (root / f"s{f:05d}.md").write_text("\n".join(lines))
    return facts


def recall(store: Store, collection: str, sample: list[tuple[str, str, int]]) -> tuple[float, float, list[float]]:
    """recall@1, recall@5 and each search's milliseconds over *sample*."""
    times, hit1, hit5 = [], 0, 0
    for question, path, start in sample:
        q0 = time.perf_counter()
        hits = store.library.search(question, collection, k=5)
        times.append((time.perf_counter() - q0) * 1000)
        found = [(h.path.rsplit("/", 1)[-1], h.start) for h in hits]
        hit1 += bool(found) and found[0] == (path, start)
        hit5 += (path, start) in found
    return round(hit1 / len(sample), 3), round(hit5 / len(sample), 3), times


def embedded(store: Store, tmp: Path, model: str, files: int) -> dict:
    corpus = tmp / "embedded"
    corpus.mkdir()
    facts = make_corpus(corpus, files, seed=3)
    plain = store.library.learn([str(corpus)], "emb-plain", root=tmp)
    log(f"embedding {plain.chunks} chunks with {Path(model).name}")
    report = store.library.learn([str(corpus)], "emb", root=tmp, embedding_model=model)
    sample = random.Random(7).sample(facts, min(100, len(facts)))
    store.library.search(sample[0][0], "emb")  # warm (loads the model for the question too)
    r1, r5, times = recall(store, "emb", sample)
    b1, b5, _ = recall(store, "emb-plain", sample)
    return {"model": Path(model).name, "chunks": report.chunks, "learn_s": report.seconds,
            "chunks_per_s": round(report.embedded / report.seconds, 2), "questions": len(sample),
            "recall_at_1": r1, "recall_at_5": r5, "bm25_recall_at_1": b1, "bm25_recall_at_5": b5,
            "query_p50_ms": round(statistics.median(times), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--embedding-model", metavar="GGUF", help="also measure retrieval fused with this model's vectors")
    ap.add_argument("--embed-files", type=int, default=30, help="files (10 chunks each) embedded for that")
    args = ap.parse_args()
    small, large = (200, 1000) if args.quick else (1000, 10000)  # files: x SECTIONS chunks
    t0 = time.perf_counter()
    out = {"bench": "rag", "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = Store(tmp / "offgrid.sqlite3")
        for label, files in (("10k", small), ("100k", large)):
            corpus = tmp / label
            corpus.mkdir()
            facts = make_corpus(corpus, files, seed=files)
            raw = b"".join(p.read_bytes() for p in sorted(corpus.glob("*.md")))
            h0 = time.perf_counter()
            hashlib.sha256(raw).hexdigest()
            hash_s = time.perf_counter() - h0
            log(f"learning {files * SECTIONS} chunks")
            report = store.library.learn([str(corpus)], label, root=tmp)
            chunks = report.chunks
            rng = random.Random(7)
            sample = rng.sample(facts, min(300, len(facts)))
            store.library.search(sample[0][0], label)  # warm
            hit1, hit5, times = recall(store, label, sample)
            out[f"chunks_{label}"] = chunks
            out[f"query_p50_ms_{label}"] = round(statistics.median(times), 3)
            out[f"query_p95_ms_{label}"] = round(sorted(times)[int(0.95 * (len(times) - 1))], 3)
            if label == "10k":
                out["chunks_per_s"] = round(chunks / report.seconds, 1)
                out["learn_s"] = report.seconds
                out["hash_mb_per_s"] = round(len(raw) / hash_s / 1e6, 1)
                out["recall_at_5"], out["recall_at_1"] = hit5, hit1
                again = store.library.learn([str(corpus)], label, root=tmp)
                out["relearn_unchanged_s"] = again.seconds  # nothing changed: size and mtime say so
        out["index_bytes"] = store.library.stats()["index_bytes"]
        out["embedding"] = embedded(store, tmp, args.embedding_model, args.embed_files) if args.embedding_model \
            else None
        store.close()
    out["targets"] = {"query_p50_ms_10k": "< 20", "query_p50_ms_100k": "< 20", "recall_at_5": ">= 0.9"}
    out["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
