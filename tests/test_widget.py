"""The chat panel, driven from Python through the widget API, on the real default model."""

import threading

import pytest

from offgrid_jupyter.context import Context
from offgrid_jupyter.widget import ChatPanel

from .test_magics import GREEDY, Shell

PARAMS = {"max_tokens": 24, "temperature": 0.0}


@pytest.fixture
def context(engine, store):
    ctx = Context(None, engine=engine, store=store)
    yield ctx
    ctx.close()


def markdown(bubble):
    return bubble.outputs[0]["data"]["text/markdown"]


def last_reply(panel):
    return panel.messages.children[-1]


def test_the_picker_lists_sessions_newest_first_and_shows_a_conversation(context, store):
    older = store.create("older")
    store.add_message(older.id, "user", "old question")
    store.add_message(older.id, "assistant", "old answer")
    newer = store.create("newer")
    store.add_message(newer.id, "user", "new question")
    panel = ChatPanel(context=context)
    labels = [label for label, _ in panel.picker.options]
    assert labels[0] == "New session" and labels[1:3] == ["newer", "older"]
    assert panel.picker.value == "__new__" and panel.messages.children == ()  # no current session yet
    panel.picker.value = older.id
    texts = [getattr(b, "value", "") or markdown(b) for b in panel.messages.children]
    assert "old question" in texts[0] and texts[1].startswith("old answer")
    assert "older" in panel.title.value
    assert ChatPanel("newer", context=context).session_id == newer.id


def test_sending_streams_the_reply_into_the_last_bubble(context, store):
    panel = ChatPanel(context=context, **PARAMS)
    updates = []
    panel.box.value = "Name three rivers."
    panel.send_button.click()
    last_reply(panel).observe(lambda change: updates.append(markdown(last_reply(panel))), names="outputs")
    assert panel.join(120)
    assert len(updates) >= 2 and any(u.endswith("▌") for u in updates)  # partial text, then the final text
    session = store.get(panel.session_id)
    assert [m.role for m in session.messages] == ["user", "assistant"]
    assert markdown(last_reply(panel)).startswith(session.messages[1].content)
    assert "tok/s last reply" in panel.status.value and "in-kernel" in panel.status.value
    assert panel.box.value == "" and not panel.send_button.disabled and panel.stop_button.disabled
    assert session.name.startswith("chat-") and context.current_session(create=False) is None  # not adopted


def test_enter_in_the_message_box_sends(context, store):
    panel = ChatPanel(context=context, **PARAMS)
    panel.box.value = "Hello!"
    panel.box.submitted += 1  # what the browser does on Enter
    assert panel.join(120) and len(store.get(panel.session_id).messages) == 2


def test_stop_cancels_and_keeps_the_partial_reply(context, store):
    panel = ChatPanel(context=context, max_tokens=400, temperature=0.0)
    streaming = threading.Event()
    panel.send("Write a long essay about the history of maps.")
    last_reply(panel).observe(lambda change: streaming.set() if markdown(last_reply(panel)).endswith("▌")
                              else None, names="outputs")
    assert streaming.wait(120)
    panel.stop_button.click()
    assert panel.join(30)
    reply = store.get(panel.session_id).messages[-1]
    assert reply.finish_reason == "cancelled" and 0 < reply.usage["completion_tokens"] < 400
    assert markdown(last_reply(panel)).endswith("*interrupted*")


def test_a_turn_from_the_magic_shows_up_in_the_panel(engine, store):
    shell = Shell(engine, store)
    try:
        ctx = shell.magics.context
        panel = ChatPanel(context=ctx)
        result, _ = shell.run(f"%%offgrid {GREEDY} -n 8\nHello from a cell.")
        assert result.success
        assert panel.session_id is None  # the panel was on "New session": it does not jump
        panel.refresh_button.click()  # the new session is listed after a refresh
        panel.picker.value = ctx.current_session().id
        assert "Hello from a cell." in panel.messages.children[0].value
        shell.run(f"%%offgrid {GREEDY} -n 8\nA second cell.")
        assert len(panel.messages.children) == 4  # live: the magic told the panel's context
    finally:
        shell.close()


def test_errors_render_inline(context, store):
    panel = ChatPanel(context=context, max_tokens=0)
    panel.send("Hi.")
    assert panel.join(30)
    assert "max_tokens must be an integer from 1 to" in panel.error.value
    assert store.messages(panel.session_id) == []  # nothing half-done was stored
    gone = store.create("gone")
    panel = ChatPanel("gone", context=context, **PARAMS)
    store.delete(gone.id)
    panel.send("Hi.")
    assert panel.join(30) and "No session" in panel.error.value


def test_two_panels_queue_through_one_engine(context, store):
    first, second = ChatPanel(context=context, **PARAMS), ChatPanel(context=context, **PARAMS)
    first.send("Tell me about rain.")
    second.send("Tell me about snow.")
    assert first.join(120) and second.join(120)
    for panel in (first, second):
        assert [m.role for m in store.get(panel.session_id).messages] == ["user", "assistant"]
    assert first.session_id != second.session_id
