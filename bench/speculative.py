"""Prompt-lookup decoding: is the output the same, and how much faster do copying replies decode?

- ``greedy_identical``: 50 prompts (code to rewrite, text to quote, lists, free questions) at
  temperature 0, each answered by an engine that drafts and by one that does not; true when every
  reply is token for token the same (``identical`` counts them).
- ``edit_decode_speedup``: a 60-line cell rewritten with a small change (a chat turn at temperature
  0 asking for the code only: ``%offgrid edit``'s constrained path fails on a cell this long with
  the 135M model, which writes prose into the code field); decode tokens/s with drafting over
  without, alternated on one engine (target >= 1.8).
- ``rag_decode_speedup``: an answer quoting retrieved text, the same way.
- ``chat_decode_ratio``: free chat at the default temperature (0.2): drafting over not (target >= 0.97).

Also printed: the share of drafted tokens kept in each kind, and the machine's ceiling for
drafting: ``row_cost`` (a decode step of 1 + 8 rows of one sequence over a step of 1 row: what a
draft of 8 costs; the speedup cannot pass 9 / row_cost).

Prints one JSON object as the last line.

    python bench/speculative.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from offgrid_jupyter.inference.engine import Engine

CELL = "\n".join(
    ["import pandas as pd", "", "def load(path):", "    frame = pd.read_csv(path)", "    totals = {}"]
    + [f"    totals['c{i}'] = frame['c{i}'].sum()  # column {i}" for i in range(53)]
    + ["    frame = frame.dropna()", "    return frame, totals"])
EDIT = [{"role": "user", "content": f"```python\n{CELL}\n```\nRewrite this cell with the variable frame renamed "
                                    "to df. Answer with the whole code only."}]
PASSAGE = (
    "The Tamar valley mining district produced copper and arsenic through the nineteenth century. "
    "Devon Great Consols, opened in 1844, was for a time the richest copper mine in Europe. "
    "By 1870 its arsenic works supplied half of the world's demand, used in dyes and insecticides. "
    "The mine closed in 1903, and the spoil heaps remain among the most contaminated land in Britain. "
    "Restoration began in 2005, when the district became part of a World Heritage Site.")
QUOTE = [{"role": "system", "content": f"Answer from this retrieved text, quoting it.\n\n[1] {PASSAGE}"},
         {"role": "user", "content": "Quote, word for word, what the text says about Devon Great Consols "
                                     "and its arsenic works."}]
FREE = ["Write a short poem about the sea.", "Why do cats purr?", "Give three tips for learning to cook.",
        "Describe a walk in a forest in autumn.", "What makes a good teacher?"]


def identity_prompts() -> list[list[dict]]:
    code = "\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(12))
    out = []
    for i in range(50):
        kind = i % 5
        if kind == 0:
            text = f"Rewrite this code with type hints:\n```python\n{code}\n```\nVariant {i}."
        elif kind == 1:
            text = f"Quote the second sentence of this text exactly.\n\n{PASSAGE}\n(request {i})"
        elif kind == 2:
            text = f"List the numbers from {i} to {i + 25}, one per line."
        elif kind == 3:
            text = f"Summarise in two sentences: {PASSAGE} (note {i})"
        else:
            text = f"{FREE[i // 5 % len(FREE)]} ({i})"
        out.append([{"role": "user", "content": text}])
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def identical(n: int) -> tuple[int, int]:
    """Same replies with drafting and without: each mode on a fresh engine, prompts in the same order."""
    prompts = identity_prompts()[:n]
    replies = {}
    for lookup in (False, True):
        engine = Engine(None, tune_threads=False, prompt_lookup=lookup)
        replies[lookup] = [engine.complete(p, max_tokens=128, temperature=0.0, seed=3).text for p in prompts]
        engine.close()
    same = sum(a == b for a, b in zip(replies[False], replies[True]))
    return same, len(prompts)


def row_cost(engine: Engine) -> float:
    """A decode step of 9 rows of one sequence over a step of one row, on the engine's context."""
    llm = engine._load(engine.model)
    tokens = llm.tokenize(PASSAGE * 4)[:300]
    llm.seq_rm(0)
    llm.clear()
    llm.add(tokens[:200], 0, 0, True)
    llm.decode()
    times = {1: [], 9: []}
    for _ in range(20):
        for rows in (1, 9):
            llm.clear()
            llm.add(tokens[200:200 + rows], 200, 0, True, every=True)
            t = time.perf_counter()
            llm.decode()
            times[rows].append(time.perf_counter() - t)
            llm.seq_rm(0, 200)
    llm.seq_rm(0)
    return statistics.median(times[9]) / statistics.median(times[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 identity prompts and 2 rounds instead of 50 and 4")
    args = ap.parse_args()
    assert len(CELL.split("\n")) == 60, len(CELL.split("\n"))
    rounds = 2 if args.quick else 4
    log("identity")
    same, total = identical(10 if args.quick else 50)
    engine = Engine(None, tune_threads=False)
    tps: dict[str, dict[bool, list[float]]] = {k: {True: [], False: []} for k in ("edit", "rag", "chat")}
    kept: dict[str, list[float]] = {k: [] for k in tps}
    edit_tokens = []
    for i in range(rounds):
        for lookup in (False, True) if i % 2 == 0 else (True, False):
            engine.prompt_lookup = lookup
            log(f"round {i + 1}: drafting {lookup}")
            for kind, messages, params in (("edit", EDIT, {"temperature": 0.0, "max_tokens": 900}),
                                           ("rag", QUOTE, {"temperature": 0.0, "max_tokens": 160}),
                                           ("chat", [{"role": "user", "content": FREE[i % len(FREE)]}],
                                            {"temperature": 0.2, "seed": i, "max_tokens": 160})):
                before = engine.stats()["drafts"]
                r = engine.generate(messages, **params).wait()
                tps[kind][lookup].append(r.timings["tokens_per_second"])
                if kind == "edit":
                    edit_tokens.append(r.usage["completion_tokens"])
                after = engine.stats()["drafts"]
                if lookup:
                    kept[kind].append((after["accepted"] - before["accepted"])
                                      / max(1, after["drafted"] - before["drafted"]))
    ceiling = row_cost(engine)
    engine.close()
    med = statistics.median

    def ratio(kind: str) -> float:
        return round(med(tps[kind][True]) / med(tps[kind][False]), 3)

    print(json.dumps({
        "bench": "speculative", "quick": args.quick, "rounds": rounds,
        "greedy_identical": same == total, "identical": f"{same}/{total}",
        "edit_decode_speedup": ratio("edit"), "rag_decode_speedup": ratio("rag"), "chat_decode_ratio": ratio("chat"),
        "edit_tokens_per_s": {"drafting": round(med(tps["edit"][True]), 1), "plain": round(med(tps["edit"][False]), 1)},
        "rag_tokens_per_s": {"drafting": round(med(tps["rag"][True]), 1), "plain": round(med(tps["rag"][False]), 1)},
        "chat_tokens_per_s": {"drafting": round(med(tps["chat"][True]), 1), "plain": round(med(tps["chat"][False]), 1)},
        "kept": {k: round(med(v), 3) for k, v in kept.items() if v},
        "edit_completion_tokens": int(med(edit_tokens)),
        "row_cost_9_over_1": round(ceiling, 3), "speedup_ceiling_8_drafts": round(9 / ceiling, 2)}))


if __name__ == "__main__":
    main()
