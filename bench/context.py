"""How long describing a variable takes (``@df``): ``offgrid_jupyter.describe`` on big frames.

``describe_1m_ms`` is the median time to describe a 1,000,000-row x 20-column DataFrame (18
float columns, a string column with nulls, an integer column); the target is under 50 ms. The
baseline, in the same run, is what a description built the obvious way costs: pandas'
``df.describe()`` plus ``df.isna().sum()`` over every row (``full_scan_1m_ms``). Also: a
10,000,000-row frame (``describe_10m_ms``: sampled, so about the same), a wide 1,000-column
frame, and the estimated tokens of each description (the budget is 400).

Prints one JSON object as the last line.

    python bench/context.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import pandas as pd

from offgrid_jupyter import describe
from offgrid_jupyter.chat.attachments import estimate_tokens


def frame(rows: int, cols: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    data = {f"x{i}": rng.random(rows) for i in range(cols - 2)}
    data["label"] = pd.Series(rng.choice(["north", "south", None], rows), dtype="string")
    data["count"] = rng.integers(0, 1000, rows)
    return pd.DataFrame(data)


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs, no 10M-row frame")
    args = ap.parse_args()
    runs = 5 if args.quick else 21
    out: dict = {"bench": "context", "quick": args.quick}
    one_m = frame(1_000_000)
    out["describe_1m_ms"] = median_ms(lambda: describe(one_m, "df"), runs)
    out["full_scan_1m_ms"] = median_ms(lambda: (one_m.describe(), one_m.isna().sum()), max(3, runs // 4))
    out["describe_1m_tokens"] = estimate_tokens(describe(one_m, "df"))
    if not args.quick:
        ten_m = frame(10_000_000, 4)
        out["describe_10m_ms"] = median_ms(lambda: describe(ten_m, "big"), runs)
        del ten_m
    wide = pd.DataFrame(np.random.default_rng(1).random((1000, 1000)))
    out["describe_wide_1000_columns_ms"] = median_ms(lambda: describe(wide, "wide"), runs)
    out["describe_wide_tokens"] = estimate_tokens(describe(wide, "wide"))
    out["targets"] = {"describe_1m_ms": "< 50", "tokens": "<= 400"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
