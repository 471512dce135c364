import threading

import pytest

from offgrid_jupyter.inference.engine import Engine, GenerationParams
from offgrid_jupyter.errors import (
    ContextOverflowError,
    EngineBusyError,
    InvalidRequestError,
    QueueTimeoutError,
)

from .conftest import GREEDY, user

LONG_TASK = "Write a very long, detailed essay about the history of the ocean, with many sections."


def occupy(engine, max_tokens=2000, session_id="occupier"):
    """Start a long generation and return once the engine thread is running it."""
    gen = engine.generate(user(LONG_TASK), session_id=session_id, max_tokens=max_tokens, temperature=0.0)
    events = gen.events()
    for kind, _ in events:
        if kind == "start":
            break
    return gen, events


def test_streams_deltas_then_a_result(engine):
    gen = engine.generate(user("Name three colours."), session_id="stream-1", max_tokens=48, **GREEDY)
    deltas = list(gen)
    result = gen.result
    assert len(deltas) > 3 and all(isinstance(d, str) for d in deltas)
    assert "".join(deltas) == result.text and result.text.strip()
    assert result.finish_reason in ("stop", "length")
    assert result.usage["prompt_tokens"] > 10
    assert 0 < result.usage["completion_tokens"] <= 48
    assert result.usage["total_tokens"] == result.usage["prompt_tokens"] + result.usage["completion_tokens"]
    assert 0 < result.timings["ttft_ms"] <= result.timings["total_ms"]
    assert result.timings["tokens_per_second"] > 0
    assert set(result.queue_stats) == {"was_queued", "queue_wait_ms", "queue_position", "generation_ms"}
    assert result.model == "SmolLM2-135M-Instruct.Q4_1"


def test_max_tokens_gives_length(engine):
    result = engine.complete(user(LONG_TASK), session_id="length-1", max_tokens=5, **GREEDY)
    assert result.finish_reason == "length"
    assert result.usage["completion_tokens"] == 5


def test_same_seed_and_history_give_the_same_output(engine):
    history = user("Give me one sentence about the moon.")
    first = engine.complete(history, session_id="det-a", max_tokens=40, **GREEDY)
    engine.complete(user("Something unrelated: list two fruits."), session_id="det-other", max_tokens=20, **GREEDY)
    second = engine.complete(history, session_id="det-b", max_tokens=40, **GREEDY)
    assert first.text == second.text and first.text


def test_cancel_mid_decode_stops_within_a_token_and_engine_is_usable(engine):
    gen = engine.generate(user(LONG_TASK), session_id="cancel-1", max_tokens=400, **GREEDY)
    seen = 0
    for _ in gen:
        seen += 1
        if seen == 3:
            gen.cancel()
    result = gen.result
    assert result.finish_reason == "cancelled"
    assert result.usage["completion_tokens"] <= seen + 2
    nxt = engine.complete(user("Say hello."), session_id="cancel-1", max_tokens=8, **GREEDY)
    assert nxt.finish_reason in ("stop", "length") and nxt.text


def test_closing_the_stream_cancels(engine):
    gen = engine.generate(user(LONG_TASK), session_id="close-1", max_tokens=400, **GREEDY)
    stream = iter(gen)
    next(stream)
    stream.close()
    assert gen.wait().finish_reason == "cancelled"


def test_cancel_during_prompt_evaluation_aborts_it(make_engine):
    eng = make_engine(n_ctx=4096, n_batch=64)
    long_prompt = "Summarise these notes. " + " ".join(f"Note {i}: the sample was measured at noon." for i in range(300))
    gen = eng.generate(user(long_prompt), session_id="prefill", max_tokens=50, **GREEDY)
    for kind, _ in gen.events():
        if kind == "start":
            gen.cancel()
    result = gen.result
    assert result.usage["prompt_tokens"] > 2500
    assert result.finish_reason == "cancelled"
    assert result.usage["completion_tokens"] == 0 and result.timings["ttft_ms"] is None
    # the aborted prompt left nothing half-done: the next request runs normally
    after = eng.complete(user("Say hi."), session_id="prefill", max_tokens=6, **GREEDY)
    assert after.finish_reason in ("stop", "length") and after.usage["completion_tokens"] > 0


