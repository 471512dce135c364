"""Profiles: named presets a session is made with, kept in the store (see profiles.py), on the real
default model: the store's checks, a turn using its session's profile, and the magics."""

import pytest

from offgrid_jupyter.errors import InvalidRequestError, UnknownProfileError
from offgrid_jupyter.chat.profiles import check_profile
from offgrid_jupyter.chat.turns import ChatTurn

from .conftest import one_line_error

PIRATE = {"system_prompt": "You are a pirate. Every reply starts with 'Arr'.", "temperature": 0, "max_tokens": 10}


def test_profiles_are_checked_kept_listed_replaced_and_deleted(store):
    store.profiles.define({"pirate": PIRATE, "plain": {}})
    assert [p.name for p in store.profiles.list()] == ["pirate", "plain"]
    got = store.profiles.get("pirate")
    assert got.params == {"temperature": 0, "max_tokens": 10} and got.source == "config" and got.max_rounds == 4
    for name, spec, needle in (("bad name", {}, "Invalid session name"), ("x", {"colour": 1}, "unknown setting"),
                               ("x", {"temperature": 9}, "temperature"), ("x", {"tools": ["a b"]}, "tools"),
                               ("x", {"max_rounds": 0}, "max_rounds"), ("x", {"system_prompt": "\ud800"}, "surrogate")):
        with pytest.raises(InvalidRequestError, match=needle):
            check_profile(name, spec)
    with pytest.raises(InvalidRequestError):
        store.profiles.define({"ok": {}, "bad": {"top_p": 2}})  # all checked before any is written
    assert "ok" not in [p.name for p in store.profiles.list()]
    store.profiles.put(check_profile("pirate", {**PIRATE, "max_tokens": 20}))
    assert store.profiles.get("pirate").params["max_tokens"] == 20 and store.profiles.get("pirate").source == "user"
    with pytest.raises(UnknownProfileError, match="known: pirate, plain"):
        store.create("ship", profile="parrot")
    assert store.list() == []  # nothing stored
    store.profiles.delete("plain")
    with pytest.raises(UnknownProfileError):
        store.profiles.delete("plain")


def test_a_turn_uses_its_sessions_profile_unless_it_says_otherwise(engine, store):
    store.profiles.define({"pirate": PIRATE})
    session = store.create("ship", profile="pirate")
    turn = ChatTurn(engine, store, "ship", "Who are you?", source="api").start().finish()
    assert turn.result.params["max_tokens"] == 10 and turn.result.params["temperature"] == 0
    assert turn.result.usage["completion_tokens"] <= 10 and turn.result.usage["prompt_tokens"] > 20  # the system prompt
    assert store.get(session.id).system_prompt is None  # the profile's prompt is applied, not copied
    own = ChatTurn(engine, store, "ship", "And?", source="api", params={"max_tokens": 3, "temperature": None}
                   ).start().finish()
    assert own.result.params["max_tokens"] == 3 and own.result.params["temperature"] == 0
    store.profiles.delete("pirate")  # a profile deleted later: the session goes on without it
    after = ChatTurn(engine, store, "ship", "Still there?", source="api", params={"max_tokens": 4}).start().finish()
    assert after.result.params["temperature"] != 0 and after.reply is not None


def test_magics_add_list_and_use_profiles(make_shell):
    sh = make_shell(profiles={"from-config": {"max_tokens": 5}})
    result, _ = sh.run('%offgrid profile add pirate --system "You are a pirate." -t 0 -n 8')
    assert result.success and "pirate" in result.result.text
    assert sh.run("%offgrid profile add helper --tools add,lookup --max-rounds 3")[0].success
    frame = sh.run("%offgrid profiles")[0].result
    assert list(frame["name"]) == ["from-config", "helper", "pirate"] and list(frame["tools"])[1] == ["add", "lookup"]
    assert list(frame["max_rounds"])[1] == 3
    result, _ = sh.run("%%offgrid --new -s ship --profile pirate\nWho are you?")
    assert result.success
    reply = sh.store.get("ship").messages[-1]
    assert reply.role == "assistant" and reply.metadata["params"]["max_tokens"] == 8
    assert sh.store.get("ship").profile == "pirate"
    one_line_error(*sh.run("%%offgrid -s ship --profile pirate\nAgain?"), "--profile", "--new")
    one_line_error(*sh.run("%%offgrid --new -s boat --profile parrot\nHi"), "No profile 'parrot'")
    one_line_error(*sh.run("%offgrid profile add bad -t 9"), "temperature")
    # a profile's tools are looked up where the turn runs: here, none is defined yet
    one_line_error(*sh.run("%%offgrid --new -s helped --profile helper\nHi"), "No tool '")
    result, _ = sh.run("%offgrid profile delete pirate")
    assert result.success and [p.name for p in sh.store.profiles.list()] == ["from-config", "helper"]
