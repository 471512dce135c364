"""Magic benchmark, in a real kernel: what %%offgrid costs over the bare engine,
and how fast the Stop button stops a generation.

- ``cell_overhead_ms``: wall time of a streamed ``%%offgrid`` cell minus the
  generation's own time, against the same for ``engine.complete()`` run as a
  plain cell in the same kernel (the baseline);
- ``magic_decode_tok_s`` vs ``engine_decode_tok_s`` (ratio target >= 0.97: the
  throttled display must not slow decoding);
- ``interrupt_ms``: kernel interrupt to the cell's end while tokens stream
  (target <= 500).

Prints progress, then one JSON object as the last line.

    python bench/magics.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from jupyter_client.manager import start_new_kernel

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(kc, code: str, on_message=None) -> tuple[dict, list[dict], float]:
    """Execute a cell; return (reply, iopub messages, wall seconds from request to idle)."""
    start = time.perf_counter()
    msg_id = kc.execute(code)
    messages = []
    while True:
        m = kc.get_iopub_msg(timeout=300)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(m)
        if on_message:
            on_message(m)
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            wall = time.perf_counter() - start
            break
    reply = kc.get_shell_msg(timeout=60)
    return reply, messages, wall


def final_meta(messages: list[dict]) -> dict:
    shown = [m for m in messages if m["msg_type"] in ("display_data", "update_display_data")]
    return shown[-1]["content"]["metadata"]["offgrid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    tokens, reps = (64, 2) if args.quick else (256, 5)
    t0 = time.perf_counter()
    home = tempfile.mkdtemp(prefix="offgrid-bench-")
    env = {**{k: v for k, v in os.environ.items() if k != "JPY_SESSION_NAME"}, "OFFGRID_HOME": home}
    km, kc = start_new_kernel(kernel_name="python3", env=env, startup_timeout=60)
    try:
        run(kc, "%load_ext offgrid_jupyter")
        run(kc, "%%offgrid -n 4 --no-history\nHi.")  # load the model
        params = f"max_tokens={tokens}, temperature=0.0, seed=7"
        cell = f"%%offgrid -t 0 --seed 7 -n {tokens} --no-history\n{PROMPT}"
        direct = ("_e = get_ipython().magics_manager.registry['OffgridMagics'].context.engine\n"
                  f"_r = _e.complete([{{'role': 'user', 'content': {PROMPT!r}}}], {params})\n"
                  "print(_r.timings['total_ms'], _r.timings['tokens_per_second'])")
        magic_over, magic_tps, base_over, base_tps = [], [], [], []
        for i in range(reps):
            log(f"cell overhead {i + 1}/{reps}")
            _, messages, wall = run(kc, cell)
            meta = final_meta(messages)
            magic_over.append(wall * 1000 - meta["timings"]["total_ms"])
            magic_tps.append(meta["timings"]["tokens_per_second"])
            _, messages, wall = run(kc, direct)
            total_ms, tps = map(float, next(m for m in messages if m["msg_type"] == "stream")["content"]["text"].split())
            base_over.append(wall * 1000 - total_ms)
            base_tps.append(tps)

        latencies = []
        for i in range(reps):
            log(f"interrupt {i + 1}/{reps}")
            state: dict = {}

            def interrupt(m, state=state):
                if (m["msg_type"] == "update_display_data" and "at" not in state
                        and m["content"]["data"].get("text/markdown", "").endswith("▌")):
                    state["at"] = time.perf_counter()
                    km.interrupt_kernel()
                if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" and "at" in state:
                    state["idle"] = time.perf_counter()

            reply, _, _ = run(kc, "%%offgrid -t 0 -n 400 --no-history\nWrite a long essay about maps.", interrupt)
            assert reply["content"].get("ename") == "Interrupted", reply["content"]
            latencies.append((state["idle"] - state["at"]) * 1000)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

    med = statistics.median
    print(json.dumps({
        "bench": "magics", "quick": args.quick, "tokens": tokens, "reps": reps,
        "cell_overhead_ms": round(med(magic_over), 1), "baseline_cell_overhead_ms": round(med(base_over), 1),
        "magic_decode_tok_s": round(med(magic_tps), 2), "engine_decode_tok_s": round(med(base_tps), 2),
        "decode_ratio": round(med(magic_tps) / med(base_tps), 3),
        "interrupt_ms_p50": round(med(latencies), 1), "interrupt_ms_max": round(max(latencies), 1),
        "targets": {"decode_ratio": ">= 0.97", "interrupt_ms_max": "<= 500"},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