def test_fifo_order_with_threads_submitting_at_once(engine):
    running, events = occupy(engine)
    gens, lock, barrier = [], threading.Lock(), threading.Barrier(6)

    def submit(i):
        barrier.wait()
        g = engine.generate(user(f"Count to {i}."), session_id=f"fifo-{i}", max_tokens=4, **GREEDY)
        with lock:
            gens.append(g)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = engine.status()
    assert status["generating_session_id"] == "occupier"
    assert "occupier" not in status["queued_session_ids"]
    by_entry = sorted(gens, key=lambda g: g.position_at_entry)
    assert [g.position_at_entry for g in by_entry] == [1, 2, 3, 4, 5, 6]
    assert status["queued_session_ids"] == [g.session_id for g in by_entry]
    running.cancel()
    for _ in events:
        pass
    results = [g.wait() for g in gens]
    assert all(r.queue_stats["queue_wait_ms"] > 0 for r in results)
    starts = [g.started_mono for g in by_entry]
    assert starts == sorted(starts)
    assert [r.queue_stats["queue_position"] for r in results] == [g.position_at_entry for g in gens]


def test_queue_timeout_is_clear_and_leaves_nothing_locked(make_engine):
    eng = make_engine(queue_timeout=0.3)
    running, events = occupy(eng)
    waiting = eng.generate(user("hi"), session_id="late", max_tokens=4)
    with pytest.raises(QueueTimeoutError, match="queue"):
        waiting.wait()
    assert waiting.result.finish_reason == "error"
    assert eng.status()["queued_session_ids"] == []
    running.cancel()
    for _ in events:
        pass
    assert eng.complete(user("hi"), max_tokens=4).finish_reason in ("stop", "length")


def test_queue_bound_gives_busy_error(make_engine):
    eng = make_engine(max_queue=1)
    running, events = occupy(eng)
    queued = eng.generate(user("one"), session_id="q1", max_tokens=4)
    with pytest.raises(EngineBusyError, match="queue is full"):
        eng.generate(user("two"), session_id="q2", max_tokens=4)
    queued.cancel()
    assert queued.wait().finish_reason == "cancelled"
    running.cancel()
    for _ in events:
        pass
    assert eng.status() == {"generating_session_id": None, "generating_request_id": None, "generating": [],
                            "queued_session_ids": []}
    assert eng.complete(user("three"), max_tokens=4).finish_reason in ("stop", "length")


def test_followup_reuses_kv_across_interleaved_sessions(engine):
    a1 = user("My name is Ada and I study octopus behaviour. Remember that.")
    ra1 = engine.complete(a1, session_id="kv-a", max_tokens=60, **GREEDY)
    engine.complete(user("What is 2 + 2? Explain in detail."), session_id="kv-b", max_tokens=60, **GREEDY)
    a2 = a1 + [{"role": "assistant", "content": ra1.text}, {"role": "user", "content": "What do I study?"}]
    ra2 = engine.complete(a2, session_id="kv-a", max_tokens=20, **GREEDY)
    # everything up to the end of turn 1 was reused, although session B ran in between
    assert ra2.usage["cached_tokens"] >= ra1.usage["prompt_tokens"] + ra1.usage["completion_tokens"] - 2
    assert ra2.usage["prompt_tokens"] - ra2.usage["cached_tokens"] < 25
    assert engine.stats()["cache"]["hits"] >= 1


def test_without_snapshots_the_followup_re_evaluates(make_engine):
    eng = make_engine(kv_cache_bytes=0)
    a1 = user("My name is Ada and I study octopus behaviour. Remember that.")
    ra1 = eng.complete(a1, session_id="a", max_tokens=60, **GREEDY)
    eng.complete(user("What is 2 + 2? Explain in detail."), session_id="b", max_tokens=60, **GREEDY)
    a2 = a1 + [{"role": "assistant", "content": ra1.text}, {"role": "user", "content": "What do I study?"}]
    ra2 = eng.complete(a2, session_id="a", max_tokens=20, **GREEDY)
    assert ra2.usage["cached_tokens"] < ra1.usage["prompt_tokens"]


def test_a_failed_request_does_not_break_the_engine(engine):
    huge = user("word " * 5000)
    with pytest.raises(ContextOverflowError, match="context"):
        engine.complete(huge, session_id="overflow", max_tokens=10)
    assert engine.complete(user("Say yes."), session_id="overflow", max_tokens=4).text


def test_long_history_drops_oldest_turns_to_fit(make_engine):
    eng = make_engine(n_ctx=512)
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(20):
        history += [{"role": "user", "content": f"Fact {i}: " + "data " * 20},
                    {"role": "assistant", "content": "Noted."}]
    history.append({"role": "user", "content": "Say OK."})
    result = eng.complete(history, max_tokens=8)
    assert result.usage["prompt_tokens"] < 512 and result.finish_reason in ("stop", "length")


