"""A chat turn is atomic: a question is never stored without an answer."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from offgrid_jupyter.errors import InvalidModelError, InvalidRequestError, TurnCancelledError
from offgrid_jupyter.chat.turns import ChatTurn

from .conftest import GREEDY
from .test_engine import occupy


def test_a_turn_stores_the_question_then_the_reply_with_provenance(engine, store):
    s = store.create("t")
    turn = ChatTurn(engine, store, "t", "Name a colour.", source="test", params={"max_tokens": 12, **GREEDY},
                    metadata={"cell_id": "c1"}).start()
    assert [m.role for m in store.messages(s.id)] == ["user"]  # stored before generation
    outcome = turn.finish()
    user, reply = store.messages(s.id)
    assert user.metadata == {"cell_id": "c1"} and reply.id == outcome.reply.id
    assert reply.metadata["request_id"] == outcome.result.request_id and reply.usage == outcome.result.usage
    assert outcome.provenance()["message_id"] == reply.id and len(outcome.model_sha256) == 64


def test_bad_params_store_nothing(engine, store):
    s = store.create()
    with pytest.raises(InvalidRequestError):
        ChatTurn(engine, store, s.id, "Hi.", source="test", params={"max_tokens": 0})
    assert store.messages(s.id) == []


def test_a_failed_generation_takes_the_question_back(engine, store, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    s = store.create()
    turn = ChatTurn(engine, store, s.id, "Hi.", source="test", model=str(bad), params={"max_tokens": 4}).start()
    with pytest.raises(InvalidModelError):
        turn.finish()
    assert store.messages(s.id) == []


def test_cancelled_before_any_text_stores_nothing_but_partial_text_is_kept(engine, store):
    s = store.create()
    blocker, events = occupy(engine)
    queued = ChatTurn(engine, store, s.id, "Hi.", source="test", params={"max_tokens": 4}).start()
    queued.cancel()
    assert queued.finish().result.finish_reason == "cancelled"
    assert store.messages(s.id) == []
    events.close()  # cancels the blocker, which has produced text
    blocker.wait()

    turn = ChatTurn(engine, store, s.id, "Write a long story.", source="test",
                    params={"max_tokens": 300, **GREEDY}).start()
    for kind, _ in turn.generation.events():
        if kind == "token":
            turn.cancel()
    outcome = turn.finish()
    assert outcome.result.finish_reason == "cancelled" and outcome.reply is not None
    assert [m.finish_reason for m in store.messages(s.id)] == [None, "cancelled"]


def test_one_shot_turns_store_nothing(engine, store):
    turn = ChatTurn(engine, store, None, "Hi.", source="test", history=False, system_prompt="Be terse.",
                    params={"max_tokens": 4, **GREEDY}).start()
    outcome = turn.finish()
    assert outcome.session_id is None and outcome.reply is None and store.count() == 0
    assert turn.generation.messages[0] == {"role": "system", "content": "Be terse."}


# -- turns on one session take turns, first come first served, from threads and from asyncio ----
def test_the_session_lock_is_fifo_and_waiters_may_give_up():
    from offgrid_jupyter.chat import turns

    first = turns.claim("s")
    assert first.done()  # free: granted at once
    second, third, fourth = turns.claim("s"), turns.claim("s"), turns.claim("s")
    assert not second.done() and turns.waiting("s") == 3
    turns.give_up("s", third)  # stops waiting: never granted
    turns.release("s")
    assert second.done() and not fourth.done()
    turns.give_up("s", second)  # granted, then given up: passes the turn on
    assert fourth.done() and third.cancelled()
    turns.release("s")
    assert "s" not in turns._sessions  # nothing left behind


def test_same_session_turns_from_many_threads_complete_as_pairs_in_order(engine, store):
    s = store.create("crowd")
    order, errors = [], []

    def ask(i):
        try:
            outcome = ChatTurn(engine, store, s.id, f"Question {i}.", source="test",
                               params={"max_tokens": 4, **GREEDY}).start().finish()
            order.append(outcome.user_message.content)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    msgs = store.get(s.id).messages
    assert [m.role for m in msgs] == ["user", "assistant"] * 8  # never interleaved
    assert [m.content for m in msgs[::2]] == order  # stored in the order the turns were served


def test_a_turn_cancelled_while_waiting_for_its_session_stores_nothing(engine, store):
    s = store.create("wait")
    holder = ChatTurn(engine, store, s.id, "Write a long story.", source="test", params={"max_tokens": 200}).start()
    waiter = ChatTurn(engine, store, s.id, "Me next.", source="test", params={"max_tokens": 4})
    raised = []
    t = threading.Thread(target=lambda: raised.append(_raises(waiter.start)))
    t.start()
    while turns_waiting(s.id) == 0:  # the waiter is queued behind the holder
        time.sleep(0.001)
    waiter.cancel()
    t.join(30)
    assert isinstance(raised[0], TurnCancelledError)
    holder.cancel()
    holder.finish()
    assert "Me next." not in [m.content for m in store.messages(s.id)]


def test_asyncio_turns_wait_on_the_loop_not_in_threads(engine, store):
    s = store.create("loop")
    pool = ThreadPoolExecutor(1)  # one thread for every store call of ten turns: it must never be held

    async def main():
        loop = asyncio.get_running_loop()

        def run(fn, *args):
            return loop.run_in_executor(pool, fn, *args)

        async def ask(i):
            turn = await ChatTurn(engine, store, s.id, f"Q{i}", source="test",
                                  params={"max_tokens": 3, **GREEDY}).start_async(run)
            return (await turn.finish_async(run)).reply is not None

        return await asyncio.wait_for(asyncio.gather(*(ask(i) for i in range(10))), 120)

    assert all(asyncio.run(main()))
    assert [m.role for m in store.get(s.id).messages] == ["user", "assistant"] * 10
    pool.shutdown()


def turns_waiting(session_id):
    from offgrid_jupyter.chat import turns

    return turns.waiting(session_id)


def _raises(fn):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None
