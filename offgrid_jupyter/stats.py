"""Usage statistics: every request persisted, the stats document, DataFrames, Prometheus.

Every generation request becomes one row of the ``requests`` table in the
store's database, so the history survives restarts and the server and every
kernel see the same data. A trigger keeps running totals per model, so the
stats document reads a handful of rows (plus two index seeks per model for the
percentiles) however many requests were recorded.

Rows are written by a background thread, never by the engine thread (which
must not wait on a database another process may be writing).
"""

from __future__ import annotations

import logging
import math
import platform
import threading
import time
from datetime import datetime, timezone
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .chat.frames import FINISH_REASONS, FLOAT_COLUMNS, INT_COLUMNS, requests_frame, to_epoch, typed_frame
from .chat.store import Store, get_store
from .inference.backend import Backend
from .retrieval.rag import Library
from .version import __version__

__all__ = ["FINISH_REASONS", "FLOAT_COLUMNS", "INT_COLUMNS", "RequestLog", "attach", "flush", "stats_document",
           "stats_frame", "summarize", "to_epoch", "typed_frame"]

log = logging.getLogger(__name__)

MB = 1 << 20
START_TIME = time.time()  # this process's start, for the server section
COLUMNS = ("request_id", "started_at", "session_id", "model", "source", "prompt_tokens", "cached_tokens",
           "completion_tokens", "queue_wait_ms", "ttft_ms", "total_ms", "decode_ms", "tokens_per_second",
           "finish_reason", "error_type")
COMPLETED = "finish_reason IN ('stop', 'length')"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

psutil.cpu_percent(interval=None)  # start the CPU sampling window: later calls never block


def request_row(record: dict[str, Any]) -> tuple:
    tps, completion = record["tokens_per_second"] or 0.0, record["completion_tokens"]
    decode_ms = (completion - 1) / tps * 1000 if tps > 0 and completion > 1 else 0.0
    values = {**record, "decode_ms": round(decode_ms, 3)}
    return tuple(values[c] for c in COLUMNS)


class _EngineCollector:
    """Queue and KV-cache figures read from the engine at scrape time."""

    def __init__(self, engine: Backend):
        self.engine = engine

    def collect(self):
        st = self.engine.stats()
        q, c = st["queue"], st["cache"]
        yield GaugeMetricFamily("offgrid_queue_generating", "1 while a generation runs", value=int(q["generating"]))
        yield GaugeMetricFamily("offgrid_queue_waiting", "Requests waiting in the queue", value=q["queued"])
        yield GaugeMetricFamily("offgrid_kv_cache_entries", "Per-session KV snapshots held", value=c["entries"])
        yield GaugeMetricFamily("offgrid_kv_cache_bytes", "Bytes held by KV snapshots", value=c["bytes"])
        yield CounterMetricFamily("offgrid_kv_cache_hits", "Session switches that found a snapshot", value=c["hits"])
        yield CounterMetricFamily("offgrid_kv_cache_misses", "Session switches without a snapshot",
                                  value=c["misses"])
        yield CounterMetricFamily("offgrid_kv_tokens_reused", "Prompt tokens not re-evaluated",
                                  value=c["tokens_reused"])


