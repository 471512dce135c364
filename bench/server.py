"""Server benchmark: a real `jupyter server` with the extension, and kernels it starts.

- ``http_overhead_ms``: (wall time of a chat through the route - the generation's own
  time) minus (the same for ``engine.complete()`` in-process); target <= 10;
- ``route_p50_ms_during_generation``: GET generation/status, sessions and health while
  a long turn streams (baseline: the same routes idle); target < 50;
- ``kernel_extra_rss_mb``: RSS of a kernel that shares the server's model, after a
  turn, minus the same kernel before ``%load_ext``; target < 40;
- ``shared_vs_separate_rss``: server + 3 sharing kernels that each ran a turn, over
  3 kernels that each loaded the model themselves and ran a turn; target <= 0.75.

Prints progress, then one JSON object as the last line.

    python bench/server.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.kernels import TOKEN, ServerKernel, jupyter_server  # noqa: E402

from offgrid_jupyter import Client  # noqa: E402
from offgrid_jupyter.inference.engine import Engine  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper."
PARAMS = {"temperature": 0.0, "seed": 7}
RSS = "import os, psutil; print(psutil.Process(os.getpid()).memory_info().rss)"
TURN = "%%offgrid -t 0 --seed 7 -n 32\nSay something about the sea."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mb(n: float) -> float:
    return round(n / (1 << 20), 1)


def timed_ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def http_overhead(client: Client, reps: int, tokens: int) -> tuple[float, float]:
    client.sessions.create("bench-overhead")
    route, local = [], []
    for _ in range(reps):
        t = time.perf_counter()
        out = client.sessions.chat("bench-overhead", PROMPT, max_tokens=tokens, **PARAMS)
        route.append((time.perf_counter() - t) * 1000 - out["timings"]["total_ms"])
    engine = Engine()
    engine.complete([{"role": "user", "content": "Hi."}], max_tokens=2)  # load
    for _ in range(reps):
        t = time.perf_counter()
        result = engine.complete([{"role": "user", "content": PROMPT}], session_id="b", max_tokens=tokens, **PARAMS)
        local.append((time.perf_counter() - t) * 1000 - result.timings["total_ms"])
    engine.close()
    return statistics.median(route), statistics.median(local)


def routes_during_generation(client: Client, samples: int) -> tuple[list[float], list[float]]:
    routes = [lambda: client.generation_status(), lambda: client.sessions.list(limit=20), lambda: client.health()]
    idle = [timed_ms(routes[i % 3]) for i in range(samples)]
    client.sessions.create("bench-busy")
    started = threading.Event()

    def long_turn():
        for kind, _ in client.sessions.stream("bench-busy", "Write a long essay about the ocean.", max_tokens=2000,
                                              **PARAMS):
            if kind == "token":
                started.set()

    worker = threading.Thread(target=long_turn)
    worker.start()
    started.wait(60)
    busy = []
    for i in range(samples):
        if client.generation_status()["generating_session_id"] is None:
            break
        busy.append(timed_ms(routes[i % 3]))
    worker.join()
    return idle, busy


async def kernels_rss(base: str, shared: bool, n: int) -> list[tuple[int, int]]:
    """Start n kernels, each runs a turn; return (rss before, rss after) while all are alive."""
    kernels = [ServerKernel(base) for _ in range(n)]
    out = []
    for k in kernels:
        await k.__aenter__()
    try:
        for k in kernels:
            before = int(await k.printed(RSS))
            await k.run("%load_ext offgrid_jupyter")
            if not shared:
                await k.run("%offgrid disconnect")
            reply = await k.run(TURN)
            assert reply[-1]["content"]["status"] == "ok", reply[-1]
            out.append((before, int(await k.printed(RSS))))
    finally:
        for k in kernels:
            await k.__aexit__(None, None, None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps, tokens, samples = (3, 32, 60) if args.quick else (7, 128, 300)
    t0 = time.perf_counter()
    # only our extension: other installed server extensions (JupyterLab, Notebook 7, jupyter-lsp,
    # which the test extra installs) would add their own memory to the server's figure
    others = [f"--ServerApp.jpserver_extensions={name}=False"
              for name in ("jupyterlab", "notebook", "jupyter_lsp", "notebook_shim", "jupyter_server_terminals")]
    with jupyter_server(Path(tempfile.mkdtemp(prefix="offgrid-bench-")), *others) as srv:
        client = Client(srv["url"] + "offgrid/v1/", max_retries=0)
        client.http.headers["Authorization"] = f"token {TOKEN}"
        client.chat("Hi.", max_tokens=2)  # the server loads its model
        log("http overhead")
        route_over, local_over = http_overhead(client, reps, tokens)
        log("routes while generating")
        idle, busy = routes_during_generation(client, samples)
        log("kernel RSS (shared)")
        shared = asyncio.run(kernels_rss(srv["url"], True, 3))
        server_rss = psutil.Process(srv["proc"].pid).memory_info().rss
        log("kernel RSS (separate)")
        separate = asyncio.run(kernels_rss(srv["url"], False, 3))
        client.close()

    med = statistics.median
    extra = med([after - before for before, after in shared])
    shared_total = server_rss + sum(after for _, after in shared)
    separate_total = sum(after for _, after in separate)
    print(json.dumps({
        "bench": "server", "quick": args.quick, "reps": reps, "tokens": tokens,
        "http_overhead_ms": round(route_over - local_over, 2), "route_overhead_ms": round(route_over, 2),
        "in_process_overhead_ms": round(local_over, 2),
        "route_p50_ms_during_generation": round(med(busy), 2),
        "route_p95_ms_during_generation": round(statistics.quantiles(busy, n=20)[-1], 2),
        "route_p50_ms_idle": round(med(idle), 2), "busy_samples": len(busy),
        "kernel_extra_rss_mb": mb(extra),
        "server_rss_mb": mb(server_rss), "shared_kernels_rss_mb": [mb(a) for _, a in shared],
        "separate_kernels_rss_mb": [mb(a) for _, a in separate],
        "shared_vs_separate_rss": round(shared_total / separate_total, 3),
        "targets": {"http_overhead_ms": "<= 10", "route_p50_ms_during_generation": "< 50",
                    "kernel_extra_rss_mb": "< 40", "shared_vs_separate_rss": "<= 0.75"},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }))


if __name__ == "__main__":
    main()
