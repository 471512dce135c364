"""The chat panel, driven from Python through the widget API, on the real default model."""

import threading

import ipywidgets as widgets
import pytest

from offgrid_jupyter.kernel.context import Context
from offgrid_jupyter.kernel.widget import ChatPanel

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
    assert "this notebook's session" in labels[0] and labels[1:3] == ["newer", "older"] and labels[-1] == "New session"
    assert panel.picker.value == "__current__" and panel.messages.children == ()  # no session yet
    panel.picker.value = older.id
    texts = [getattr(b, "value", "") or markdown(b) for b in panel.messages.children]
    assert "old question" in texts[0] and texts[1].startswith("old answer")
    assert "older" in panel.title.value and "2 messages" in panel.title.value
    assert ChatPanel("newer", context=context).session_id == newer.id


def test_the_first_message_creates_the_notebooks_session_the_cells_use(context, store):
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
    assert context.current_session(create=False).id == session.id  # the cells' session now
    assert "2 messages" in panel.title.value  # the header follows the turns
    other = ChatPanel(context=context, **PARAMS)
    assert other.session_id == session.id  # a second panel opens on it too
    other.picker.value = "__new__"
    other.send("A separate question.")
    assert other.join(120) and other.session_id != session.id
    assert context.current_session(create=False).id == session.id  # "New session" does not take over the cells


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


def test_a_turn_from_the_magic_streams_into_the_panel(engine, store):
    shell = Shell(engine, store)
    try:
        ctx = shell.magics.context
        panel = ChatPanel(context=ctx)  # on the notebook's session, which no cell has created yet
        seen = []
        panel.messages.observe(lambda change: _watch_reply(panel, seen), names="children")
        result, _ = shell.run(f"%%offgrid {GREEDY} -n 40\nWrite a short poem about rain.")
        assert result.success
        assert panel.session_id == ctx.current_session().id  # the cell created it; the panel follows it
        assert any(text.endswith("▌") for text in seen), seen  # streamed while the cell ran
        texts = [getattr(b, "value", "") or markdown(b) for b in panel.messages.children]
        assert "Write a short poem about rain." in texts[0] and len(texts) == 2
        assert not texts[1].endswith("▌") and texts[1].startswith(store.get(panel.session_id).messages[1].content)
        shell.run(f"%%offgrid {GREEDY} -n 8\nA second cell.")
        assert len(panel.messages.children) == 4 and "4 messages" in panel.title.value
    finally:
        shell.close()


def _watch_reply(panel, seen):
    reply = panel.messages.children[-1] if panel.messages.children else None
    if isinstance(reply, widgets.Output) and not getattr(reply, "_watched", False):
        reply._watched = True
        reply.observe(lambda change: seen.append(markdown(reply)), names="outputs")


def test_typing_during_a_reply_stays_in_the_box_and_stop_before_any_text_takes_the_turn_back(context, store):
    panel = ChatPanel(context=context, max_tokens=300, temperature=0.0)
    blocker = context.engine.generate([{"role": "user", "content": "Write a long story."}], max_tokens=300)
    panel.send("Queued behind another generation.")
    assert panel.busy
    panel.box.value = "a draft typed meanwhile"
    panel.box.submitted += 1  # Enter while a reply is pending: sending waits, the draft stays
    assert panel.box.value == "a draft typed meanwhile" and not panel.send_button.disabled is False
    panel.stop_button.click()  # stopped while queued, before any text
    blocker.cancel()
    assert panel.join(60)
    assert panel.messages.children == () and store.messages(panel.session_id) == []  # nothing shown or stored
    assert panel.box.value == "a draft typed meanwhile"
    assert "interrupted" not in str([getattr(b, "value", "") for b in panel.messages.children])


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
    second.picker.value = "__new__"
    first.send("Tell me about rain.")
    second.send("Tell me about snow.")
    assert first.join(120) and second.join(120)
    for panel in (first, second):
        assert [m.role for m in store.get(panel.session_id).messages] == ["user", "assistant"]
    assert first.session_id != second.session_id
    third = ChatPanel(first.session_id, context=context, **PARAMS)  # two panels on one session take turns
    first.send("And about fog?")
    third.send("And about hail?")
    assert first.join(120) and third.join(120)
    assert [m.role for m in store.get(first.session_id).messages] == ["user", "assistant"] * 3