class RequestLog:
    """An engine recorder: persists every request and feeds the Prometheus metrics."""

    def __init__(self, engine: Backend, store: Store):
        self.engine, self.store = engine, store
        self.registry = CollectorRegistry()
        self.requests = Counter("offgrid_requests", "Generation requests", ["model", "source", "finish_reason"],
                                registry=self.registry)
        self.tokens = Counter("offgrid_tokens", "Tokens processed", ["model", "kind"], registry=self.registry)
        self.duration = Histogram("offgrid_request_duration_seconds", "Generation time of completed requests",
                                  ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("offgrid_ttft_seconds", "Time to first token", ["model"], buckets=LATENCY_BUCKETS,
                              registry=self.registry)
        self.queue_wait = Histogram("offgrid_queue_wait_seconds", "Time spent waiting in the queue",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        self._cv = threading.Condition()
        self._buffer: list[tuple] = []
        self._writing = 0
        self._thread: threading.Thread | None = None

    def __call__(self, record: dict[str, Any]) -> None:
        model = record["model"]
        self.requests.labels(model, record["source"], record["finish_reason"]).inc()
        for kind in ("prompt", "cached", "completion"):
            self.tokens.labels(model, kind).inc(record[f"{kind}_tokens"])
        if record["finish_reason"] in ("stop", "length"):
            self.duration.labels(model).observe(record["total_ms"] / 1000)
        if record["ttft_ms"] is not None:
            self.ttft.labels(model).observe(record["ttft_ms"] / 1000)
        self.queue_wait.observe(record["queue_wait_ms"] / 1000)
        with self._cv:
            self._buffer.append(request_row(record))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="offgrid-stats", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def close(self) -> None:
        """Stop recording (what is recorded so far is written first)."""
        self.flush()
        with _attach_lock:
            if self in self.engine.recorders:
                self.engine.recorders.remove(self)
            if self in _logs:
                _logs.remove(self)
            if self.flush in self.store.pending_writers:
                self.store.pending_writers.remove(self.flush)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every recorded request is in the database."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._buffer and not self._writing, timeout)

    def _run(self) -> None:
        sql = f"INSERT OR IGNORE INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._buffer)
                batch, self._buffer = self._buffer, []
                self._writing = len(batch)
            try:
                self.store.transaction(lambda conn: conn.executemany(sql, batch))
            except Exception:  # the stats must never take the engine down
                log.exception("offgrid stats: could not record %d request(s)", len(batch))
            with self._cv:
                self._writing = 0
                self._cv.notify_all()

    def metrics(self) -> bytes:
        """The Prometheus text exposition of this process's engine."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


_attach_lock = threading.Lock()
_logs: list[RequestLog] = []


def attach(engine: Backend, store: Store) -> RequestLog:
    """The engine's request log into *store* (created and registered once)."""
    with _attach_lock:
        for recorder in engine.recorders:
            if isinstance(recorder, RequestLog) and recorder.store is store:
                return recorder
        request_log = RequestLog(engine, store)
        engine.recorders.append(request_log)
        _logs.append(request_log)
        store.pending_writers.append(request_log.flush)  # its frames read what this log recorded
        return request_log


def flush(store: Store) -> None:
    """Wait until this process's recorded requests are in *store*'s database."""
    for request_log in list(_logs):
        if request_log.store.path == store.path:
            request_log.flush()


# -- the public, in-process API ----------------------------------------------------------
def stats_frame(since: Any = None, until: Any = None, session: str | None = None, model: str | None = None, *,
                store: Store | None = None):
    """``offgrid_jupyter.stats_frame()``: one row per recorded request (all processes)."""
    store = store or get_store()
    flush(store)
    return requests_frame(store, since=since, until=until, session=session, model=model)


# -- the stats document -------------------------------------------------------------
def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds") if ts else None


def _human(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(days or hours) + [f"{minutes}m"] * bool(
        days or hours or minutes)
    return " ".join(parts + [f"{s}s"])


PERCENTILE_SQL = {  # chats, and inline completions (counted apart: see chat/db.py m009)
    False: ("SELECT total_ms FROM requests INDEXED BY requests_completed_total WHERE model = ? "
            f"AND {COMPLETED} AND source != 'completion' AND total_ms >= ? ORDER BY total_ms LIMIT 1 OFFSET ?"),
    True: ("SELECT total_ms FROM requests INDEXED BY requests_completion_total WHERE model = ? "
           f"AND {COMPLETED} AND source = 'completion' AND total_ms >= ? ORDER BY total_ms LIMIT 1 OFFSET ?")}
BUCKET_SQL = ("SELECT lo, cum - n FROM (SELECT lo, n, sum(n) OVER (ORDER BY lo) AS cum FROM request_latency "
              "WHERE model = ? AND completion = ?) WHERE cum > ? ORDER BY lo LIMIT 1")


def _percentile(conn, model: str, n: int, p: float, completions: bool = False) -> float | None:
    """Nearest-rank percentile of completed requests' total_ms: the latency histogram (chat/db.py
    m010) names the bucket holding the rank, then the covering index is read from that bucket's
    start, stepping over that bucket's entries only (not the rank's: the document's time then
    does not grow with the number of requests)."""
    if n == 0:
        return None
    rank = max(1, math.ceil(p * n)) - 1
    bucket = conn.execute(BUCKET_SQL, (model, int(completions), rank)).fetchone()
    if bucket is None:
        return None
    row = conn.execute(PERCENTILE_SQL[completions], (model, bucket[0], rank - bucket[1])).fetchone()
    return round(row[0], 3) if row else None


def completions_section(store: Store) -> dict[str, Any]:
    """Inline completions per model, apart from the chats (short, many, mostly cancelled by the
    next keystroke): how many, how fast the suggestion came, how much of the prompt the cache had."""
    conn = store.connection()
    models = {}
    for r in conn.execute("SELECT * FROM completion_totals ORDER BY model"):
        n = r["completed"]
        models[r["model"]] = {
            "requests": r["total_requests"], "completed": n, "cancelled": r["cancelled"], "errors": r["errors"],
            "p50_ms": _percentile(conn, r["model"], n, 0.50, True), "p95_ms": _percentile(conn, r["model"], n, 0.95, True),
            "avg_first_token_ms": round(r["ttft_ms"] / r["ttft_count"], 3) if r["ttft_count"] else None,
            "prompt_tokens": r["prompt_tokens"], "cached_tokens": r["cached_tokens"],
            "completion_tokens": r["completion_tokens"], "last_used": _iso(r["last_used"])}
    return {"models": models}


def inference_section(store: Store) -> dict[str, Any]:
    conn = store.connection()
    models: dict[str, Any] = {}
    total_requests = total_tokens = completed = 0
    completed_ms = 0.0
    for r in conn.execute("SELECT * FROM request_totals ORDER BY model"):
        n = r["completed"]
        models[r["model"]] = {
            "total_requests": r["total_requests"], "completed": n, "cancelled": r["cancelled"],
            "errors": r["errors"], "total_tokens": r["prompt_tokens"] + r["completion_tokens"],
            "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
            "cached_tokens": r["cached_tokens"],
            "avg_response_ms": round(r["completed_total_ms"] / n, 3) if n else None,
            "p50_response_ms": _percentile(conn, r["model"], n, 0.50),
            "p95_response_ms": _percentile(conn, r["model"], n, 0.95),
            "avg_ttft_ms": round(r["ttft_ms"] / r["ttft_count"], 3) if r["ttft_count"] else None,
            "tokens_per_second": round(r["decode_tokens"] / (r["decode_ms"] / 1000), 3) if r["decode_ms"] else None,
            "last_used": _iso(r["last_used"]),
        }
        total_requests += r["total_requests"]
        total_tokens += r["prompt_tokens"] + r["completion_tokens"]
        completed += n
        completed_ms += r["completed_total_ms"]
    return {"models": models, "aggregate": {
        "total_requests": total_requests, "total_tokens": total_tokens,
        "avg_response_ms": round(completed_ms / completed, 3) if completed else None, "model_count": len(models)}}


def system_section() -> dict[str, Any]:
    return {"os": f"{platform.system()} {platform.release()}", "arch": platform.machine(),
            "cpu_cores": psutil.cpu_count(logical=True), "physical_cores": psutil.cpu_count(logical=False),
            "total_memory_gb": round(psutil.virtual_memory().total / 1e9, 2),
            "python": platform.python_version()}


def resources_section() -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {"cpu_usage_percent": psutil.cpu_percent(interval=None),  # since the previous call: never blocks
            "memory_used_mb": round(vm.used / MB, 1), "memory_usage_percent": vm.percent,
            "process_rss_mb": round(psutil.Process().memory_info().rss / MB, 1)}


def stats_document(engine: Backend, store: Store) -> dict[str, Any]:
    """The OffGrid stats document for this process's engine and the shared store."""
    flush(store)  # what this process recorded so far is in the figures (reading attaches nothing)
    engine_stats = engine.stats()
    q = engine_stats["queue"]
    uptime = time.time() - START_TIME
    try:
        current_model = engine.model.name
    except Exception:  # noqa: BLE001 - no model configured: the document still answers
        current_model = None
    return {
        "server": {"uptime": _human(uptime), "uptime_seconds": round(uptime, 3), "start_time": _iso(START_TIME),
                   "version": __version__, "current_model": current_model, "model_loaded": engine.loaded},
        "inference": inference_section(store),
        "system": system_section(),
        "resources": resources_section(),
        "cache": engine_stats["cache"],
        "queue": {"generating": q["generating"], "queued": q["queued"], "total_waits": q["total_waits"],
                  "requests": q["requests"], "avg_queue_wait_ms": q["avg_queue_wait_ms"],
                  "max_queue_wait_ms": q["max_queue_wait_ms"]},
        "sessions": store.session_stats(),
        "rag": Library(store).stats(),
        "completions": completions_section(store),
    }








def summarize(frame, by: list[str] | str = ("model", "session")):
    """Per-group figures of a requests frame: counts, tokens, latency, speed, waits."""
    import pandas as pd

    by = [by] if isinstance(by, str) else list(by)
    f = frame.assign(
        session=frame["session_name"].astype(object).fillna(frame["session_id"].astype(object))
        .fillna("(none)").astype(str),
        hour=frame["started_at"].dt.floor("h"),
        completed=frame["finish_reason"].isin(["stop", "length"]),
        cancelled=frame["finish_reason"] == "cancelled",
        errors=frame["finish_reason"] == "error",
        decode_tokens=(frame["completion_tokens"] - 1).clip(lower=0).where(frame["decode_ms"] > 0, 0),
    )
    f["response_ms"] = f["total_ms"].where(f["completed"])
    groups = f.groupby(by, observed=True, dropna=False)
    out = groups.agg(
        requests=("request_id", "size"), completed=("completed", "sum"), cancelled=("cancelled", "sum"),
        errors=("errors", "sum"), prompt_tokens=("prompt_tokens", "sum"),
        completion_tokens=("completion_tokens", "sum"), cached_tokens=("cached_tokens", "sum"),
        avg_response_ms=("response_ms", "mean"), p50_response_ms=("response_ms", "median"),
        p95_response_ms=("response_ms", lambda s: s.quantile(0.95)), avg_ttft_ms=("ttft_ms", "mean"),
        avg_queue_wait_ms=("queue_wait_ms", "mean"), max_queue_wait_ms=("queue_wait_ms", "max"),
        decode_tokens=("decode_tokens", "sum"), decode_ms=("decode_ms", "sum"),
    )
    out["tokens_per_second"] = (out.pop("decode_tokens") / (out.pop("decode_ms") / 1000)).where(
        lambda s: s.notna() & (s != float("inf")))
    return out.round(2) if not out.empty else pd.DataFrame(out)
