"""The store's tables as typed pandas DataFrames: sessions, messages, and recorded requests.

Building one Python object per cell is the whole cost of a frame, so the requests frame reads
plain tuples, no JOIN and no ORDER BY, fetches labels as small integer codes, and derives names,
decode times and order in pandas (100,000 requests in ~220 ms, against ~320 ms for
``pd.read_sql_query``, untyped). pandas is imported when a frame is made, never to load the store.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..validation import SESSION_ID_RE
from .records import ROLES

if TYPE_CHECKING:
    from .store import Store

FINISH_REASONS = ["stop", "length", "cancelled", "error"]


INT_COLUMNS = ("prompt_tokens", "cached_tokens", "completion_tokens")


FLOAT_COLUMNS = ("queue_wait_ms", "ttft_ms", "total_ms", "decode_ms", "tokens_per_second")


def sessions_frame(store: Store):
    """Every session, newest activity first (typed: UTC datetimes, bools, int64 counts)."""
    import pandas as pd

    frame = pd.read_sql_query(
        "SELECT id, name, title, profile, model, created_at, updated_at, last_access_at, ended, message_count "
        "FROM sessions ORDER BY updated_at DESC", store.connection())
    for col in ("created_at", "updated_at", "last_access_at"):
        frame[col] = pd.to_datetime(frame[col], unit="s", utc=True)
    frame["ended"] = frame["ended"].astype(bool)
    frame["message_count"] = frame["message_count"].astype("int64")
    return frame

def messages_frame(store: Store, ref: str | None = None):
    """Every message (of one session, or all), in order, with its session's name and token counts."""
    import pandas as pd

    sql = ("SELECT m.id, m.session_id, s.name AS session_name, m.role, m.content, m.timestamp, "
           "m.finish_reason, m.usage FROM messages m JOIN sessions s ON s.id = m.session_id")
    params: tuple = ()
    if ref is not None:
        sql += " WHERE m.session_id = ?"
        params = (store._row(store.connection(), ref)["id"],)
    frame = pd.read_sql_query(sql + " ORDER BY m.seq", store.connection(), params=params)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], unit="s", utc=True)
    frame["role"] = pd.Categorical(frame["role"], categories=list(ROLES))
    usage = frame.pop("usage").map(lambda u: json.loads(u) if isinstance(u, str) else {})
    for key in ("prompt_tokens", "completion_tokens"):
        frame[key] = usage.map(lambda u, k=key: u.get(k, 0)).astype("int64")
    return frame


# -- DataFrames ----------------------------------------------------------------------------
def to_epoch(value: Any) -> float:
    """A time as epoch seconds: a number (or its text), an ISO 8601 date or date-time
    (naive means UTC), a datetime or pandas Timestamp; else ValueError."""
    import pandas as pd

    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                value = datetime.fromisoformat(text[:-1] + "Z" if text.endswith("z") else text)
            except ValueError:
                value = pd.Timestamp(text)  # the forms pandas reads besides ISO 8601
    if isinstance(value, bool) or not isinstance(value, (int, float, datetime)):
        raise ValueError(f"{value!r} is not a time")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a time")
        return float(value)
    if pd.isna(value):
        raise ValueError("not a time")
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