def test_the_new_session_menu_makes_a_session_with_a_profile(context, store):
    store.profiles.define({"terse": {"system_prompt": "Answer in at most five words.", "max_tokens": 8}})
    panel = ChatPanel(context=context, temperature=0.0)
    choices = dict((v, k) for k, v in panel.picker.options)
    assert choices["__new__:terse"] == "New session with profile terse"
    panel.picker.value = "__new__:terse"
    assert "profile terse" in panel.title.value
    panel.send("Describe the sea.")
    assert panel.join(120)
    session = store.get(panel.session_id)
    assert session.profile == "terse" and [m.role for m in session.messages] == ["user", "assistant"]
    assert session.messages[1].metadata["params"]["max_tokens"] == 8  # the profile's, as for any turn


def test_a_panel_with_rag_answers_from_learned_files_and_shows_its_sources(context, store, tmp_path):
    from .test_rag import corpus

    store.library.learn([str(corpus(tmp_path))], "projects", root=tmp_path)
    panel = ChatPanel(context=context, rag="projects", **PARAMS)
    panel.send("Which language is the Ostrich pipeline written in?")
    assert panel.join(120)
    shown = markdown(last_reply(panel))
    assert "**Sources**" in shown and "notes/ostrich.md" in shown
    assert store.get(panel.session_id).messages[1].metadata["sources"][0]["path"] == "notes/ostrich.md"
    panel.refresh()  # the stored conversation shows them too
    assert "notes/ostrich.md" in markdown(last_reply(panel))


def test_at_name_in_the_panel_attaches_the_kernels_variable_and_shows_it_as_a_chip(engine, store):
    import pandas as pd

    shell = Shell(engine, store)
    try:
        shell.ip.user_ns["sales"] = pd.DataFrame({"units": [1, None]})
        panel = ChatPanel(context=shell.magics.context, **PARAMS)
        panel.send("Which column of @sales has a gap? Write to a@b.org.")
        assert panel.join(120)
        session = store.get(panel.session_id)
        [item] = session.messages[0].metadata["context"]
        assert (item["kind"], item["name"], item["type"]) == ("variable", "sales", "DataFrame")
        assert session.chat_messages()[0]["content"].startswith("Attached context:\n\n### @sales (DataFrame)")
        bubble = panel.messages.children[-2].value
        assert '<details class="offgrid-chip"><summary>@sales · DataFrame · ' in bubble
        assert "context " in panel.status.value and " tokens (when full, the oldest turns go first)" in panel.status.value
        again = ChatPanel(panel.session_id, context=shell.magics.context)  # reopened: the chip is still there
        assert "offgrid-chip" in again.messages.children[0].value
    finally:
        shell.close()


def test_a_fix_shows_in_the_panel_as_a_diff_with_apply_below(engine, store):
    import json as _json

    shell = Shell(engine, store)
    try:
        session = shell.magics.context.current_session()
        question = store.add_message(session.id, "user", "Fix In[2]: it failed.", metadata={
            "task": "fix", "cell": "In[2]", "target_source": "total = x + 1"})
        store.add_message(session.id, "assistant", _json.dumps({"code": "x = 0\ntotal = x + 1",
                                                                "explanation": "x was not defined"}))
        assert question.metadata["task"] == "fix"
        panel = ChatPanel(session.id, context=shell.magics.context)
        shown, apply = panel.messages.children[-1].children
        assert "offgrid-diff" in shown.value and "+x = 0" in shown.value and "x was not defined" in shown.value
        shell.ip.rl_next_input = None
        apply.click()
        assert shell.ip.rl_next_input == "x = 0\ntotal = x + 1"  # (a terminal shell's set_next_input)
        assert apply.disabled and apply.description.startswith("Applied")
    finally:
        shell.close()
