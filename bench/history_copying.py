"""Does a long conversation make a small model copy its earlier replies?

A session of 12 pandas questions is built with the model's own greedy replies (the prompt is the
history as the engine sends it: the GGUF's chat template over plain role/content messages, the
form every turn of a session uses). Then four unrelated questions are asked three ways: after the
whole history, after only its last 4 exchanges, and in a fresh session. ``copied`` is the share
of a reply's word 4-grams that already occur in the session's earlier replies; ``history_self_copy``
is the same for each reply of the history against the ones before it. A model that "collapses into
copying" shows high figures after the long history and low ones fresh.

Prints one JSON object as the last line.

    python bench/history_copying.py [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics

from offgrid_jupyter.inference.engine import Engine

PARAMS = {"temperature": 0.0, "seed": 7, "max_tokens": 120}
HISTORY = ["What is a pandas DataFrame?", "How do I read a CSV file with pandas?", "What does groupby do?",
           "How can I drop rows with missing values?", "What is the difference between loc and iloc?",
           "How do I plot a histogram of a column?", "What is a numpy array?", "How do I merge two DataFrames?",
           "What is a pivot table?", "How do I sort a DataFrame by a column?", "What is the median of a list?",
           "How do I save a DataFrame to parquet?"]
PROBES = ["Why is the sky blue?", "Write a Python function that reverses a string.",
          "What is the capital of France?", "Explain what a p-value means."]
WINDOW = 8  # messages: the last 4 exchanges


def grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def copied(reply: str, earlier: list[str]) -> float:
    seen = set().union(*(grams(e) for e in earlier)) if earlier else set()
    own = grams(reply)
    return round(len(own & seen) / max(1, len(own)), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a GGUF (default: the embedded default)")
    args = ap.parse_args()
    engine = Engine(args.model, tune_threads=False)

    def ask(messages: list[dict]) -> str:
        return engine.generate(messages, **PARAMS).wait().text

    messages: list[dict] = []
    replies: list[str] = []
    for question in HISTORY:
        messages.append({"role": "user", "content": question})
        replies.append(ask(messages))
        messages.append({"role": "assistant", "content": replies[-1]})
    out: dict = {"history_self_copy": [copied(replies[i], replies[:i]) for i in range(1, len(replies))]}
    for label, context in (("after_history", messages), ("after_last_4", messages[-WINDOW:]), ("fresh", [])):
        rows = [copied(ask(context + [{"role": "user", "content": p}]), replies) for p in PROBES]
        out[label] = {"copied": rows, "mean": round(statistics.mean(rows), 3)}
    out["model"] = engine.model.name
    print(json.dumps(out))


if __name__ == "__main__":
    main()
