"""The baselines: plain llama-cpp-python with nothing of ours, each run in a process of its own.

A process of its own because two live llama.cpp threads in one process slow each other (with
libgomp, each keeps an OpenMP team), and so that a baseline can be measured between two runs
of ours, alternated, rather than minutes later: on these shared VMs the speed of the same
decode drifts by a third within an hour, and a ratio of two phases apart measures the drift.

    python bench/plain.py decode PATH THREADS TOKENS MESSAGES_JSON PARAMS_JSON
    python bench/plain.py batch PATH THREADS STEPS

``decode`` prints create_chat_completion's tokens/s from the first to the last streamed token
(after a warm-up); ``batch`` prints what one ``llama_decode`` of 8 sequences gives over one of
1 sequence, in tokens/s (llama.cpp's own C API): the most continuous batching can give here.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run(*args: object) -> float:
    """Run this script with *args* in a new process; its figure."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *map(str, args)],
                         capture_output=True, text=True, check=True, timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


def decode(path: str, threads: int, tokens: int, messages: list[dict], params: dict) -> float:
    return run("decode", path, threads, tokens, json.dumps(messages), json.dumps(params))


def batch_ceiling(path: str, threads: int, steps: int) -> float:
    return run("batch", path, threads, steps)


def _decode(path: str, threads: int, tokens: int, messages: list[dict], params: dict) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)
    rate = 0.0
    for n in (16, tokens):  # the first is a warm-up
        times = [time.perf_counter() for c in llm.create_chat_completion(messages, max_tokens=n, stream=True,
                                                                          **params)
                 if c["choices"][0]["delta"].get("content")]
        rate = (len(times) - 1) / (times[-1] - times[0])
    return rate


def _batch(path: str, threads: int, steps: int) -> float:
    import llama_cpp as L

    L.llama_backend_init()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = 4096, 512, 512, 8, True
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(512, 0, 8)
    text = b"Write a long story about a lighthouse and the keeper who lived there."
    buf = (L.llama_token * 64)()
    prompt = list(buf[:L.llama_tokenize(L.llama_model_get_vocab(model), text, len(text), buf, 64, True, False)])

    def step(items: list[tuple[int, int, int]]) -> float:  # (token, position, sequence)
        batch.n_tokens = len(items)
        for i, (token, pos, seq) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, True
            batch.seq_id[i][0] = seq
        t = time.perf_counter()
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return time.perf_counter() - t

    rate = {}
    for n in (1, 8):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        for seq in range(n):
            step([(token, i, seq) for i, token in enumerate(prompt)])
        times = [step([(prompt[k % len(prompt)], len(prompt) + k, seq) for seq in range(n)]) for k in range(steps)]
        rate[n] = n / statistics.median(times[4:])
    return rate[8] / rate[1]


if __name__ == "__main__":
    kind, path, threads, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if kind == "decode":
        print(json.dumps(_decode(path, threads, n, json.loads(sys.argv[5]), json.loads(sys.argv[6]))))
    else:
        print(json.dumps(_batch(path, threads, n)))
