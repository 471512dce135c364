"""Store benchmark: append latency, listing 10,000 sessions, reading a 1,000-message session.

Each figure is printed with a baseline measured in the same run: the same operation
as one plain sqlite3 statement on the same file, without validation, caching or
transactions of ours. Progress goes to stderr; the last line is one JSON object.

    python bench/store.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from offgrid_jupyter.chat.records import new_message_id, new_session_id
from offgrid_jupyter.chat.store import Store


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def p50(samples: list[float]) -> float:
    return round(statistics.median(samples), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (< 60 s)")
    args = ap.parse_args()
    appends, reps = (300, 20) if args.quick else (2000, 100)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.sqlite3")
        conn = store.connection()

        print("append", file=sys.stderr)
        s = store.create("append")
        ours_append = timed(lambda: store.add_message(s.id, "user", "a typical prompt of modest length " * 4), appends)

        def raw_append() -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO messages (id, session_id, role, content, timestamp) VALUES (?, ?, ?, ?, ?)",
                         (new_message_id(), s.id, "user", "a typical prompt of modest length " * 4, time.time()))
            conn.execute("COMMIT")

        raw_append_ms = timed(raw_append, appends)

        print("1,000-message session", file=sys.stderr)
        big = store.create("big")
        for i in range(1000):
            store.add_message(big.id, "user" if i % 2 == 0 else "assistant", f"message {i} " + "text " * 40)

        def cold_get() -> None:
            store._forget(big.id)
            store.get(big.id)

        get_cold = timed(cold_get, reps)
        get_warm = timed(lambda: store.get(big.id), reps)
        raw_get = timed(lambda: conn.execute("SELECT * FROM messages WHERE session_id = ? ORDER BY seq",
                                             (big.id,)).fetchall(), reps)

        print("10,000 sessions (bulk-loaded)", file=sys.stderr)
        now = time.time()
        rows = [(new_session_id(), None, f"title {i}", None, None, None, now - i, now - i, now - i, 1)
                for i in range(10_000)]
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO sessions (id, name, title, system_prompt, profile, model, created_at, "
                         "updated_at, last_access_at, message_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.executemany("INSERT INTO messages (id, session_id, role, content, timestamp) VALUES (?, ?, ?, ?, ?)",
                         [("msg-" + uuid.uuid4().hex[:12], r[0], "user", "hi", now) for r in rows])
        conn.execute("COMMIT")
        list_ms = timed(lambda: store.list(limit=50), reps)
        raw_list = timed(lambda: conn.execute("SELECT * FROM sessions ORDER BY updated_at DESC LIMIT 50").fetchall(),
                         reps)
        assert store.count() >= 10_000
        store.close()

    result = {
        "bench": "store", "quick": args.quick,
        "append_p50_ms": p50(ours_append), "append_baseline_p50_ms": p50(raw_append_ms),
        "append_ratio": round(p50(ours_append) / p50(raw_append_ms), 2),
        "list_10k_ms": p50(list_ms), "list_10k_baseline_ms": p50(raw_list),
        "list_ratio": round(p50(list_ms) / p50(raw_list), 2),
        "get_1k_msgs_ms": p50(get_cold), "get_1k_msgs_cached_ms": p50(get_warm),
        "get_1k_msgs_baseline_ms": p50(raw_get), "get_ratio": round(p50(get_cold) / p50(raw_get), 2),
        "targets": {"append_p50_ms": "< 2", "list_10k_ms": "< 20", "get_1k_msgs_ms": "< 20"},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