def requests_frame(store: Store, *, since: Any = None, until: Any = None, session: str | None = None,
                   model: str | None = None):
    """One row per recorded request, typed: UTC datetimes, int64 counts, float64
    timings (NaN when there was no first token), categorical labels (model, source,
    finish reason, error type, session id and name)."""
    import numpy as np
    import pandas as pd

    where, params = [], []
    if since is not None:
        where.append("started_at >= ?")
        params.append(to_epoch(since))
    if until is not None:
        where.append("started_at < ?")
        params.append(to_epoch(until))
    if session is not None:
        where.append("session_id = ?")
        params.append(session if SESSION_ID_RE.fullmatch(session) else store.get(session, messages=False).id)
    if model is not None:
        where.append("model = ?")
        params.append(model)
    # Building one Python object per cell is the whole cost here, so: plain tuples, no
    # JOIN, no ORDER BY, labels fetched as small integer codes (which Python does not
    # allocate), and what can be derived (names, decode time, order) done in pandas.
    cursor = store.connection().cursor()
    cursor.row_factory = None
    filters = (" WHERE " + " AND ".join(where)) if where else ""
    labels = {c: [r[0] for r in cursor.execute(f"SELECT DISTINCT {c} FROM requests{filters}", params)]
              for c in ("model", "source")}
    labels["finish_reason"] = FINISH_REASONS

    def code(column: str) -> tuple[str, list]:
        if not labels[column]:  # no rows selected
            return "-1", []
        cases = " ".join(f"WHEN ? THEN {i}" for i in range(len(labels[column])))
        return f"CASE {column} {cases} ELSE -1 END", labels[column]

    coded = [code(c) for c in ("model", "source", "finish_reason")]
    plain = ("request_id", "started_at", "session_id", "prompt_tokens", "cached_tokens", "completion_tokens",
             "queue_wait_ms", "ttft_ms", "total_ms", "tokens_per_second", "error_type")
    sql = f"SELECT {', '.join(plain)}, {', '.join(expr for expr, _ in coded)} FROM requests{filters}"
    rows = cursor.execute(sql, [v for _, values in coded for v in values] + params).fetchall()
    names = plain + ("model", "source", "finish_reason")
    table = np.array(rows, dtype=object).reshape(len(rows), len(names))
    col = {name: table[:, i] for i, name in enumerate(names)}
    session_names = dict(cursor.execute("SELECT id, name FROM sessions WHERE name IS NOT NULL").fetchall())
    session_ids = pd.Series(pd.Categorical(col["session_id"]))  # a few hundred sessions, many requests
    ints = {c: col[c].astype("int64") for c in ("prompt_tokens", "cached_tokens", "completion_tokens")}
    # float64 turns the None of a request without a first token into NaN
    floats = {c: col[c].astype("float64") for c in ("queue_wait_ms", "ttft_ms", "total_ms", "tokens_per_second")}
    completion, tps = ints["completion_tokens"], floats["tokens_per_second"]
    with np.errstate(divide="ignore", invalid="ignore"):
        decode_ms = np.where((tps > 0) & (completion > 1), (completion - 1) / tps * 1000, 0.0).round(3)

    def categorical(column: str):
        return pd.Categorical.from_codes(col[column].astype("int64"), categories=labels[column])

    frame = pd.DataFrame({
        "request_id": col["request_id"],
        "started_at": pd.to_datetime(col["started_at"].astype("float64"), unit="s", utc=True),
        "session_id": session_ids,
        "session_name": pd.Categorical(session_ids.map(session_names)),  # maps the categories, not the rows
        "model": categorical("model"),
        "source": categorical("source"),
        **ints,
        "queue_wait_ms": floats["queue_wait_ms"], "ttft_ms": floats["ttft_ms"], "total_ms": floats["total_ms"],
        "decode_ms": decode_ms, "tokens_per_second": tps,
        "finish_reason": categorical("finish_reason"),
        "error_type": pd.Categorical(col["error_type"]),
    })
    if not frame["started_at"].is_monotonic_increasing:
        frame = frame.sort_values("started_at", kind="stable", ignore_index=True)
    return frame


def typed_frame(columns: list[str], data: list[list]):
    """A requests frame rebuilt from JSON rows (what the server's route sends)."""
    import pandas as pd

    raw = pd.DataFrame(data, columns=columns)
    out = {}
    for c in columns:
        if c == "started_at":
            out[c] = pd.to_datetime(raw[c], utc=True, format="ISO8601").astype("datetime64[ns, UTC]")
        elif c == "request_id":
            out[c] = raw[c]  # pandas' default string type, as in requests_frame()
        elif c in INT_COLUMNS:
            out[c] = raw[c].astype("int64")
        elif c in FLOAT_COLUMNS:
            out[c] = raw[c].astype("float64")
        elif c == "finish_reason":
            out[c] = pd.Categorical(raw[c], categories=FINISH_REASONS)
        else:
            out[c] = pd.Categorical(raw[c])
    return pd.DataFrame(out, columns=columns)

