"""Engine benchmark: decode speed vs plain llama-cpp-python, decode beside a busy process,
follow-up TTFT with KV reuse, and the first follow-up after a restart with the session's KV
snapshot on disk (``restart_followup_speedup``: a ~2,000-token session, time to first token of its
next turn in a new engine with the snapshot directory over one without; the model loaded first).

The baselines (bench/plain.py) run alternated with ours. ``contention_ceiling`` is what the
best thread count can give beside the busy process: plain llama.cpp with one thread there, over
plain llama.cpp alone. Where one thread decodes nearly as fast as two (memory-bound), it is near
1; where two threads are much faster (compute-bound, or two vCPUs that share a core), it is
low, and ``contention_ratio`` cannot pass it.

Prints progress, then one JSON object as the last line. ``--quick`` finishes in
about a minute on a 2-core machine; the full run uses a >= 1,500-token history.

    python bench/engine.py [--quick] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import plain  # bench/plain.py: bench/ is on sys.path when a benchmark runs

from offgrid_jupyter.inference.engine import Engine, available_cores
from offgrid_jupyter.inference.models import resolve_model

DECODE_PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
SYSTEM = {"role": "system", "content": "You are a careful assistant for data analysis."}
NEW_MESSAGE = "Given all of the above, which of the sensors should we recalibrate first?"
PARAMS = {"temperature": 0.0, "seed": 7, "top_p": 0.95, "top_k": 40, "repeat_penalty": 1.1}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def decode_ours(engine: Engine, max_tokens: int) -> float:
    """The engine's own decode rate, first to last token (the caller blocks in wait(),
    as the server and SDK do, rather than waking once per token)."""
    return engine.generate(DECODE_PROMPT, max_tokens=max_tokens, **PARAMS).wait().timings["tokens_per_second"]


@contextmanager
def busy_process():
    """One CPU-bound process beside the engine (in a notebook: the kernel computing with pandas)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # let it reach the scheduler's steady state
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


def history(n_turns: int) -> list[dict]:
    msgs = [SYSTEM]
    for i in range(n_turns):
        msgs.append({"role": "user", "content": f"Sensor {i} reported {20 + i % 7}.{i % 10} degrees at station "
                                                f"{i * 3 % 17}; the humidity was {40 + i % 30}% and the wind "
                                                f"came from the {['north', 'south', 'east', 'west'][i % 4]}."})
        msgs.append({"role": "assistant", "content": f"Noted: sensor {i} looks {'stable' if i % 3 else 'noisy'}; "
                                                     "I will keep it in mind for the calibration plan."})
    return msgs


def followup(engine: Engine, turns: int, tag: str) -> tuple[float, int, int]:
    """Turn N of session A right after a turn of session B; returns (ttft_ms, prompt, cached)."""
    hist = history(turns)
    a_prev = engine.complete(hist + [{"role": "user", "content": "Summarise in one line."}],
                             session_id=f"A-{tag}", max_tokens=24, **PARAMS)
    engine.complete([SYSTEM, {"role": "user", "content": "Unrelated: name two prime numbers."}],
                    session_id=f"B-{tag}", max_tokens=24, **PARAMS)
    turn_n = hist + [{"role": "user", "content": "Summarise in one line."},
                     {"role": "assistant", "content": a_prev.text},
                     {"role": "user", "content": NEW_MESSAGE}]
    r = engine.complete(turn_n, session_id=f"A-{tag}", max_tokens=8, **PARAMS)
    return r.timings["ttft_ms"], r.usage["prompt_tokens"], r.usage["cached_tokens"]


