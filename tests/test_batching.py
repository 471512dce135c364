"""Continuous batching in the engine (batching.py), on the real default model: several requests decode
together, the rest queue FIFO, cancel and failures stay with their request, KV reuse into whatever
slot a session gets, prompts read in chunks between decode steps. Behaviour, never timings."""

import itertools
import shutil
import threading

import pytest

from offgrid_jupyter.errors import ContextOverflowError, QueueTimeoutError
from offgrid_jupyter.inference.models import resolve_model

from .conftest import GREEDY, user

STORY = "Write a long story about a lighthouse keeper and a storm, in many paragraphs."


class Timeline:
    """Every event of several generations in one order (a counter shared by their listeners)."""

    def __init__(self):
        self.events, self._lock, self._n = [], threading.Lock(), itertools.count()

    def follow(self, gen, name):
        gen.listen(lambda kind, payload: self._add(name, kind))
        return gen

    def _add(self, name, kind):
        with self._lock:
            self.events.append((next(self._n), name, kind))

    def first(self, name, kind):
        return next(i for i, n, k in self.events if n == name and k == kind)

    def last(self, name, kind):
        return max(i for i, n, k in self.events if n == name and k == kind)

    def between(self, name, kind, start, end):
        return [i for i, n, k in self.events if n == name and k == kind and start < i < end]


@pytest.fixture
def batched(make_engine):
    return make_engine(n_ctx=4096, n_parallel=4)


def test_up_to_n_parallel_decode_together_and_the_rest_queue_in_order(batched):
    started = threading.Semaphore(0)
    gens = []
    for i in range(6):
        gen = batched.generate(user(f"{STORY} Number {i}."), session_id=f"s{i}", max_tokens=60, **GREEDY)
        gen.listen(lambda kind, _p: kind == "token" and started.release())
        gens.append(gen)
    for _ in range(8):
        assert started.acquire(timeout=120)
    status = batched.status()
    assert [g["session_id"] for g in status["generating"]] == ["s0", "s1", "s2", "s3"]
    assert status["generating_session_id"] == "s0" and status["queued_session_ids"] == ["s4", "s5"]
    assert [g.position for g in gens[4:]] == [1, 2] and batched.stats()["queue"]["running"] == 4
    results = [g.wait() for g in gens]
    assert all(r.finish_reason in ("stop", "length") and r.usage["completion_tokens"] > 0 for r in results)
    assert gens[4].started_mono <= gens[5].started_mono  # FIFO beyond n_parallel
    assert results[4].queue_stats["was_queued"] and not results[0].queue_stats["was_queued"]
    assert batched.describe()["n_parallel"] == 4


def test_cancelling_one_of_several_leaves_the_others_whole(batched):
    line = Timeline()
    gens = [line.follow(batched.generate(user(f"{STORY} Number {i}."), session_id=f"c{i}", max_tokens=80,
                                         **GREEDY), f"g{i}") for i in range(3)]
    first = threading.Event()
    gens[1].listen(lambda kind, _p: kind == "token" and first.set())
    assert first.wait(120)
    gens[1].cancel()
    results = [g.wait() for g in gens]
    assert results[1].finish_reason == "cancelled" and results[1].usage["completion_tokens"] < 80
    for r in (results[0], results[2]):
        assert r.finish_reason in ("stop", "length") and r.text.strip()
    # the two others went on decoding after the cancelled one ended
    assert line.last("g0", "token") > line.first("g1", "complete")


def test_a_failing_request_ends_alone(batched, monkeypatch):
    """A sampler that raises for one request (a stand-in for a sequence-level failure such as a
    broken grammar) ends that request; the others in the same batch finish as usual."""
    llm = batched._llm or batched.complete(user("Hi."), max_tokens=1) and batched._llm
    real = llm.sampler

    class Broken:
        def sample(self, ctx, row):
            raise RuntimeError("this sequence's sampler broke")

    monkeypatch.setattr(llm, "sampler", lambda kwargs: Broken() if kwargs.get("seed") == 666 else real(kwargs))
    ok = [batched.generate(user(f"{STORY} {i}"), session_id=f"ok{i}", max_tokens=30, **GREEDY) for i in range(2)]
    bad = batched.generate(user("Say something."), session_id="bad", max_tokens=30, temperature=0, seed=666)
    with pytest.raises(Exception, match="sampler broke"):
        bad.wait()
    assert bad.result.finish_reason == "error"
    assert all(g.wait().finish_reason in ("stop", "length") for g in ok)
    assert batched.complete(user("Say yes."), max_tokens=4).usage["completion_tokens"] > 0


def test_alone_the_same_request_gives_the_same_text_with_one_slot_or_four(make_engine):
    one, four = make_engine(n_parallel=1), make_engine(n_parallel=4)
    texts = {n: [e.complete(user("Name three rivers and their countries."), session_id=f"same-{n}-{i}",
                            max_tokens=40, **GREEDY).text for i in range(2)] for n, e in ((1, one), (4, four))}
    assert texts[1][0] == texts[1][1] == texts[4][0] == texts[4][1]


