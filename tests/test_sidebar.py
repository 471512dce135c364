"""The JupyterLab extension (labextension/) in a real JupyterLab in headless Chromium: the sessions
sidebar, its streaming chat, Stop, the status-bar item, the stats view, the cell commands and
inserting a reply into a notebook; and its TypeScript unit tests (vitest), which the README's one
test command runs through this module.
"""

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from .browser import (TOKEN, Notebook, api, browser, jp_asyncio_loop, jp_server_cleanup,  # noqa: F401 - fixtures
                      jupyter_lab, screenshots_on_failure, write_notebook)
from .kernels import ServerKernel

ROOT = Path(__file__).resolve().parent.parent
FRONTEND = ROOT / "labextension"
LONG = "Write a long story about a lighthouse keeper, in many paragraphs."
SIDEBAR = "#offgrid-sidebar"


# -- the TypeScript side ----------------------------------------------------------------------------
def test_the_typescript_client_and_sse_reader_pass_their_unit_tests():
    """vitest: the SSE reader, the typed client, and the client's drift check against openapi.json."""
    assert (FRONTEND / "node_modules").is_dir(), (
        "labextension/node_modules is missing: the README's install command builds the frontend "
        "(it needs Node.js >= 18); or run `jlpm install` in labextension/.")
    jlpm = shutil.which("jlpm")
    assert jlpm, "jlpm (from the jupyter-builder package, a dependency of jupyterlab) is not on PATH"
    # CI may ask for colour (FORCE_COLOR): vitest then wraps the counts in escapes the check cannot read
    env = {k: v for k, v in os.environ.items() if k != "FORCE_COLOR"} | {"NO_COLOR": "1"}
    out = subprocess.run([jlpm, "test"], cwd=FRONTEND, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)
    assert re.search(r"Tests\s+\d+ passed", text) and "failed" not in text.lower(), text[-2000:]


def test_the_prebuilt_extension_is_installed_and_enabled():
    out = subprocess.run(["jupyter", "labextension", "list"], capture_output=True, text=True, timeout=120)
    line = next((ln for ln in (out.stdout + out.stderr).splitlines() if "offgrid-jupyter" in ln), "")
    assert "enabled" in line and "OK" in line, out.stdout + out.stderr


# -- the browser --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with jupyter_lab(tmp_path_factory.mktemp("sidebar-lab")) as server:
        with api(server) as c:  # long replies (for Stop), greedy decoding
            settings = {"maxTokens": 1500, "temperature": 0}
            r = c.put("lab/api/settings/offgrid-jupyter:plugin", json={"raw": json.dumps(settings)})
            assert r.status_code == 204, r.text
        yield server