def restart(info, threads: int, reps: int, turns: int) -> tuple[list[float], list[float], int, int]:
    """TTFT of a session's next turn in a freshly started engine, with its snapshot on disk and
    without, alternated (each engine loads the model before the timed turn)."""
    folder = tempfile.mkdtemp(prefix="offgrid-kv-")
    hist = history(turns) + [{"role": "user", "content": "Summarise in one line."}]
    first = Engine(info.path, n_threads=threads, kv_dir=folder)
    reply = first.complete(hist, session_id="long", max_tokens=24, **PARAMS)
    first.close()  # the snapshot is on disk
    turn = hist + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": NEW_MESSAGE}]
    with_disk, without, prompt_n, cached_n = [], [], 0, 0
    for _ in range(reps):
        for disk in (True, False):
            engine = Engine(info.path, n_threads=threads, kv_dir=folder if disk else None)
            engine.complete([{"role": "user", "content": "Hi"}], max_tokens=1)  # loaded
            r = engine.complete(turn, session_id="long", max_tokens=8, **PARAMS)
            (with_disk if disk else without).append(r.timings["ttft_ms"])
            if disk:
                prompt_n, cached_n = r.usage["prompt_tokens"], r.usage["cached_tokens"]
            engine.close()
    return with_disk, without, prompt_n, cached_n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small history and fewer repeats (< 60 s)")
    ap.add_argument("--model", help="GGUF path (default: the embedded default)")
    args = ap.parse_args()
    turns, reps, decode_tokens = (12, 3, 128) if args.quick else (45, 5, 256)
    info = resolve_model(args.model)
    threads = available_cores()
    n_ctx = 4096
    t0 = time.perf_counter()

    # The baseline runs in a process of its own (bench/plain.py), alternated with ours within each
    # condition: the speed of these VMs drifts, and a ratio of two phases minutes apart measures it.
    log("decode alone: ours, then plain llama-cpp-python, alternated")
    ours = Engine(info.path, n_ctx=n_ctx, n_threads=threads)
    decode_ours(ours, 16)  # warm-up (loads the model)
    ours_tps, raw_tps, beside_tps, raw_beside, raw_beside_1 = [], [], [], [], []
    for _ in range(reps):
        ours_tps.append(decode_ours(ours, decode_tokens))
        raw_tps.append(plain.decode(str(info.path), threads, decode_tokens, DECODE_PROMPT, PARAMS))
    threads_alone = ours.tuner.state()
    log(f"decode beside one CPU-bound process, alternated (ours alone: {threads_alone})")
    with busy_process():
        for _ in range(reps):
            beside_tps.append(decode_ours(ours, decode_tokens))
            raw_beside.append(plain.decode(str(info.path), threads, decode_tokens, DECODE_PROMPT, PARAMS))
            raw_beside_1.append(plain.decode(str(info.path), 1, decode_tokens, DECODE_PROMPT, PARAMS))
    threads_beside = ours.tuner.state()
    log(f"beside: {threads_beside}")
    decode_ours(ours, 16)  # alone again: the tuner finds its way back
    f_ours, f_fresh, prompt_n, cached_n = [], [], 0, 0
    for i in range(reps):
        ttft, prompt_n, cached_n = followup(ours, turns, f"o{i}")
        f_ours.append(ttft)
        fresh = ours.complete([SYSTEM, {"role": "user", "content": NEW_MESSAGE}], session_id=f"F{i}",
                              max_tokens=8, **PARAMS)
        f_fresh.append(fresh.timings["ttft_ms"])
    ours.close()

    log("follow-up: naive (the same engine without KV snapshots)")
    naive = Engine(info.path, n_ctx=n_ctx, n_threads=threads, kv_cache_bytes=0)
    f_naive = [followup(naive, turns, f"n{i}")[0] for i in range(reps)]
    naive.close()

    log("restart: a long session's next turn in a new engine, snapshot on disk or not")
    r_disk, r_none, r_prompt, r_cached = restart(info, threads, reps, 12 if args.quick else 32)

    med = statistics.median
    result = {
        "bench": "engine", "quick": args.quick, "model": info.name, "threads": threads,
        "decode_tok_s": round(med(ours_tps), 2), "raw_decode_tok_s": round(med(raw_tps), 2),
        "decode_ratio": round(med(ours_tps) / med(raw_tps), 3),
        "beside_busy_tok_s": round(med(beside_tps), 2), "raw_beside_busy_tok_s": round(med(raw_beside), 2),
        "contention_ratio": round(med(beside_tps) / med(ours_tps), 3),
        "decode_threads_alone": threads_alone["decode_threads"],
        "decode_threads_beside": threads_beside["decode_threads"],
        "raw_contention_ratio": round(med(raw_beside) / med(raw_tps), 3),
        # the best a thread count can do here: plain llama.cpp told to use one thread beside the process
        "raw_1_thread_beside_busy_tok_s": round(med(raw_beside_1), 2),
        "contention_ceiling": round(med(raw_beside_1) / med(raw_tps), 3),
        "contention_of_ceiling": round(med(beside_tps) / med(raw_beside_1) * med(raw_tps) / med(ours_tps), 3),
        "history_tokens": prompt_n, "followup_cached_tokens": cached_n,
        "followup_ttft_ms": round(med(f_ours), 2), "naive_followup_ttft_ms": round(med(f_naive), 2),
        "fresh_ttft_ms": round(med(f_fresh), 2),
        "followup_speedup": round(med(f_naive) / med(f_ours), 2),
        "followup_vs_fresh": round(med(f_ours) / med(f_fresh), 2),
        "restart_history_tokens": r_prompt, "restart_cached_tokens": r_cached,
        "restart_followup_ttft_ms": round(med(r_disk), 2), "restart_no_disk_ttft_ms": round(med(r_none), 2),
        "restart_followup_speedup": round(med(r_none) / med(r_disk), 2),
        "targets": {"decode_ratio": ">= 0.95", "contention_ratio": ">= 0.8", "followup_speedup": ">= 5",
                    "followup_vs_fresh": "<= 2", "restart_followup_speedup": ">= 10"},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