def _count_formats(eng):
    """Wrap the loaded model's prompt formatting to count how often a prompt is built."""
    calls = []
    llm = eng._llm
    real = llm.format
    llm.format = lambda messages, **kw: calls.append(len(messages)) or real(messages, **kw)
    return calls


def test_fitting_a_long_history_formats_the_prompt_about_once(make_engine):
    eng = make_engine(n_ctx=1024)
    eng.complete(user("Hi."), max_tokens=1)  # loaded
    calls = _count_formats(eng)
    history = []
    for i in range(300):  # ~60k tokens: the first wave re-formatted it once per dropped message
        history += [{"role": "user", "content": f"Note {i}: " + "sensor reading steady " * 30},
                    {"role": "assistant", "content": f"Noted {i}."}]
    history.append({"role": "user", "content": "Which note came last?"})
    result = eng.complete(history, max_tokens=8, session_id="long")
    assert result.usage["prompt_tokens"] <= 1024 - 8 and len(calls) <= 3, calls
    assert calls[-1] < len(history)  # the oldest turns went
    calls.clear()
    result = eng.complete(history + [{"role": "assistant", "content": result.text or "ok"},
                                     {"role": "user", "content": "And the first?"}], max_tokens=8, session_id="long")
    assert len(calls) <= 3 and result.finish_reason in ("stop", "length")


def test_a_single_message_too_long_is_refused_before_the_history_is_formatted(make_engine):
    eng = make_engine(n_ctx=512)
    eng.complete(user("Hi."), max_tokens=1)
    calls = _count_formats(eng)
    history = [{"role": "user", "content": "old " * 50}, {"role": "assistant", "content": "ok"}] * 50
    with pytest.raises(ContextOverflowError, match="512-token context"):
        eng.complete(history + [{"role": "user", "content": "word " * 2000}], max_tokens=8)
    assert calls == []


@pytest.mark.parametrize("params, needle", [
    ({"seed": 2**40}, "seed must be an integer from 0 to"), ({"seed": -1}, "seed"), ({"seed": True}, "seed"),
    ({"max_tokens": 10**30}, "max_tokens must be an integer from 1 to 1,000,000"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"max_tokens": 2.5}, "max_tokens"),
])
def test_out_of_range_numbers_are_refused_by_name(engine, params, needle):
    with pytest.raises(InvalidRequestError, match=needle):
        engine.generate(user("hi"), **params)


def test_bad_requests_are_rejected_before_queueing(engine):
    with pytest.raises(InvalidRequestError, match="non-empty list"):
        engine.generate([])
    with pytest.raises(InvalidRequestError, match="role"):
        engine.generate([{"role": "wizard", "content": "hi"}])
    with pytest.raises(InvalidRequestError, match="temperature"):
        engine.generate(user("hi"), temperature=-1)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.generate(user("hi"), max_tokens=0)
    with pytest.raises(InvalidRequestError, match="Unknown generation parameter"):
        engine.generate(user("hi"), tempreature=0.5)


def test_every_request_is_recorded_once(make_engine):
    eng = make_engine()
    records = []
    eng.recorders.append(records.append)
    eng.complete(user("hi"), session_id="rec", max_tokens=4)
    gen = eng.generate(user(LONG_TASK), session_id="rec", max_tokens=200)
    next(iter(gen))
    gen.cancel()
    gen.wait()
    with pytest.raises(ContextOverflowError):
        eng.complete(user("word " * 3000), session_id="rec", max_tokens=4)
    assert [r["finish_reason"] for r in records] == ["length", "cancelled", "error"]
    assert records[2]["error_type"] == "ContextOverflowError"
    expected = {"request_id", "session_id", "model", "source", "started_at", "queue_wait_ms", "prompt_tokens",
                "cached_tokens", "completion_tokens", "ttft_ms", "total_ms", "tokens_per_second",
                "finish_reason", "error_type"}
    assert all(set(r) == expected for r in records)
    assert len({r["request_id"] for r in records}) == 3


def test_threads_default_to_all_cores():
    import os

    assert Engine().n_threads == len(os.sched_getaffinity(0))


def test_params_validation_defaults():
    assert GenerationParams().validate().max_tokens == 512


def test_batches_group_tokens_and_end_with_the_result(engine):
    gen = engine.generate(user("Count from one to twenty in words."), session_id="batch-1", max_tokens=60, **GREEDY)
    batches = list(gen.batches(interval=0.2))
    kinds = [k for batch in batches for k, _ in batch]
    tokens = [p for batch in batches for k, p in batch if k == "token"]
    assert kinds[-1] == "complete" and "start" in kinds
    assert "".join(tokens) == gen.result.text
    assert len(batches) < len(tokens)  # woken per interval, not per token


