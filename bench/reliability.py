"""Reliability benchmark: a real `jupyter server` killed with SIGKILL mid-turn, round after round;
and how fast it still answers /health while hostile files are learned and grammar bombs arrive.

Each round starts the server on the same data directory, checks what the last
kill left (every acknowledged write present, ``PRAGMA integrity_check``, no
unanswered question a later prompt would see), then runs a streamed chat, a
loop of non-streamed chats and a loop of appends, and kills the server while
they run. The baseline is the same load with a clean shutdown (SIGTERM) instead
of the kill: restart times compare the two.

The hostile part polls /health on one server, first with nothing else running (the baseline),
then while clients learn a folder of hostile files (a Markdown heading that made the old
chunker backtrack, a 200,000-column CSV, a 15 MB one-line file, a deflate-bomb PDF, a deeply
nested notebook, 200,000 ``1+`` terms of Python) and send grammar bombs (maxLength 30,000,
a ``(a{0,999}){0,999}`` pattern, 60 tools of 29 KB): ``health_worst_ms_hostile``, target < 100.
Prints progress, then one JSON object as the last line.

    python bench/reliability.py [--quick] [--rounds N] [--hostile-only]
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
import threading
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


def hostile_files(root: Path) -> None:
    from tests.test_reliability_learning import deflate_bomb_pdf

    folder = root / "hostile"
    folder.mkdir()
    (folder / "heading.md").write_text(("#" + " " * 3200 + "a\n") * 50)
    (folder / "wide.csv").write_text(",".join(f"c{i}" for i in range(200_000)) + "\n")
    (folder / "oneline.txt").write_text("word " * 3_000_000)
    (folder / "bomb.pdf").write_bytes(deflate_bomb_pdf(264))
    (folder / "deep.ipynb").write_text('{"cells": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (folder / "terms.py").write_text("x = " + "1+" * 200_000 + "1\n")


BOMBS = [
    {"messages": [{"role": "user", "content": "Write."}], "max_tokens": 4, "response_format": {
        "type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "string", "maxLength": 30000}}}},
    {"messages": [{"role": "user", "content": "Write."}], "max_tokens": 4, "response_format": {
        "type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "string",
                                                                      "pattern": "^(a{0,999}){0,999}$"}}}},
    {"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4, "tools": [
        {"type": "function", "function": {"name": f"t{i}", "parameters": {"type": "object", "properties": {
            f"p{j}": {"type": "string", "description": "d" * 200} for j in range(120)}}}} for i in range(60)]},
]


def hostile(seconds: float) -> dict:
    """/health latency idle, then while hostile learns and grammar bombs run (alternated with idle)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hostile_files(root)
        with jupyter_server(root, "--OffgridApp.n_ctx=1024", "--OffgridApp.max_body_bytes=4194304") as srv:
            base = srv["url"] + "offgrid/v1/"
            with httpx.Client(base_url=base, headers=AUTH, timeout=60) as api:
                api.get("health")
                api.post("chat/completions", json={"messages": [{"role": "user", "content": "Hi."}],
                                                   "max_tokens": 2})  # the model in memory, as in use

                def poll(until: float) -> list[float]:
                    times = []
                    while time.perf_counter() < until:
                        t = time.perf_counter()
                        assert api.get("health").status_code == 200
                        times.append((time.perf_counter() - t) * 1000)
                        time.sleep(0.01)
                    return times

                idle, loaded, learns, bombs = [], [], 0, 0
                for n in range(3):  # alternate: the VM's speed drifts
                    idle += poll(time.perf_counter() + seconds / 6)
                    stop = threading.Event()
                    counts = {"learns": 0, "bombs": 0}

                    def learn() -> None:
                        with httpx.Client(base_url=base, headers=AUTH, timeout=300) as c:
                            while not stop.is_set():
                                c.post("collections", json={"name": f"h{counts['learns']}", "paths": ["hostile"]})
                                counts["learns"] += 1

                    def bomb() -> None:
                        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as c:
                            while not stop.is_set():
                                assert c.post("chat/completions", json=BOMBS[counts["bombs"] % len(BOMBS)]
                                              ).status_code == 400
                                counts["bombs"] += 1

                    threads = [threading.Thread(target=f) for f in (learn, bomb, bomb)]
                    for t in threads:
                        t.start()
                    loaded += poll(time.perf_counter() + seconds / 3)
                    stop.set()
                    for t in threads:
                        t.join()
                    learns, bombs = learns + counts["learns"], bombs + counts["bombs"]
                    log(f"hostile round {n + 1}/3: worst /health {max(loaded):.1f} ms")
    return {"health_worst_ms_idle": round(max(idle), 2), "health_p50_ms_idle": round(statistics.median(idle), 2),
            "health_worst_ms_hostile": round(max(loaded), 2),
            "health_p50_ms_hostile": round(statistics.median(loaded), 2),
            "health_requests_hostile": len(loaded), "hostile_learns": learns, "grammar_bombs_refused": bombs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 rounds (about a minute)")
    ap.add_argument("--rounds", type=int, help="kill -9 rounds (default 200; --quick 20)")
    ap.add_argument("--hostile-only", action="store_true", help="only the /health latency under hostile load")
    args = ap.parse_args()
    rounds = args.rounds or (20 if args.quick else 200)
    t0 = time.perf_counter()
    out: dict = {"bench": "reliability", "quick": args.quick}
    if not args.hostile_only:
        killed = run(rounds, kill=True)
        clean = run(max(5, rounds // 10), kill=False)
        out.update(killed, clean_restart_s_p50=clean["restart_s_p50"],
                   restart_vs_clean=round(killed["restart_s_p50"] / clean["restart_s_p50"], 3))
    out.update(hostile(30.0 if args.quick else 90.0))
    out.update(targets={"lost": 0, "integrity_check_failures": 0, "unanswered_turns_after_repair": 0,
                        "health_worst_ms_hostile": "< 100"},
               elapsed_s=round(time.perf_counter() - t0, 1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