class Lab:
    """A JupyterLab page with the offgrid sidebar; records page errors and console errors."""

    def __init__(self, page, lab, shots: Path):
        self.page, self.lab, self.shots = page, lab, shots
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(
            f"console: {msg.text} ({msg.location.get('url')})"))
        self.workspace = uuid.uuid4().hex[:8]
        self.path = "lab"  # names its screenshot

    def goto(self, path: str = "") -> "Lab":
        where = f"lab/workspaces/{self.workspace}" + (f"/tree/{path}" if path else "")
        self.page.goto(f"{self.lab['url']}{where}?token={TOKEN}")
        self.page.wait_for_selector('[data-id="offgrid-sidebar"]', timeout=90_000)
        return self

    @property
    def root(self):
        return self.page.locator(SIDEBAR)

    def open_sidebar(self) -> None:
        if not self.root.is_visible():
            self.page.locator('.jp-SideBar [data-id="offgrid-sidebar"]').click()
        self.root.wait_for(state="visible")

    def session(self, name: str):
        return self.root.locator(f'.offgrid-session[data-session-name="{name}"]')

    def open_session(self, name: str) -> None:
        self.session(name).locator(".offgrid-session-open").click()
        self.root.locator(".offgrid-chat-view:not([hidden])").wait_for()

    @property
    def bubbles(self):
        return self.root.locator(".offgrid-messages .offgrid-bubble")

    def send(self, text: str) -> None:
        box = self.root.locator("textarea.offgrid-input")
        box.click()
        box.fill(text)
        box.press("Enter")
        # the turn has begun once its question is shown (so wait_idle cannot see the moment before it)
        self.page.wait_for_function(
            "([sel, text]) => [...document.querySelectorAll(sel + ' .offgrid-user')].some("
            "b => b.textContent.trim() === text)", arg=[SIDEBAR, text], timeout=30_000)

    def wait_idle(self, timeout: float = 120) -> None:
        """Until no reply streams and Stop is disabled again."""
        self.page.wait_for_function(
            "sel => { const r = document.querySelector(sel); return r && !r.querySelector('.offgrid-mod-streaming')"
            " && r.querySelector('.offgrid-stop').disabled; }", arg=SIDEBAR, timeout=timeout * 1000)

    def dialog(self, value: str | None, accept: str = ".jp-mod-accept") -> None:
        dialog = self.page.locator(".jp-Dialog")
        dialog.wait_for()
        if value is not None:
            field = dialog.locator("input")
            field.fill(value)
        dialog.locator(f"button{accept}").click()
        dialog.wait_for(state="detached")