def test_a_request_can_name_another_model_and_the_engine_switches_back(tmp_path, make_engine):
    eng = make_engine()
    other = tmp_path / "other-copy.gguf"
    other.write_bytes(eng.model.path.read_bytes())
    runs = [eng.generate(user("Hi."), max_tokens=4, model=model, **GREEDY) for model in (None, other, None)]
    events = [list(gen.events()) for gen in runs]
    assert [gen.result.model for gen in runs] == [eng.model.name, "other-copy", eng.model.name]
    assert all(any(kind == "loading" for kind, _ in evs) for evs in events)  # each switch reloads
    again = list(eng.generate(user("Hi."), max_tokens=4, **GREEDY).events())
    assert not any(kind == "loading" for kind, _ in again) and eng.loaded


def test_loading_a_model_leaves_the_callers_stdout_alone(make_engine):
    # llama-cpp-python's quiet mode swaps sys.stdout (and fd 1) for the whole process
    # while a model loads; done from the engine thread, that swallows the notebook's
    # output meanwhile and undoes a redirect made meanwhile. After an engine load, its
    # quiet-mode context manager must leave the streams alone.
    import sys

    import llama_cpp._internals
    import llama_cpp.llama

    eng = make_engine()
    eng.complete(user("Hi."), max_tokens=2)
    before_out, before_err = sys.stdout, sys.stderr
    for module in (llama_cpp.llama, llama_cpp._internals):
        with module.suppress_stdout_stderr(disable=False):
            assert sys.stdout is before_out and sys.stderr is before_err


def test_a_reply_that_fills_the_context_ends_as_length_not_an_error(make_engine):
    eng = make_engine(n_ctx=256)
    r = eng.complete(user("Write a very long story about the sea, with many chapters."), max_tokens=100_000,
                     temperature=0.0, repeat_penalty=1.0)
    assert r.finish_reason == "length" and r.usage["total_tokens"] == 256


def test_max_tokens_holds_even_mid_character(engine):
    # llama-cpp-python skips its max_tokens check while a multi-byte character is incomplete
    # (4 asked, 6 generated, measured); past the context's end that was a decode failure
    for seed in range(3):
        r = engine.complete(user("Reply with only emoji: 🌊🌊🌊🐟🐟🐟"), max_tokens=4, temperature=0.7, seed=seed)
        assert r.usage["completion_tokens"] <= 4 and r.finish_reason == "length"


def test_an_estimate_that_falls_short_drops_more_turns_and_keeps_those_already_dropped(make_engine):
    eng = make_engine(n_ctx=512)
    eng.complete(user("Hi."), max_tokens=1)
    history = [{"role": "user", "content": f"Note {i}: " + "steady reading " * 10} if i % 2 == 0 else
               {"role": "assistant", "content": "Noted."} for i in range(60)]
    eng._overhead = -1.0  # too low: the first choice of turns cannot fit
    calls = _count_formats(eng)
    result = eng.complete(history + [{"role": "user", "content": "Say OK."}], max_tokens=8)
    assert result.usage["prompt_tokens"] <= 512 - 8 and len(calls) >= 2, calls  # room for the 8-token reply
    # each try keeps fewer messages, until one fits; a last one may take back what the short estimate
    # dropped beyond need (re-counted with the overhead the fitting prompt measured), and fits too
    fitting = calls[:-1] if len(calls) > 2 and calls[-1] > calls[-2] else calls
    assert fitting == sorted(fitting, reverse=True)


def test_a_history_that_fits_keeps_every_turn_after_a_one_message_prompt(make_engine):
    """The template's fixed part (a default system prompt), learnt per message from a one-message
    prompt, made the estimate drop turns a long history had room for; the next turn then shared no
    prefix with it and re-read everything."""
    eng = make_engine(n_ctx=2048)
    eng.complete(user("Hi."), max_tokens=1)
    history = [{"role": "user", "content": f"Note {i}: the pump ran {i} hours."} if i % 2 == 0 else
               {"role": "assistant", "content": "Noted."} for i in range(80)]
    first = eng.complete(history + user("Say OK."), max_tokens=8, temperature=0.0)
    again = eng.complete(history + user("Say OK."), max_tokens=8, temperature=0.0)  # the overhead learnt by now
    assert first.usage["prompt_tokens"] == again.usage["prompt_tokens"] < 2048 - 8
