"""Concurrency benchmark: continuous batching vs one request at a time, on the same engine.

- aggregate decode tokens/s with 1, 2, 4 and 8 concurrent sessions (128 tokens each):
  the engine with ``n_parallel`` = 8 (and the default) against the same engine with
  ``n_parallel=1`` (``aggregate_speedup_8``), and the most batching can give on this machine
  now: one ``llama_decode`` of 8 sequences over one of 1, with llama.cpp's own API in a process
  of its own (``raw_batch_speedup_8``; ``aggregate_speedup_8_of_raw`` is ours over it). Where
  decoding one token is already compute-bound (a small model on few cores), the ceiling is low;
  where it is memory-bound, batching gains;
- single-stream decode against plain llama-cpp-python (``single_stream_ratio``, each side
  alone in the process: two live llama.cpp threads slow each other);
- 8 streams, one of which sends a ~2,000-token prompt: TTFT p50/p95, and the longest gap
  between two tokens of the other streams while it is read (``max_stall_ms``);
- follow-up TTFT of 4 interleaved sessions with ~1,500-token histories, against the same
  engine without KV snapshots (``followup_speedup``).

Prints progress, then one JSON object as the last line. ``--quick`` runs in about a minute.

    python bench/concurrency.py [--quick] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import plain  # bench/plain.py: bench/ is on sys.path when a benchmark runs

from offgrid_jupyter.inference.engine import (
    PREFILL_STALL,
    Engine,
    available_cores,
    default_parallel,
)
from offgrid_jupyter.inference.models import resolve_model

PARAMS = {"temperature": 0.0, "seed": 7, "repeat_penalty": 1.1}
STORY = "Write a long story about lighthouse number {i} and the keeper who lived there."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Stream:
    """One generation's token times, as its consumer would see them."""

    def __init__(self, gen):
        self.gen, self.times, self.submitted = gen, [], time.perf_counter()
        gen.listen(lambda kind, _p: kind == "token" and self.times.append(time.perf_counter()))

    @property
    def ttft_ms(self) -> float:
        return (self.times[0] - self.submitted) * 1000

    def gaps_ms(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        return [(b - a) * 1000 for a, b in zip(self.times, self.times[1:]) if start <= b <= end]


def aggregate(engine: Engine, streams: int, tokens: int) -> float:
    """Decode tokens/s of *streams* concurrent sessions: their completion tokens over the span from
    the first token of any of them to the last token of all (prompt reading before it excluded)."""
    runs = [Stream(engine.generate(user(STORY.format(i=i)), session_id=f"agg-{streams}-{i}-{time.time_ns()}",
                                   max_tokens=tokens, **PARAMS)) for i in range(streams)]
    results = [s.gen.wait() for s in runs]
    first, last = min(s.times[0] for s in runs), max(s.times[-1] for s in runs)
    return sum(r.usage["completion_tokens"] for r in results) / (last - first)


def history(turns: int, tag: str) -> list[dict]:
    msgs = [{"role": "system", "content": "You are a careful assistant for data analysis."}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"[{tag}] Sensor {i} reported {20 + i % 7}.{i % 10} degrees at station "
                                             f"{i * 3 % 17}; humidity {40 + i % 30}% and wind from the "
                                             f"{['north', 'south', 'east', 'west'][i % 4]}."},
                 {"role": "assistant", "content": f"Noted: sensor {i} looks {'stable' if i % 3 else 'noisy'}."}]
    return msgs