@pytest.fixture
def lab_page(lab, browser, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = Lab(context.new_page(), lab, tmp_path / "screenshots")
    with screenshots_on_failure(page.shots, page):
        yield page
    context.close()


def rest_messages(lab, ref: str) -> list[dict]:
    with api(lab) as c:
        r = c.get(f"offgrid/v1/sessions/{ref}")
        assert r.status_code == 200, r.text
        return r.json()["messages"]


def rest_chat(lab, ref: str, message: str, max_tokens: int = 16) -> dict:
    with api(lab) as c:
        r = c.post(f"offgrid/v1/sessions/{ref}/chat", json={"message": message, "max_tokens": max_tokens,
                                                             "temperature": 0, "seed": 1}, timeout=180)
        assert r.status_code == 200, r.text
        return r.json()


def test_the_sidebar_shows_streams_stops_follows_and_survives_a_reload(lab, lab_page):
    with api(lab) as c:
        assert c.post("offgrid/v1/sessions", json={"name": "from-rest"}).status_code == 201
        model = c.get("offgrid/v1/models").json()["current"]["name"]
    rest_chat(lab, "from-rest", "My name is Ada.")
    ui = lab_page.goto()
    ui.open_sidebar()
    item = ui.session("from-rest")
    item.wait_for()
    assert "2 messages" in item.inner_text()
    ui.open_session("from-rest")
    assert ui.bubbles.count() == 2 and ui.bubbles.nth(0).inner_text().strip() == "My name is Ada."

    # a turn typed in the sidebar streams in and is stored once
    ui.send("Say hello in one word.")
    ui.wait_idle()
    stored = rest_messages(lab, "from-rest")
    assert [m["role"] for m in stored] == ["user", "assistant"] * 2
    assert stored[2]["content"] == "Say hello in one word." and stored[3]["content"].strip()
    assert ui.bubbles.count() == 4
    printed = ServerKernel.run_cells(lab["url"], [
        "%load_ext offgrid_jupyter",
        "print(get_ipython().run_line_magic('offgrid', 'history from-rest')._repr_markdown_())"], token=TOKEN)
    history = "".join(m["content"]["text"] for m in printed[1] if m.get("msg_type") == "stream")
    assert "Say hello in one word." in history and "My name is Ada." in history  # the kernel agrees

    # the status item names the model; a long reply shows "generating" there, and Stop keeps what was said
    status = ui.page.locator(".offgrid-status")
    assert model in status.inner_text()
    ui.send(LONG)
    ui.page.wait_for_function("() => document.querySelector('.offgrid-status').textContent.includes('generating')",
                              timeout=60_000)
    ui.page.wait_for_function(
        "sel => { const b = document.querySelector(sel + ' .offgrid-mod-streaming .offgrid-bubble-body');"
        " return b && b.textContent.length > 40; }", arg=SIDEBAR, timeout=60_000)
    ui.root.locator(".offgrid-stop").click()
    ui.wait_idle()
    stopped = rest_messages(lab, "from-rest")[-1]
    assert stopped["role"] == "assistant" and stopped["finish_reason"] == "cancelled" and stopped["content"].strip()
    assert ui.bubbles.count() == 6
    ui.page.wait_for_function("() => document.querySelector('.offgrid-status').textContent.includes('tok/s')",
                              timeout=30_000)

    # a turn made elsewhere appears without a reload
    rest_chat(lab, "from-rest", "A question sent over REST.", max_tokens=8)
    ui.root.locator(".offgrid-bubble.offgrid-user", has_text="A question sent over REST.").wait_for(timeout=30_000)
    assert ui.bubbles.count() == 8

    # a reload keeps the sidebar, the open session and its conversation
    ui.page.reload()
    ui.root.locator(".offgrid-chat-view:not([hidden])").wait_for(timeout=90_000)
    ui.page.wait_for_function("sel => document.querySelectorAll(sel + ' .offgrid-bubble').length === 8",
                              arg=SIDEBAR, timeout=30_000)
    assert ui.root.locator(".offgrid-chat-title").inner_text() == "from-rest"

    # the stats view: headline figures and three charts with bars
    ui.root.locator(".offgrid-tab", has_text="Stats").click()
    ui.root.locator(".offgrid-chart").nth(2).wait_for(timeout=30_000)
    figures = dict(zip(ui.root.locator(".offgrid-figures dt").all_inner_texts(),
                       ui.root.locator(".offgrid-figures dd").all_inner_texts()))
    assert int(figures["Requests (all models)"].replace(",", "")) >= 4 and figures["Model"] == model
    completed, cancelled, failed = (int(x) for x in figures["Completed / cancelled / failed"].split(" / "))
    assert completed >= 3 and cancelled >= 1 and failed == 0
    assert float(figures["Decode tokens/s"]) > 0 and figures["Time to first token, avg."].split()[0].isdigit()
    assert ui.root.locator(".offgrid-chart rect").count() >= 12  # 3 charts, a bar per request
    ui.page.screenshot(path=str(ui.shots.parent / "stats.png"))
    assert ui.errors == []


def test_sessions_are_made_renamed_forked_searched_and_deleted_from_the_sidebar(lab, lab_page):
    with api(lab) as c:
        assert c.post("offgrid/v1/sessions", json={"name": "to-rename"}).status_code == 201
    rest_chat(lab, "to-rename", "Remember the number 7.", max_tokens=8)
    ui = lab_page.goto()
    ui.page.locator(".offgrid-status").click()  # the status item opens the sidebar
    ui.root.wait_for(state="visible")
    ui.session("to-rename").wait_for()

    ui.session("to-rename").locator(".offgrid-rename").click()
    ui.dialog("renamed-one")
    ui.session("renamed-one").wait_for(timeout=30_000)
    assert rest_messages(lab, "renamed-one")[0]["content"] == "Remember the number 7."

    ui.session("renamed-one").locator(".offgrid-fork").click()
    ui.root.locator(".offgrid-chat-view:not([hidden])").wait_for()
    ui.page.wait_for_function("sel => document.querySelectorAll(sel + ' .offgrid-bubble').length === 2",
                              arg=SIDEBAR, timeout=30_000)
    with api(lab) as c:
        listed = c.get("offgrid/v1/sessions").json()["sessions"]
    forks = [s for s in listed if s["message_count"] == 2 and s["name"] != "renamed-one"]
    assert forks, listed
    ui.root.locator(".offgrid-back").click()

    ui.root.locator(".offgrid-new").click()
    ui.dialog("made-here")
    ui.root.locator(".offgrid-chat-view:not([hidden])").wait_for()
    assert ui.root.locator(".offgrid-chat-title").inner_text() == "made-here"
    assert rest_messages(lab, "made-here") == []
    ui.root.locator(".offgrid-back").click()

    ui.root.locator(".offgrid-search").fill("renamed")
    ui.page.wait_for_function("sel => document.querySelectorAll(sel + ' .offgrid-session').length === 1",
                              arg=SIDEBAR)
    ui.session("renamed-one").locator(".offgrid-delete").click()
    ui.dialog(None, ".jp-mod-warn")
    ui.session("renamed-one").wait_for(state="detached", timeout=30_000)
    with api(lab) as c:
        assert c.get("offgrid/v1/sessions/renamed-one").status_code == 404
        assert c.get(f"offgrid/v1/sessions/{forks[0]['id']}").status_code == 200  # the fork stays
    assert ui.errors == []


def test_a_failed_cell_is_explained_and_the_reply_inserted_below_it_and_keys_stay_in_the_sidebar(lab, lab_page):
    write_notebook(lab, "failing.ipynb", ["ratio = 1 / 0", "print('after')"])
    ui = lab_page.goto("failing.ipynb")
    nb = Notebook.__new__(Notebook)  # the notebook helpers, on this page
    nb.page, nb.lab, nb.path, nb.ui, nb.errors = ui.page, lab, "failing.ipynb", "lab", []
    ui.page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    nb.wait_for_kernel()
    nb.run(0)
    ui.page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").wait_for(
        timeout=60_000)
    nb.cell(0).locator(".jp-InputArea-prompt").click()  # the failed cell is the active one
    ui.page.evaluate("() => window.jupyterapp.commands.execute('offgrid:explain-error')")
    ui.root.locator(".offgrid-chat-view:not([hidden])").wait_for(timeout=30_000)
    ui.page.wait_for_function("sel => document.querySelectorAll(sel + ' .offgrid-bubble').length >= 2",
                              arg=SIDEBAR, timeout=30_000)
    ui.wait_idle(timeout=180)
    ui.root.locator(".offgrid-stop").wait_for()
    question = ui.bubbles.nth(0).inner_text()
    assert "ratio = 1 / 0" in question and "ZeroDivisionError" in question

    # keys typed in the sidebar never reach the notebook's shortcuts (a: insert above, d d: delete)
    cells = nb.cells.count()
    box = ui.root.locator("textarea.offgrid-input")
    box.click()
    for key in ("a", "b", "d", "d", "m", "Shift+Enter"):
        box.press(key)
    assert box.input_value() == "abddm\n" and nb.cells.count() == cells
    box.fill("")

    # Insert puts the reply below the active cell (its code blocks as a code cell, else as Markdown)
    nb.cell(0).locator(".jp-InputArea-prompt").click()
    reply = rest_messages(lab, ui.root.locator(".offgrid-chat-view").get_attribute("data-session-id"))[-1]["content"]
    ui.bubbles.nth(1).locator(".offgrid-insert").click()
    ui.page.wait_for_function("([sel, n]) => document.querySelectorAll(sel).length === n",
                              arg=[".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell", cells + 1])
    inserted = ui.page.evaluate(
        "() => { const nb = window.jupyterapp.shell.currentWidget.content;"
        " const m = nb.widgets[1].model; return [m.type, m.sharedModel.getSource()]; }")
    blocks = re.findall(r"```[^\n`]*\n([\s\S]*?)```", reply)
    expected = ("code", "\n\n".join(b.rstrip("\n") for b in blocks)) if blocks else ("markdown", reply)
    assert tuple(inserted) == expected
    assert ui.errors == []