def test_a_sessions_snapshot_goes_back_into_whatever_slot_it_gets(batched):
    a1 = user("My name is Ada and I study octopus behaviour. Remember that.")
    r1 = batched.complete(a1, session_id="ada", max_tokens=40, **GREEDY)
    others = [batched.generate(user(f"{STORY} {i}"), session_id=f"other{i}", max_tokens=40, **GREEDY)
              for i in range(4)]  # they take every slot: Ada's cells go to the snapshot LRU
    for g in others:
        g.wait()
    hits = batched.stats()["cache"]["hits"]
    a2 = a1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "What do I study?"}]
    r2 = batched.complete(a2, session_id="ada", max_tokens=20, **GREEDY)
    assert r2.usage["cached_tokens"] >= r1.usage["prompt_tokens"] + r1.usage["completion_tokens"] - 2
    assert batched.stats()["cache"]["hits"] == hits + 1


def test_a_long_prompt_is_read_in_chunks_while_the_others_keep_decoding(batched):
    line = Timeline()
    running = [line.follow(batched.generate(user(f"{STORY} {i}"), session_id=f"d{i}", max_tokens=300, **GREEDY),
                           f"d{i}") for i in range(2)]
    first = threading.Event()
    running[0].listen(lambda kind, _p: kind == "token" and first.set())
    assert first.wait(120)
    notes = " ".join(f"Note {i}: the reading at station {i % 17} was steady." for i in range(150))
    long = line.follow(batched.generate(user("Summarise: " + notes), session_id="long", max_tokens=10, **GREEDY),
                       "long")
    result = long.wait()
    assert result.usage["prompt_tokens"] > 1500
    start, first_token = line.first("long", "start"), line.first("long", "token")
    # while its ~2,000 tokens were read, the two running streams went on writing
    assert len(line.between("d0", "token", start, first_token)) >= 3
    assert len(line.between("d1", "token", start, first_token)) >= 3
    for g in running:
        g.cancel()
        g.wait()


def test_a_prompt_that_does_not_fit_beside_the_running_ones_waits_for_them(make_engine):
    eng = make_engine(n_ctx=1024, n_parallel=4)
    line = Timeline()
    # each may write 600 tokens: two cannot hold their cells in a 1,024-token context at once
    a = line.follow(eng.generate(user(STORY), session_id="big-a", max_tokens=600, temperature=0.0,
                                 repeat_penalty=1.0), "a")
    b = line.follow(eng.generate(user(STORY + " Another."), session_id="big-b", max_tokens=600, temperature=0.0,
                                 repeat_penalty=1.0), "b")
    ra, rb = a.wait(), b.wait()
    assert ra.finish_reason in ("stop", "length") and rb.finish_reason in ("stop", "length")
    assert line.first("b", "token") > line.last("a", "token")  # b began writing once a had ended


def running(gen):
    """Return *gen* once the engine has started it."""
    started = threading.Event()
    gen.listen(lambda kind, _p: kind in ("start", "complete", "error") and started.set())
    assert started.wait(120) or gen.state != "queued"
    return gen


def test_an_overflowing_request_fails_alone_and_queue_semantics_hold(make_engine):
    eng = make_engine(n_ctx=2048, n_parallel=2, max_queue=1, queue_timeout=0.5)
    first = running(eng.generate(user(f"{STORY} 0"), session_id="q0", max_tokens=2000, temperature=0.0))
    with pytest.raises(ContextOverflowError):  # in the second slot, beside the first: refused alone
        eng.complete(user("word " * 5000), session_id="huge", max_tokens=10)
    second = running(eng.generate(user(f"{STORY} 1"), session_id="q1", max_tokens=2000, temperature=0.0))
    late = eng.generate(user("hi"), session_id="late", max_tokens=4)
    with pytest.raises(QueueTimeoutError):
        late.wait()  # both slots busy for longer than the queue timeout
    assert eng.busy_session_ids() == {"q0", "q1"} and first.state == second.state == "running"
    for g in (first, second):
        g.cancel()
        assert g.wait().finish_reason == "cancelled"
    assert eng.complete(user("Say yes."), max_tokens=4).finish_reason in ("stop", "length")


def test_a_request_for_another_model_waits_for_the_running_ones(tmp_path, make_engine):
    other = tmp_path / "copy.gguf"
    shutil.copy(resolve_model(None).path, other)
    eng = make_engine(n_parallel=4)
    line = Timeline()
    a = line.follow(eng.generate(user(STORY), session_id="m-a", max_tokens=60, **GREEDY), "a")
    b = line.follow(eng.generate(user("Say hi."), session_id="m-b", model=str(other), max_tokens=5, **GREEDY), "b")
    c = line.follow(eng.generate(user("Say yes."), session_id="m-c", max_tokens=5, **GREEDY), "c")
    for g in (a, b, c):
        g.wait()
    assert line.first("b", "start") > line.last("a", "token")  # the switch waited for a
    assert line.first("c", "start") > line.first("b", "start")  # and c waited behind it (FIFO)
    assert b.result.model == "copy"