def followups(engine: Engine, turns: int, tag: str) -> tuple[list[float], int, int]:
    """4 sessions with long histories, then their follow-ups interleaved (all four at once)."""
    first = [engine.generate(history(turns, f"{tag}{k}") + [{"role": "user", "content": "Summarise in a line."}],
                             session_id=f"{tag}-{k}", max_tokens=16, **PARAMS) for k in range(4)]
    previous = [g.wait() for g in first]
    follow = [engine.generate(history(turns, f"{tag}{k}") + [
        {"role": "user", "content": "Summarise in a line."}, {"role": "assistant", "content": previous[k].text},
        {"role": "user", "content": "Which sensor should we recalibrate first?"}],
        session_id=f"{tag}-{k}", max_tokens=8, **PARAMS) for k in range(4)]
    results = [g.wait() for g in follow]
    return [r.timings["ttft_ms"] for r in results], results[0].usage["prompt_tokens"], min(
        r.usage["cached_tokens"] for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats (about a minute)")
    ap.add_argument("--model", help="GGUF path (default: the embedded default)")
    ap.add_argument("--parts", default="aggregate,single,stall,followup",
                    help="which measurements to run (comma-separated; default: all)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    tokens, reps, turns = (48, 1, 12) if args.quick else (128, 3, 45)
    info = resolve_model(args.model)
    threads = available_cores()
    t0 = time.perf_counter()
    med = statistics.median
    counts = (1, 2, 4, 8)

    result: dict = {"bench": "concurrency", "quick": args.quick, "model": info.name, "threads": threads,
                    "tokens_per_stream": tokens, "default_n_parallel": default_parallel(4096)}
    # one engine at a time in the process (each side alone: see bench/engine.py)
    if "aggregate" in parts:
        curves: dict[str, dict[int, float]] = {}
        for label, n_parallel in (("serial", 1), ("batched", 8), ("default", None)):
            log(f"aggregate decode, n_parallel={n_parallel}")
            eng = Engine(info.path, n_ctx=4096, n_threads=threads, n_parallel=n_parallel)
            eng.complete(user("Hi."), max_tokens=2)
            curves[label] = {n: round(med([aggregate(eng, n, tokens) for _ in range(reps)]), 2) for n in counts}
            eng.close()
        result.update(
            aggregate_tok_s={label: {str(n): v for n, v in curve.items()} for label, curve in curves.items()},
            aggregate_speedup_8=round(curves["batched"][8] / curves["serial"][8], 3),
            aggregate_speedup_8_default=round(curves["default"][8] / curves["serial"][8], 3))
        log("llama.cpp alone: one decode of 8 sequences against one of 1")
        ceiling = plain.batch_ceiling(str(info.path), threads, tokens)
        result.update(raw_batch_speedup_8=round(ceiling, 3),
                      aggregate_speedup_8_of_raw=round(result["aggregate_speedup_8"] / ceiling, 3))

    if "single" in parts:
        log("single stream: ours (default n_parallel) and plain llama-cpp-python, alternated")
        ours_single, plain_single = [], []
        for rep in range(reps + 1):
            eng = Engine(info.path, n_ctx=4096, n_threads=threads)
            eng.complete(user("Hi."), max_tokens=2)
            ours_single.append(eng.complete(user(STORY.format(i=rep)), session_id=f"single-{rep}",
                                            max_tokens=tokens * 2, **PARAMS).timings["tokens_per_second"])
            eng.close()
            plain_single.append(plain.decode(str(info.path), threads, tokens * 2, user(STORY.format(i=rep)), PARAMS))
        result.update(single_stream_tok_s=round(med(ours_single), 2), plain_single_tok_s=round(med(plain_single), 2),
                      single_stream_ratio=round(med(ours_single) / med(plain_single), 3))

    if "stall" in parts:
        log("8 streams, one with a ~2,000-token prompt")
        # a context that holds all eight at once: each request reserves its prompt and its max_tokens
        eng = Engine(info.path, n_ctx=8192, n_threads=threads, n_parallel=8)
        eng.complete(user("Hi."), max_tokens=2)
        shorts = [Stream(eng.generate(user(STORY.format(i=i)), session_id=f"stall-{i}", max_tokens=tokens * 4,
                                      **{**PARAMS, "repeat_penalty": 1.3})) for i in range(7)]
        while not all(len(s.times) >= 8 for s in shorts):  # all seven decoding for a while
            time.sleep(0.01)
        notes = " ".join(f"Note {i}: the reading at station {i % 17} was steady at noon." for i in range(160))
        long = Stream(eng.generate(user("Summarise these notes: " + notes), session_id="stall-long", max_tokens=8,
                                   **PARAMS))
        long_result = long.gen.wait()
        read_start, read_end = long.submitted, long.times[0] if long.times else time.perf_counter()
        chunk = eng._batcher.chunk
        for s in shorts:
            s.gen.cancel()
            s.gen.wait()
        stall = max((max(s.gaps_ms(read_start, read_end), default=0.0) for s in shorts), default=0.0)
        before = [g for s in shorts for g in s.gaps_ms(min(s.times[1] for s in shorts), read_start)]
        ttfts = sorted([s.ttft_ms for s in shorts] + [long.ttft_ms])
        eng.close()
        result.update(ttft_ms_p50_8=round(ttfts[len(ttfts) // 2], 1), ttft_ms_p95_8=round(ttfts[-1], 1),
                      long_prompt_ttft_ms=round(long.ttft_ms, 1),
                      long_prompt_tokens=long_result.usage["prompt_tokens"], max_stall_ms=round(stall, 1),
                      decode_gap_ms_p50=round(med(before or [0.0]), 1), stall_budget_ms=PREFILL_STALL * 1000,
                      prompt_chunk_tokens=chunk)

    if "followup" in parts:
        log("follow-ups of 4 interleaved sessions: with KV snapshots, then without")
        ours = Engine(info.path, n_ctx=8192, n_threads=threads, n_parallel=4)
        f_ours, history_tokens, cached = followups(ours, turns, "kv")
        ours.close()
        naive = Engine(info.path, n_ctx=8192, n_threads=threads, n_parallel=4, kv_cache_bytes=0)
        f_naive = followups(naive, turns, "naive")[0]  # a session whose cells were freed re-evaluates its history
        naive.close()
        result.update(followup_history_tokens=history_tokens, followup_cached_tokens=cached,
                      followup_ttft_ms=round(med(f_ours), 1), naive_followup_ttft_ms=round(med(f_naive), 1),
                      followup_speedup=round(med(f_naive) / med(f_ours), 2))

    result["targets"] = {"aggregate_speedup_8": ">= 1.5", "single_stream_ratio": ">= 0.95", "followup_speedup": ">= 5",
                         "max_stall_ms": f"about the stall budget ({PREFILL_STALL * 1000:.0f} ms) and a decode step"}
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
