"""The sidebar with notebooks, in a real JupyterLab (and Notebook 7) in headless Chromium: it follows
the active notebook and its cell commands use the cell's own notebook's session; it opens at the
newest message, follows a reply unless the reader scrolled up, and does not jump when it ends; it
says how a reply ended and why a message waits; a person's text is shown as typed."""

import threading
import uuid

import pytest

from .browser import (TOKEN, Notebook, api, browser, jp_asyncio_loop, jp_server_cleanup,  # noqa: F401 - fixtures
                      jupyter_lab, screenshots_on_failure, write_notebook)
from .test_sidebar import SIDEBAR, Lab, rest_chat, rest_messages

LONG = "Write a long story about a lighthouse keeper, in many paragraphs."


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with jupyter_lab(tmp_path_factory.mktemp("sidebar-notebooks")) as server:
        with api(server) as c:  # greedy decoding; short replies unless a test asks for long ones
            r = c.put("lab/api/settings/offgrid-jupyter:plugin", json={"raw": '{"maxTokens": 48, "temperature": 0}'})
            assert r.status_code == 204, r.text
        yield server


@pytest.fixture
def lab_page(lab, browser, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = Lab(context.new_page(), lab, tmp_path / "screenshots")
    with screenshots_on_failure(page.shots, page):
        yield page
    context.close()


def notebook_on(ui, lab, path):
    """The notebook helpers for the notebook *path* open in *ui*'s page."""
    nb = Notebook.__new__(Notebook)
    nb.page, nb.lab, nb.path, nb.ui, nb.errors = ui.page, lab, path, "lab", []
    ui.page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    nb.wait_for_kernel()
    return nb


def scroll_state(ui):
    return ui.page.evaluate("sel => { const m = document.querySelector(sel + ' .offgrid-messages');"
                            " return [m.scrollTop, m.scrollHeight, m.clientHeight]; }", SIDEBAR)


def at_bottom(ui) -> bool:
    top, height, client = scroll_state(ui)
    return height - top - client < 40


def test_the_sidebar_follows_the_active_notebook_and_cell_commands_use_its_session(lab, lab_page):
    write_notebook(lab, "Sales analysis.ipynb", ["%load_ext offgrid_jupyter", "%%offgrid -t 0 -n 8\nSay hi.",
                                                 "ratio = 1 / 0"])
    write_notebook(lab, "Other notes.ipynb", ["print('other')"])
    ui = lab_page.goto("Sales analysis.ipynb")
    nb = notebook_on(ui, lab, "Sales analysis.ipynb")
    for i in range(3):
        nb.run(i)
        nb.wait_done(i)
    ui.open_sidebar()
    # the notebook's cells made its session (named after it), bound by its path relative to the root
    ui.root.locator(".offgrid-chat-view:not([hidden])").wait_for(timeout=30_000)
    assert ui.root.locator(".offgrid-chat-title").inner_text() == "Sales-analysis"
    assert "Sales analysis.ipynb's conversation" in ui.root.locator(".offgrid-chat-subtitle").inner_text()
    with api(lab) as c:
        bound = c.get("offgrid/v1/notebooks/session", params={"path": "Sales analysis.ipynb"}).json()["session"]
    assert bound["name"] == "Sales-analysis"
    ui.page.wait_for_function("() => document.querySelector('.offgrid-status').textContent.includes('idle')",
                              timeout=30_000)  # the status bar is idle once the kernel is

    # another notebook becomes active: the sidebar offers its conversation (none yet)
    ui.page.evaluate("() => window.jupyterapp.commands.execute('docmanager:open', {path: 'Other notes.ipynb'})")
    hint = ui.root.locator(".offgrid-notebook-hint:not([hidden])")
    hint.wait_for(timeout=60_000)
    assert "Other notes.ipynb has no conversation yet" in hint.inner_text()
    # back to the first notebook: its conversation again
    ui.page.locator(".lm-TabBar-tab", has_text="Sales analysis.ipynb").first.click()
    ui.page.wait_for_function(
        "sel => document.querySelector(sel + ' .offgrid-chat-title').textContent === 'Sales-analysis'"
        " && !document.querySelector(sel + ' .offgrid-chat-view').hidden", arg=SIDEBAR, timeout=30_000)

    # "Explain this error" on the failed cell goes to the notebook's own session
    ui.root.locator(".offgrid-back").click()  # (even with the list shown)
    nb.cell(2).locator(".jp-InputArea-prompt").click()
    ui.page.evaluate("() => window.jupyterapp.commands.execute('offgrid:explain-error')")
    ui.root.locator(".offgrid-chat-view:not([hidden])").wait_for(timeout=30_000)
    ui.wait_idle(timeout=180)
    messages = rest_messages(lab, "Sales-analysis")
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert "ratio = 1 / 0" in messages[2]["content"] and "ZeroDivisionError" in messages[2]["content"]
    with api(lab) as c:
        assert c.get("offgrid/v1/sessions").json()["total"] == 1  # no stray unnamed session
    assert ui.errors == []


def test_it_opens_at_the_newest_message_follows_a_reply_and_never_jumps_when_it_ends(lab, lab_page):
    name = f"long-{uuid.uuid4().hex[:6]}"
    with api(lab) as c:
        assert c.post("offgrid/v1/sessions", json={"name": name}).status_code == 201
        for i in range(27):
            role = "user" if i % 2 == 0 else "assistant"
            body = f"Message {i}: " + ("a line of text that takes some room. " * 6)
            assert c.post(f"offgrid/v1/sessions/{name}/messages", json={"role": role, "content": body}).is_success
    ui = lab_page.goto()
    ui.open_sidebar()
    ui.session(name).wait_for()
    ui.open_session(name)
    ui.page.wait_for_function("([sel, n]) => document.querySelectorAll(sel + ' .offgrid-bubble').length === n",
                              arg=[SIDEBAR, 27], timeout=30_000)
    assert at_bottom(ui)  # the newest message, not the oldest

    ui.send("Say hello in a few words.")
    ui.wait_idle()
    assert at_bottom(ui)  # sending shows the question; it followed the reply, and did not jump when it ended

    with api(lab) as c:  # a long reply, to scroll up while it streams
        c.put("lab/api/settings/offgrid-jupyter:plugin", json={"raw": '{"maxTokens": 400, "temperature": 0}'})
    ui.page.reload()
    ui.root.locator(".offgrid-chat-view:not([hidden])").wait_for(timeout=90_000)
    ui.send(LONG)
    streamed = ("n => { const b = document.querySelector('" + SIDEBAR + " .offgrid-mod-streaming .offgrid-bubble-body');"
                " return b && b.textContent.length > n; }")
    ui.page.wait_for_function(streamed, arg=40, timeout=60_000)
    assert at_bottom(ui)  # following it
    ui.page.evaluate("sel => { document.querySelector(sel + ' .offgrid-messages').scrollTop = 200; }", SIDEBAR)
    ui.page.wait_for_function(streamed, arg=400, timeout=60_000)
    assert abs(scroll_state(ui)[0] - 200) < 5  # the reader scrolled up: it no longer follows
    ui.wait_idle()
    assert abs(scroll_state(ui)[0] - 200) < 5  # and the end of the reply does not move the view
    ui.page.screenshot(path=str(ui.shots.parent / "scroll.png"))
    with api(lab) as c:
        c.put("lab/api/settings/offgrid-jupyter:plugin", json={"raw": '{"maxTokens": 48, "temperature": 0}'})
    assert ui.errors == []


def test_it_says_how_a_reply_ended_and_why_a_message_waits_and_shows_text_as_typed(lab, lab_page):
    name = f"said-{uuid.uuid4().hex[:6]}"
    with api(lab) as c:
        assert c.post("offgrid/v1/sessions", json={"name": name}).status_code == 201
    rest_chat(lab, name, "Count from one to fifty.", max_tokens=4)  # cut by the token limit
    ui = lab_page.goto()
    ui.open_sidebar()
    ui.session(name).wait_for()
    ui.open_session(name)
    assert "cut at the 4-token limit" in ui.bubbles.nth(1).locator(".offgrid-bubble-note").inner_text()

    # a person's text is text: nothing read as HTML or Markdown, line breaks kept
    typed = "Columns:\n<ArrowStringArray>\n**not bold** and `not code`"
    box = ui.root.locator("textarea.offgrid-input")
    box.fill(typed)
    box.press("Enter")
    ui.wait_idle()
    question = ui.root.locator(".offgrid-user").last.locator(".offgrid-bubble-body")
    assert question.inner_text() == typed

    # a message sent while another turn of the conversation runs (REST here; a cell alike) says it
    # waits, and shows that turn streaming
    started = threading.Event()

    def elsewhere():
        with api(lab) as c, c.stream("POST", f"offgrid/v1/sessions/{name}/chat", timeout=180, json={
                "message": LONG, "max_tokens": 300, "stream": True, "temperature": 0}) as r:
            for line in r.iter_lines():
                if line == "event: token":
                    started.set()

    t = threading.Thread(target=elsewhere)
    t.start()
    assert started.wait(60)
    box.fill("And what happened next?")
    box.press("Enter")
    ui.page.wait_for_function(
        "sel => document.querySelector(sel + ' .offgrid-state').textContent.includes('Waiting for the turn')",
        arg=SIDEBAR, timeout=30_000)
    ui.root.locator(".offgrid-mod-following").wait_for(timeout=30_000)  # the other turn, streaming
    ui.page.wait_for_function(
        "sel => (document.querySelector(sel + ' .offgrid-mod-following .offgrid-bubble-body') || {}).textContent"
        "?.length > 20", arg=SIDEBAR, timeout=60_000)
    ui.page.screenshot(path=str(ui.shots.parent / "waiting.png"))
    t.join(180)

    # Stop: the reply is marked stopped
    ui.wait_idle(timeout=180)
    with api(lab) as c:  # (long replies for this part)
        c.put("lab/api/settings/offgrid-jupyter:plugin", json={"raw": '{"maxTokens": 600, "temperature": 0}'})
    ui.page.reload()
    ui.root.locator(".offgrid-chat-view:not([hidden])").wait_for(timeout=90_000)
    ui.send(LONG)
    ui.page.wait_for_function(
        "sel => { const b = document.querySelector(sel + ' .offgrid-mod-streaming .offgrid-bubble-body');"
        " return b && b.textContent.length > 40; }", arg=SIDEBAR, timeout=60_000)
    ui.root.locator(".offgrid-stop").click()
    ui.wait_idle()
    assert rest_messages(lab, name)[-1]["finish_reason"] == "cancelled"
    last = ui.root.locator(".offgrid-assistant").last
    assert "stopped" in last.locator(".offgrid-bubble-note").inner_text()
    with api(lab) as c:
        c.put("lab/api/settings/offgrid-jupyter:plugin", json={"raw": '{"maxTokens": 48, "temperature": 0}'})
    assert ui.errors == []


def test_notebook_7_cell_commands_use_the_notebooks_session_and_show_text_as_typed(lab, browser, tmp_path):
    write_notebook(lab, "Seven.ipynb", ["%load_ext offgrid_jupyter", "%%offgrid -t 0 -n 8\nSay hi.", "value = [1, 2][5]"])
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    nb = Notebook(page, lab, "Seven.ipynb", ui="notebook")
    errors = []
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    with screenshots_on_failure(tmp_path / "screenshots", nb):
        for i in range(3):
            nb.run(i)
            nb.wait_done(i)
        nb.cell(2).click(button="right")  # Notebook 7 exposes no app object: the cell's context menu
        page.locator(".lm-Menu-itemLabel", has_text="Explain this error with offgrid").click()
        page.locator(f"{SIDEBAR} .offgrid-chat-view:not([hidden])").wait_for(timeout=30_000)
        page.wait_for_function(
            "sel => { const r = document.querySelector(sel); return r && !r.querySelector('.offgrid-mod-streaming')"
            " && r.querySelector('.offgrid-stop').disabled && r.querySelectorAll('.offgrid-bubble').length >= 4; }",
            arg=SIDEBAR, timeout=180_000)
        assert page.locator(f"{SIDEBAR} .offgrid-chat-title").inner_text() == "Seven"
        messages = rest_messages(lab, "Seven")
        assert len(messages) == 4 and "IndexError" in messages[2]["content"]
        question = page.locator(f"{SIDEBAR} .offgrid-user").last.locator(".offgrid-bubble-body").inner_text()
        assert question == messages[2]["content"]  # the question, line breaks and code fences as sent
        page.screenshot(path=str(tmp_path / "notebook7.png"))
    # Notebook 7 itself reports one page error while it loads (its settings' "schema"): none of ours
    assert [e for e in nb.errors if "schema" not in e] == [] and errors == []
    context.close()


def test_at_lists_the_kernels_variables_and_chips_attach_them_and_the_active_cell(lab, lab_page):
    write_notebook(lab, "Attach.ipynb", ["%load_ext offgrid_jupyter",
                                         "import pandas as pd\nsales = pd.DataFrame({'units': [1, None]})\n"
                                         "sale_count = 2\nclient_secret = 'abc'"])
    ui = lab_page.goto("Attach.ipynb")
    nb = notebook_on(ui, lab, "Attach.ipynb")
    for i in range(2):
        nb.run(i)
        nb.wait_done(i)
    nb.cell(1).click()  # the active cell: the one "+ Cell" attaches
    ui.open_sidebar()
    ui.root.locator(".offgrid-notebook-hint:not([hidden]) .offgrid-start-notebook").click()
    ui.root.locator(".offgrid-chat-view:not([hidden])").wait_for(timeout=30_000)
    box = ui.root.locator("textarea.offgrid-input")
    box.click()
    box.press_sequentially("How many gaps are in @sa")
    items = ui.root.locator(".offgrid-mention-list:not([hidden]) .offgrid-mention")
    items.first.wait_for(timeout=30_000)
    listed = items.evaluate_all("els => els.map(e => [e.dataset.name, e.querySelector('.offgrid-mention-type')"
                                ".textContent])")
    assert listed == [["sales", "DataFrame"], ["sale_count", "int"]]  # filtered as typed, from the kernel
    box.press("Enter")  # chooses the first
    assert box.input_value() == "How many gaps are in @sales "
    assert ui.root.locator(".offgrid-chip").evaluate_all("els => els.map(e => e.dataset.chip)") == ["@sales"]
    box.press_sequentially("and @zzz")
    ui.root.locator(".offgrid-mention-note").wait_for()
    assert "No variable matches “zzz”" in ui.root.locator(".offgrid-mention-note").inner_text()
    box.press("Escape")
    box.fill("How many gaps are in @sales?")
    ui.root.locator(".offgrid-attach-cell").click()
    assert ui.root.locator(".offgrid-chip").count() == 2
    ui.page.screenshot(path=str(lab_page.shots / "attach-before-send.png"))
    box.press("Enter")
    ui.page.wait_for_selector(f"{SIDEBAR} .offgrid-user .offgrid-attachment", timeout=30_000)
    ui.wait_idle()
    assert ui.root.locator(".offgrid-chip").count() == 0  # sent: the chips go with the message
    ui.page.wait_for_function(  # what the server stored (with its token counts) replaces the sent bubble
        "sel => [...document.querySelectorAll(sel + ' .offgrid-user .offgrid-attachment summary')]"
        ".every(s => s.textContent.endsWith('tokens'))", arg=SIDEBAR, timeout=30_000)
    summaries = ui.root.locator(".offgrid-user .offgrid-attachment summary").all_inner_texts()
    assert summaries[0].startswith("@sales · DataFrame · ") and summaries[1].startswith("cell In[2] · code · ")
    gauge = ui.root.locator(".offgrid-gauge").inner_text()
    assert gauge.startswith("context ") and "(when full, the oldest turns go first)" in gauge
    with api(lab) as c:
        sid = c.get("offgrid/v1/notebooks/session", params={"path": "Attach.ipynb"}).json()["session"]["id"]
        user = [m for m in c.get(f"offgrid/v1/sessions/{sid}").json()["messages"] if m["role"] == "user"][-1]
    assert user["content"] == "How many gaps are in @sales?"
    context = user["metadata"]["context"]
    assert [(i["kind"], i["name"]) for i in context] == [("variable", "sales"), ("cell", "In[2]")]
    assert "- units: float64, 1 null" in context[0]["text"] and "client_secret = 'abc'" in context[1]["text"]
    ui.root.locator(".offgrid-user .offgrid-attachment summary").first.click()  # opens on what the model read
    ui.page.screenshot(path=str(lab_page.shots / "attach-sent.png"))
    assert not ui.errors, ui.errors
