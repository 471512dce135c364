"""A chat turn is atomic: a question is never stored without an answer."""

import pytest

from offgrid_jupyter.errors import InvalidModelError, InvalidRequestError
from offgrid_jupyter.turns import ChatTurn

from .conftest import GREEDY
from .test_engine import occupy


def test_a_turn_stores_the_question_then_the_reply_with_provenance(engine, store):
    s = store.create("t")
    turn = ChatTurn(engine, store, "t", "Name a colour.", source="test", params={"max_tokens": 12, **GREEDY},
                    metadata={"cell_id": "c1"})
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
    turn = ChatTurn(engine, store, s.id, "Hi.", source="test", model=str(bad), params={"max_tokens": 4})
    with pytest.raises(InvalidModelError):
        turn.finish()
    assert store.messages(s.id) == []


def test_cancelled_before_any_text_stores_nothing_but_partial_text_is_kept(engine, store):
    s = store.create()
    blocker, events = occupy(engine)
    queued = ChatTurn(engine, store, s.id, "Hi.", source="test", params={"max_tokens": 4})
    queued.cancel()
    assert queued.finish().result.finish_reason == "cancelled"
    assert store.messages(s.id) == []
    events.close()  # cancels the blocker, which has produced text
    blocker.wait()

    turn = ChatTurn(engine, store, s.id, "Write a long story.", source="test", params={"max_tokens": 300, **GREEDY})
    for kind, _ in turn.generation.events():
        if kind == "token":
            turn.cancel()
    outcome = turn.finish()
    assert outcome.result.finish_reason == "cancelled" and outcome.reply is not None
    assert [m.finish_reason for m in store.messages(s.id)] == [None, "cancelled"]


def test_one_shot_turns_store_nothing(engine, store):
    turn = ChatTurn(engine, store, None, "Hi.", source="test", history=False, system_prompt="Be terse.",
                    params={"max_tokens": 4, **GREEDY})
    outcome = turn.finish()
    assert outcome.session_id is None and outcome.reply is None and store.count() == 0
    assert turn.generation.messages[0] == {"role": "system", "content": "Be terse."}
