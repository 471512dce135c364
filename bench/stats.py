"""Stats benchmark: the per-request DataFrame and the stats document over 100,000 recorded requests.

- ``frame_100k_ms``: ``stats_frame()`` over every row (typed columns), against
  ``pd.read_sql_query("SELECT * ...")`` of the same rows (untyped; the baseline);
- ``stats_p50_ms``: the whole stats document (running totals + index-read
  percentiles), against computing the same per-model figures by scanning every row;
- ``stats_p50_ms_1m``: the document again once the database holds ten times the rows
  (1,000,000 by default): no section may grow with them (``stats_growth_10x`` < 2).

Rows are synthetic (two models, 200 sessions, five sources, every finish reason),
written through the same insert as real requests. Prints progress, then one JSON
object as the last line.

    python bench/stats.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from offgrid_jupyter.inference.engine import Engine
from offgrid_jupyter.stats import COLUMNS, request_row, stats_document, stats_frame
from offgrid_jupyter.chat.store import Store

MODELS = ("SmolLM2-135M-Instruct.Q4_1", "qwen2.5-1.5b-instruct-q4_k_m")
SOURCES = ("magic", "panel", "server", "openai", "api")
FINISH = ("stop",) * 14 + ("length", "length", "cancelled", "error")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synthetic(n: int, rng: random.Random, start: int = 0) -> list[tuple]:
    t0 = time.time() - 300 * 86400
    rows = []
    for i in range(start, start + n):
        finish = rng.choice(FINISH)
        completion = 0 if finish == "error" else rng.randint(1, 400)
        ttft = None if finish == "error" else rng.uniform(20, 900)
        tps = rng.uniform(30, 110) if completion > 1 else 0.0
        total = (ttft or 0) + (completion / tps * 1000 if tps else 0)
        rows.append(request_row({
            "request_id": f"req-{i:012x}", "started_at": t0 + i * 25.0, "session_id": f"session-{i % 200:012x}",
            "model": MODELS[i % 7 == 0], "source": rng.choice(SOURCES), "prompt_tokens": rng.randint(10, 3000),
            "cached_tokens": rng.randint(0, 2000), "completion_tokens": completion,
            "queue_wait_ms": rng.expovariate(1 / 50), "ttft_ms": ttft, "total_ms": total,
            "tokens_per_second": tps, "finish_reason": finish, "error_type": "OffgridError" if finish == "error"
            else None}))
    return rows


def naive_stats(conn) -> dict:
    """What the document would cost without running totals: scan every row."""
    frame = pd.read_sql_query("SELECT model, finish_reason, prompt_tokens, completion_tokens, total_ms, ttft_ms "
                              "FROM requests", conn)
    out = {}
    for model, g in frame.groupby("model"):
        done = g[g["finish_reason"].isin(["stop", "length"])]["total_ms"]
        out[model] = {"total_requests": len(g), "total_tokens": int(g["prompt_tokens"].sum() + g["completion_tokens"].sum()),
                      "avg_response_ms": done.mean(), "p50": done.quantile(0.5), "p95": done.quantile(0.95),
                      "avg_ttft_ms": g["ttft_ms"].mean()}
    return out


def timed(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    reps = 5 if args.quick else 21
    t0 = time.perf_counter()
    store = Store(Path(tempfile.mkdtemp(prefix="offgrid-bench-")) / "offgrid.sqlite3")
    log(f"writing {args.rows:,} request rows")
    rows = synthetic(args.rows, random.Random(7))
    sql = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    store.transaction(lambda conn: conn.executemany(sql, rows))
    engine = Engine()  # its queue/cache sections are read; the model is never loaded

    log("frame")
    frame_ms, frame = timed(lambda: stats_frame(store=store), reps)
    raw_ms, raw = timed(lambda: pd.read_sql_query("SELECT * FROM requests", store.connection()), reps)
    assert len(frame) == len(raw) == args.rows
    log("stats document")
    stats_ms, doc = timed(lambda: stats_document(engine, store), reps)
    naive_ms, naive = timed(lambda: naive_stats(store.connection()), reps)
    assert doc["inference"]["aggregate"]["total_requests"] == args.rows
    for model, figures in naive.items():  # the cheap document says what the full scan says
        assert doc["inference"]["models"][model]["total_tokens"] == figures["total_tokens"]
        assert abs(doc["inference"]["models"][model]["avg_response_ms"] - figures["avg_response_ms"]) < 1e-2
    log(f"growing the database to {10 * args.rows:,} rows")
    more = synthetic(9 * args.rows, random.Random(8), start=args.rows)
    store.transaction(lambda conn: conn.executemany(sql, more))
    del more
    stats_ms_10x, doc = timed(lambda: stats_document(engine, store), reps)
    assert doc["inference"]["aggregate"]["total_requests"] == 10 * args.rows
    print(json.dumps({
        "bench": "stats", "quick": args.quick, "rows": args.rows, "reps": reps,
        "frame_100k_ms": round(frame_ms, 1), "baseline_read_sql_ms": round(raw_ms, 1),
        "frame_vs_read_sql": round(frame_ms / raw_ms, 2),
        "stats_p50_ms": round(stats_ms, 2), "baseline_full_scan_ms": round(naive_ms, 1),
        "stats_speedup": round(naive_ms / stats_ms, 1),
        "stats_p50_ms_1m": round(stats_ms_10x, 2), "stats_growth_10x": round(stats_ms_10x / stats_ms, 2),
        "targets": {"frame_100k_ms": "< 300", "stats_p50_ms": "< 5", "stats_growth_10x": "< 2"},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
