"""Stats: every request is a row; the document, the frame and the metrics agree with them."""

import math

import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from offgrid_jupyter.errors import InvalidModelError
from offgrid_jupyter.stats import BUCKET_SQL, PERCENTILE_SQL, attach, requests_frame, stats_document, stats_frame, summarize
from offgrid_jupyter.chat.store import Store
from offgrid_jupyter.chat.turns import ChatTurn

from .conftest import GREEDY, user
from .test_engine import occupy


@pytest.fixture
def request_log(engine, store):
    log = attach(engine, store)
    yield log
    log.close()


@pytest.fixture
def made(engine, store, request_log, tmp_path):
    """Requests of every kind, made for real: (results by kind, the session)."""
    session = store.create("work")
    out = {}
    out["completed"] = ChatTurn(engine, store, "work", "Name a colour.", source="magic",
                                params={"max_tokens": 16, **GREEDY}).start().finish().result
    gen = engine.generate(user("Count to five."), session_id=session.id, source="server", max_tokens=16, **GREEDY)
    list(gen)  # streamed
    out["streamed"] = gen.result
    gen = engine.generate(user("Write a long story."), session_id=session.id, source="panel", max_tokens=300)
    for kind, _ in gen.events():
        if kind == "token":
            gen.cancel()
    out["cancelled"] = gen.result
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    gen = engine.generate(user("Hi."), source="openai", model=str(broken), max_tokens=4)
    with pytest.raises(InvalidModelError):
        gen.wait()
    out["failed"] = gen.result
    blocker, events = occupy(engine)
    queued = engine.generate(user("Hi."), source="magic", max_tokens=4)
    queued.cancel()
    out["never_started"] = queued.wait()
    events.close()
    blocker.wait()
    out["blocker"] = blocker.result
    return out, session


def test_every_request_is_one_typed_row(made, store):
    results, session = made
    frame = stats_frame(store=store)
    assert sorted(frame["request_id"]) == sorted(r.request_id for r in results.values())
    by_id = frame.set_index("request_id")
    for r in results.values():
        row = by_id.loc[r.request_id]
        assert row["finish_reason"] == r.finish_reason and row["source"] == r.source
        assert row["prompt_tokens"] == r.usage["prompt_tokens"]
        assert row["completion_tokens"] == r.usage["completion_tokens"]
        assert row["cached_tokens"] == r.usage["cached_tokens"]
        assert row["total_ms"] == pytest.approx(r.timings["total_ms"])
    assert by_id.loc[results["failed"].request_id, "error_type"] == "UnusableModelError"  # (a request's model: a 400)
    assert by_id.loc[results["cancelled"].request_id, "finish_reason"] == "cancelled"
    assert math.isnan(by_id.loc[results["never_started"].request_id, "ttft_ms"])
    assert by_id.loc[results["completed"].request_id, "session_name"] == "work"
    assert str(frame["started_at"].dtype) == "datetime64[ns, UTC]"
    for col in ("prompt_tokens", "cached_tokens", "completion_tokens"):
        assert frame[col].dtype == "int64"
    for col in ("queue_wait_ms", "ttft_ms", "total_ms", "tokens_per_second"):
        assert frame[col].dtype == "float64"
    for col in ("model", "source", "finish_reason", "error_type"):
        assert isinstance(frame[col].dtype, pd.CategoricalDtype)


def test_frame_filters(made, store):
    results, session = made
    frame = stats_frame(store=store)
    assert len(stats_frame(session="work", store=store)) == (frame["session_id"] == session.id).sum() == 3
    assert len(stats_frame(model="broken", store=store)) == 1
    times = frame["started_at"]
    between = times.iloc[1] + (times.iloc[2] - times.iloc[1]) / 2  # after two requests, before the rest
    assert len(stats_frame(since=between, store=store)) == len(frame) - 2
    assert len(stats_frame(until=between, store=store)) == 2
    after_third = times.iloc[2] + (times.iloc[3] - times.iloc[2]) / 2
    assert len(stats_frame(since=between.isoformat(), until=after_third.timestamp(), store=store)) == 1
    # another process (another Store on the same file) sees the same rows
    other = Store(store.path)
    assert len(requests_frame(other)) == len(frame)
    other.close()


