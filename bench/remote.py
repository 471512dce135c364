"""Remote-engine benchmark: offgrid on top of an OpenAI-compatible engine (llama-cpp-python's
own server on the default GGUF, on loopback), against calling that engine directly with the
``openai`` client, in the same run.

- ``overhead_ms``: what a streamed one-token turn through a Jupyter server's
  ``/offgrid/v1/chat/completions`` on the engine takes over the same request sent straight to the
  engine: the median of >= 30 pair differences, each pair the two requests back to back in
  alternating order (a difference of two ~30 ms medians over a few pairs mostly measured the
  machine's drift); target <= 10. Where it goes, measured the same way: ``http_ms`` (a Jupyter
  server's authenticated ``GET /offgrid/v1/health``, the floor of any route), ``engine_overhead_ms``
  (``OpenAIEngine.complete()`` in-process: our queue and stream reading), and ``route_rest_ms``
  (the rest: the request log, validation, SSE framing of our own stream).
- ``concurrent_ratio``: aggregate completion tokens/s of 4 "notebooks" each running turns on
  their own session through the Jupyter server, over 4 threads calling the engine directly with
  the same growing histories; target >= 0.95. (Completion tokens: the engine's usage through us,
  content chunks directly; llama.cpp sends one token per chunk.)
- ``server_rss_mb``: RSS of that Jupyter server (no model in it), with the RSS of a Jupyter
  server that loaded the default GGUF itself and ran a turn as the baseline.

Prints progress, then one JSON object as the last line.

    python bench/remote.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.kernels import AUTH, jupyter_server, llama_engine  # noqa: E402

from offgrid_jupyter.inference.openai_engine import OpenAIEngine  # noqa: E402

PARAMS = {"temperature": 0.0, "seed": 7}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mb(n: float) -> float:
    return round(n / (1 << 20), 1)


def direct_turn(client: OpenAI, prompt: str, tokens: int, history: list | None = None) -> int:
    """One streamed turn straight to the engine; with *history*, it is sent and extended (as a session is)."""
    messages = (history if history is not None else []) + [{"role": "user", "content": prompt}]
    stream = client.chat.completions.create(model="smollm2", messages=messages,
                                            max_tokens=tokens, stream=True, **PARAMS)
    parts = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    if history is not None:
        history += [messages[-1], {"role": "assistant", "content": "".join(parts)}]
    return len(parts)


def route_turn(api: httpx.Client, prompt: str, tokens: int) -> int:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "stream": True, **PARAMS}
    with api.stream("POST", "chat/completions", json=body) as r:
        r.raise_for_status()
        return sum(1 for line in r.iter_lines() if line.startswith("data: {") and '"content": "' in line)


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t) * 1000


def pair_differences(ours, base, pairs: int) -> list[float]:
    """*pairs* differences ours() - base() in ms, each pair back to back, the order alternating."""
    diffs = []
    for i in range(pairs):
        if i % 2:
            b = timed(base)
            o = timed(ours)
        else:
            o = timed(ours)
            b = timed(base)
        diffs.append(o - b)
    return diffs


def overheads(engine: OpenAIEngine, direct: OpenAI, api: httpx.Client, pairs: int) -> dict:
    prompt = "Write one sentence about the sea."
    one = {"role": "user", "content": prompt}
    for _ in range(3):  # warm every path
        direct_turn(direct, prompt, 1), route_turn(api, prompt, 1)
        engine.complete([one], max_tokens=1, **PARAMS)
    med = statistics.median
    base_ms = [timed(direct_turn, direct, prompt, 1) for _ in range(5)]
    route = pair_differences(lambda: route_turn(api, prompt, 1), lambda: direct_turn(direct, prompt, 1), pairs)
    in_process = pair_differences(lambda: engine.complete([one], max_tokens=1, **PARAMS),
                                  lambda: direct_turn(direct, prompt, 1), pairs)
    http = [timed(lambda: api.get("health").raise_for_status()) for _ in range(pairs)]
    return {"pairs": pairs, "direct_turn_ms": round(med(base_ms), 2),
            "overhead_ms": round(med(route), 2), "overhead_iqr_ms": [round(statistics.quantiles(route, n=4)[0], 2),
                                                                     round(statistics.quantiles(route, n=4)[2], 2)],
            "engine_overhead_ms": round(med(in_process), 2), "http_ms": round(med(http), 2),
            "route_rest_ms": round(med(route) - med(in_process) - med(http), 2)}


def aggregate(fn, workers: int, turns: int) -> float:
    """Completion tokens/s of *workers* threads each running *turns* calls of fn(worker, turn)."""
    counts = [0] * workers

    def work(i: int) -> None:
        for t in range(turns):
            counts[i] += fn(i, t)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = ap.parse_args()
    pairs, tokens, turns, rounds = (30, 16, 2, 1) if args.quick else (60, 32, 4, 3)
    out: dict = {"tokens": tokens, "turns": turns, "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp, llama_engine(n_ctx=2048) as eng:
        direct = OpenAI(base_url=eng["url"], api_key=eng["key"], max_retries=0)
        engine = OpenAIEngine(eng["url"], api_key=eng["key"], model="smollm2")
        (Path(tmp) / "remote").mkdir()
        (Path(tmp) / "local").mkdir()
        with jupyter_server(Path(tmp) / "remote", f"--OffgridApp.engine_url={eng['url']}",
                            f"--OffgridApp.engine_api_key={eng['key']}") as srv:
            api = httpx.Client(base_url=srv["url"] + "offgrid/v1/", headers=AUTH, timeout=300)
            log("overhead per turn ...")
            out.update(overheads(engine, direct, api, pairs))
            log("4 concurrent notebooks ...")
            story = "Tell me about the number {}."
            ours, plain = [], []
            for rnd in range(rounds):  # alternate the two paths, so drift in the machine hits both

                def through_us(i: int, t: int, rnd: int = rnd) -> int:
                    if t == 0:
                        api.post("sessions", json={"name": f"nb-{rnd}-{i}"}).raise_for_status()
                    body = {"message": story.format(t), "max_tokens": tokens * 2, **PARAMS}
                    r = api.post(f"sessions/nb-{rnd}-{i}/chat", json=body)
                    r.raise_for_status()
                    return r.json()["usage"]["completion_tokens"]

                ours.append(aggregate(through_us, 4, turns))
                histories: list[list] = [[] for _ in range(4)]  # the same growing prompts as the sessions'
                plain.append(aggregate(lambda i, t: direct_turn(direct, story.format(t), tokens * 2, histories[i]),
                                       4, turns))
                log(f"  round {rnd + 1}: {ours[-1]:.1f} tokens/s through us, {plain[-1]:.1f} directly")
            ours_mean, plain_mean = statistics.mean(ours), statistics.mean(plain)
            out.update({"concurrent_tokens_per_s": round(ours_mean, 2),
                        "direct_concurrent_tokens_per_s": round(plain_mean, 2),
                        "concurrent_ratio": round(ours_mean / plain_mean, 3)})
            out["server_rss_mb"] = mb(psutil.Process(srv["proc"].pid).memory_info().rss)
            api.close()
        engine.close()
        log("baseline: a Jupyter server with the model in it ...")
        with jupyter_server(Path(tmp) / "local") as srv:
            with httpx.Client(base_url=srv["url"] + "offgrid/v1/", headers=AUTH, timeout=300) as api:
                route_turn(api, "Hello.", 8)
                out["local_server_rss_mb"] = mb(psutil.Process(srv["proc"].pid).memory_info().rss)
        out["server_rss_ratio"] = round(out["server_rss_mb"] / out["local_server_rss_mb"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
