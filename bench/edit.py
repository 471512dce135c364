"""How fast an edit is: ``%offgrid edit`` on a 40-line cell, against plain chat decoding.

``edit_turn_ms`` is the median time from the command to the complete proposal (the code path of
``%offgrid edit``: the turn stored in a session, the reply constrained to ``{code, explanation}``,
parsed and compiled), on the embedded default model; ``edit_tokens_per_s`` is its decode speed.
The baseline, alternated with it in the same run, is a plain chat turn of the same session length
asked for prose (``chat_tokens_per_s``), so ``edit_decode_ratio`` is what the grammar costs; the
speed issue's prompt-lookup decoding will be measured against these figures (an edit mostly copies
the cell it changes).

Prints one JSON object as the last line.

    python bench/edit.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from offgrid_jupyter.chat.edits import Task
from offgrid_jupyter.chat.store import Store
from offgrid_jupyter.inference.engine import Engine
from offgrid_jupyter.kernel import proposals
from offgrid_jupyter.kernel.context import Context

CELL = "\n".join(
    ["import statistics", "", "def summarise(rows):", "    total = 0", "    count = 0", "    values = []"]
    + [f"    # step {i}: accumulate the field f{i}\n    total += rows[{i}]['f{i}']" for i in range(16)]
    + ["    count = len(rows)", "    values.append(total)", "    return total / count, statistics.mean(values)"])
INSTRUCTION = "rename the variable total to grand_total"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    args = ap.parse_args()
    assert len(CELL.split("\n")) == 41, len(CELL.split("\n"))
    rounds = 2 if args.quick else 5
    engine = Engine(None, tune_threads=False)
    store = Store(Path(tempfile.mkdtemp()) / "bench.sqlite3")
    context = Context(None, engine=engine, store=store)
    task = Task("edit", CELL, "In[7]", instruction=INSTRUCTION).check()
    edit_ms, edit_tps, chat_tps, tokens = [], [], [], []
    for i in range(rounds):
        log(f"round {i + 1}: edit, then chat")
        session = store.create(f"edit-{i}")
        t0 = time.perf_counter()
        outcome, proposal, _ = proposals.run(context, task, session.id, {}, params={"seed": 7})
        edit_ms.append((time.perf_counter() - t0) * 1000)
        r = outcome.result
        edit_tps.append(r.timings["tokens_per_second"])
        tokens.append(r.usage["completion_tokens"])
        chat = store.create(f"chat-{i}")
        plain = engine.generate([{"role": "user", "content": f"```python\n{CELL}\n```\nExplain this code in detail."}],
                                session_id=chat.id, max_tokens=r.usage["completion_tokens"], temperature=0.0,
                                seed=7).wait()
        chat_tps.append(plain.timings["tokens_per_second"])
    engine.close()
    med = statistics.median
    print(json.dumps({
        "bench": "edit", "quick": args.quick, "cell_lines": 41, "rounds": rounds,
        "edit_turn_ms": round(med(edit_ms), 1), "edit_completion_tokens": int(med(tokens)),
        "edit_tokens_per_s": round(med(edit_tps), 2), "chat_tokens_per_s": round(med(chat_tps), 2),
        "edit_decode_ratio": round(med(edit_tps) / med(chat_tps), 3),
        "compiles": proposal.compile_error is None}))


if __name__ == "__main__":
    main()