def test_the_document_agrees_with_the_requests(made, engine, store):
    results, session = made
    doc = stats_document(engine, store)
    assert set(doc) == {"server", "inference", "system", "resources", "cache", "queue", "sessions", "rag",
                        "completions"}
    assert doc["completions"] == {"models": {}}  # no inline completion made here
    frame = stats_frame(store=store)
    model = engine.model.name
    m = doc["inference"]["models"][model]
    mine = frame[frame["model"] == model]
    done = mine[mine["finish_reason"].isin(["stop", "length"])]
    assert m["total_requests"] == len(mine) == 5
    assert (m["completed"], m["cancelled"]) == (2, 3) and m["errors"] == 0  # the blocker was cancelled too
    assert m["prompt_tokens"] == mine["prompt_tokens"].sum()
    assert m["completion_tokens"] == mine["completion_tokens"].sum()
    assert m["total_tokens"] == m["prompt_tokens"] + m["completion_tokens"]
    assert m["avg_response_ms"] == pytest.approx(done["total_ms"].mean(), abs=1e-3)
    ranked = sorted(done["total_ms"])
    assert m["p50_response_ms"] == pytest.approx(ranked[0], abs=1e-3)  # nearest rank of 2 values
    assert m["p95_response_ms"] == pytest.approx(ranked[1], abs=1e-3)
    assert m["avg_ttft_ms"] == pytest.approx(mine["ttft_ms"].mean(), abs=1e-3)
    assert doc["inference"]["models"]["broken"]["errors"] == 1
    agg = doc["inference"]["aggregate"]
    assert agg["total_requests"] == 6 and agg["model_count"] == 2
    assert agg["total_tokens"] == frame["prompt_tokens"].sum() + frame["completion_tokens"].sum()
    assert doc["server"]["current_model"] == model and doc["server"]["uptime_seconds"] > 0
    assert doc["server"]["start_time"].endswith("+00:00") and doc["server"]["version"]
    assert doc["system"]["cpu_cores"] >= 1 and isinstance(doc["system"]["total_memory_gb"], float)
    assert 0 <= doc["resources"]["cpu_usage_percent"] <= 100 and doc["resources"]["process_rss_mb"] > 50
    assert set(doc["cache"]) >= {"entries", "bytes", "hits", "misses", "hit_rate", "tokens_reused"}
    # the engine's queue figures are since it started (it served other tests before)
    assert doc["queue"]["requests"] >= 6 and doc["queue"]["max_queue_wait_ms"] >= frame["queue_wait_ms"].max() - 1e-3
    assert doc["queue"]["generating"] is False and doc["queue"]["queued"] == 0
    assert doc["sessions"]["total_sessions"] == store.count()
    rag = doc["rag"]  # nothing learned in this store; searches are the process's, other tests' included
    assert (rag["enabled"], rag["collections"], rag["documents"], rag["chunks"], rag["last_learned_at"]) == (
        False, 0, 0, 0, None)
    assert rag["index_bytes"] >= 0 and set(rag["retrieval"]) == {"searches", "p50_ms", "p95_ms"}


def test_percentiles_read_the_index_not_the_rows(store):
    conn = store.connection()
    for completions, index in ((False, "requests_completed_total"), (True, "requests_completion_total")):
        plan = " ".join(str(r[-1]) for r in conn.execute(
            "EXPLAIN QUERY PLAN " + PERCENTILE_SQL[completions], ("m", 0.0, 0)))
        assert f"COVERING INDEX {index}" in plan and "SCAN requests " not in plan + " "
    plan = " ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + BUCKET_SQL, ("m", 0, 0)))
    assert "requests" not in plan.replace("request_latency", "")  # the histogram alone finds the bucket


