"""Reliability benchmark: a real `jupyter server` killed with SIGKILL mid-turn, round after round.

Each round starts the server on the same data directory, checks what the last
kill left (every acknowledged write present, ``PRAGMA integrity_check``, no
unanswered question a later prompt would see), then runs a streamed chat, a
loop of non-streamed chats and a loop of appends, and kills the server while
they run. The baseline is the same load with a clean shutdown (SIGTERM) instead
of the kill: restart times compare the two. Prints progress, then one JSON
object as the last line.

    python bench/reliability.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.kernels import AUTH, Load, jupyter_server, unanswered  # noqa: E402

SESSIONS = ("turns", "turns-2", "appends")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(rounds: int, kill: bool) -> dict:
    acked: list[str] = []
    lost = integrity_failures = unanswered_after = interrupted = 0
    restart_s: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(rounds):
            t0 = time.perf_counter()
            with jupyter_server(root, "--OffgridApp.n_ctx=1024") as srv:
                with httpx.Client(base_url=srv["url"] + "offgrid/v1/", headers=AUTH, timeout=60) as api:
                    assert api.get("health").status_code == 200
                    restart_s.append(time.perf_counter() - t0)
                    if i == 0:
                        for name in SESSIONS:
                            api.post("sessions", json={"name": name})
                    seen = {name: api.get(f"sessions/{name}").json()["messages"] for name in SESSIONS}
                    ids = {m["id"] for messages in seen.values() for m in messages}
                    lost += len(set(acked) - ids)
                    unanswered_after += sum(len(unanswered(seen[name])) for name in ("turns", "turns-2"))
                    load = Load(srv["url"] + "offgrid/v1/")
                    load.tokens.wait(60)
                    for _ in range(3):
                        load.appended.acquire(timeout=60)
                    os.kill(srv["proc"].pid, signal.SIGKILL if kill else signal.SIGTERM)
                    load.join()
                    acked += load.acked
            conn = sqlite3.connect(root / "home" / "offgrid.sqlite3")
            integrity_failures += conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok"
            interrupted = conn.execute("SELECT count(*) FROM messages WHERE json_extract(metadata, '$.interrupted') "
                                       "IS NOT NULL").fetchone()[0]
            conn.close()
            if (i + 1) % 10 == 0:
                log(f"{'kill -9' if kill else 'SIGTERM'}: {i + 1}/{rounds} rounds, {len(acked)} acknowledged, "
                    f"{lost} lost")
    return {"rounds": rounds, "acknowledged_writes": len(acked), "lost": lost,
            "integrity_check_failures": integrity_failures, "unanswered_turns_after_repair": unanswered_after,
            "interrupted_questions_marked": interrupted,
            "restart_s_p50": round(statistics.median(restart_s), 3), "restart_s_max": round(max(restart_s), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 rounds (about a minute)")
    ap.add_argument("--rounds", type=int, help="kill -9 rounds (default 200; --quick 20)")
    args = ap.parse_args()
    rounds = args.rounds or (20 if args.quick else 200)
    t0 = time.perf_counter()
    killed = run(rounds, kill=True)
    clean = run(max(5, rounds // 10), kill=False)
    print(json.dumps({
        "bench": "reliability", "quick": args.quick, **killed,
        "clean_restart_s_p50": clean["restart_s_p50"],
        "restart_vs_clean": round(killed["restart_s_p50"] / clean["restart_s_p50"], 3),
        "targets": {"lost": 0, "integrity_check_failures": 0, "unanswered_turns_after_repair": 0},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