def test_percentiles_are_exact_through_the_histogram(engine, store, request_log):
    import random

    rng = random.Random(3)
    values = [round(rng.lognormvariate(6, 1.5), 3) for _ in range(2000)] + [0.0, 0.5, 1.0, 1e10]
    for i, ms in enumerate(values):
        request_log({"request_id": f"r{i}", "session_id": None, "model": "m", "source": "magic",
                     "started_at": 1.0 + i, "queue_wait_ms": 0.0, "prompt_tokens": 1, "cached_tokens": 0,
                     "completion_tokens": 1, "ttft_ms": None, "total_ms": ms, "tokens_per_second": 0.0,
                     "finish_reason": "stop" if i % 10 else "length", "error_type": None})
    assert request_log.flush()
    ranked = sorted(values)
    doc = stats_document(engine, store)["inference"]["models"]["m"]
    for p, key in ((0.50, "p50_response_ms"), (0.95, "p95_response_ms")):
        assert doc[key] == pytest.approx(ranked[math.ceil(p * len(ranked)) - 1], abs=1e-3)  # nearest rank


def test_summaries_group_as_asked(made, store):
    frame = stats_frame(store=store)
    by_source = summarize(frame, "source")
    assert set(by_source.index) == {"magic", "server", "panel", "openai", "api"}  # api: the blocker
    assert by_source["requests"].sum() == len(frame)
    assert by_source.loc["panel", "cancelled"] == 1
    by_model_session = summarize(frame)
    assert by_model_session.index.names == ["model", "session"]
    assert len(summarize(frame, "hour")) >= 1


def test_metrics_parse_and_count_the_requests(made, request_log):
    results, _ = made
    families = {f.name: f for f in text_string_to_metric_families(request_log.metrics().decode())}
    requests = {tuple(sorted(s.labels.items())): s.value for s in families["offgrid_requests"].samples
                if s.name == "offgrid_requests_total"}
    assert sum(requests.values()) == len(results)
    durations = [s for s in families["offgrid_request_duration_seconds"].samples
                 if s.name.endswith("_count")]
    assert sum(s.value for s in durations) == 2  # completed requests only
    for name in ("offgrid_tokens", "offgrid_ttft_seconds", "offgrid_queue_wait_seconds", "offgrid_queue_waiting",
                 "offgrid_queue_generating", "offgrid_kv_cache_hits", "offgrid_kv_cache_bytes"):
        assert name in families
    prompt = sum(s.value for s in families["offgrid_tokens"].samples
                 if s.name == "offgrid_tokens_total" and s.labels["kind"] == "prompt")
    assert prompt == sum(r.usage["prompt_tokens"] for r in results.values())


def test_inline_completions_are_counted_apart_from_the_chats(engine, store, request_log):
    from offgrid_jupyter.inference.completion import CompletionRequest

    chat = engine.generate(user("Hi."), source="magic", max_tokens=4, **GREEDY).wait()
    done = [engine.complete_inline(CompletionRequest(prefix=f"x = {i}\ny = ", path="c.py", max_tokens=4)).wait()
            for i in range(3)]
    slow = engine.complete_inline(CompletionRequest(prefix="for i in range(9):\n", path="c.py", max_tokens=200))
    for kind, _ in slow.events():
        if kind == "token":
            slow.cancel()
    assert slow.result.finish_reason == "cancelled"
    doc = stats_document(engine, store)
    chats = doc["inference"]["models"][engine.model.name]
    assert chats["total_requests"] == 1 and chats["completion_tokens"] == chat.usage["completion_tokens"]
    c = doc["completions"]["models"][engine.model.name]
    assert (c["requests"], c["completed"], c["cancelled"]) == (4, 3, 1)
    ranked = sorted(r.timings["total_ms"] for r in done)
    assert c["p50_ms"] == pytest.approx(ranked[1], abs=1e-3) and c["p95_ms"] == pytest.approx(ranked[2], abs=1e-3)
    assert c["cached_tokens"] == sum(r.usage["cached_tokens"] for r in done + [slow.result]) > 0
    frame = stats_frame(store=store)
    assert sorted(frame["source"]) == ["completion"] * 4 + ["magic"]  # one row each, told apart by source
