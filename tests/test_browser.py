"""The chat panel and the quickstart in a real browser: JupyterLab and Notebook 7 in headless Chromium.

Every notebook here runs in kernels the server started, so the magics and the panel use
the server's shared model, as they do for a user of JupyterLab.
"""

import shutil
from pathlib import Path

import pytest

from .browser import (CELLS, CURSOR, Notebook, api, browser, jp_asyncio_loop, jp_server_cleanup,  # noqa: F401 - fixtures
                      jupyter_lab, screenshots_on_failure, write_notebook)
from .browser import TOKEN as LAB_TOKEN
from .kernels import parallel_slots, slots_taken

LAB_AUTH = {"Authorization": f"token {LAB_TOKEN}"}

ROOT = Path(__file__).resolve().parent.parent
LONG = "Write a long story about a lighthouse keeper, in many paragraphs."


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with jupyter_lab(tmp_path_factory.mktemp("lab")) as server:
        yield server


@pytest.fixture
def open_notebook(lab, browser, tmp_path):
    """open_notebook(path, ui="lab") -> Notebook in a fresh page; screenshots of every page on failure."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    opened = []

    def open_(path, ui="lab"):
        nb = Notebook(context.new_page(), lab, path, ui)
        opened.append(nb)
        return nb

    open_.opened = opened
    open_.shots = tmp_path / "screenshots"
    yield open_
    context.close()


def failing_shows(open_notebook):
    return screenshots_on_failure(open_notebook.shots, *open_notebook.opened)


def is_connected(handle) -> bool:
    return handle.evaluate("e => e.isConnected")


# -- the quickstart ---------------------------------------------------------------------------------
def test_the_quickstart_runs_all_without_an_error(lab, open_notebook):
    shutil.copy(ROOT / "notebooks" / "quickstart.ipynb", lab["root"] / "quickstart.ipynb")
    nb = open_notebook("quickstart.ipynb")
    with failing_shows(open_notebook):
        nb.run_all()
        last = nb.cells.count() - 1
        nb.wait_done(last, timeout=240)
        for i in range(last + 1):
            if nb.cell(i).get_attribute("class").count("jp-CodeCell"):
                nb.wait_done(i, timeout=60)
        nb.panel.wait_for(timeout=30_000)
        assert nb.errors_shown() == [] and nb.errors == []


# -- the panel from the keyboard -------------------------------------------------------------------
def open_chat(open_notebook, lab, name, chat="%offgrid chat -n 300 -t 0", ui="lab", *more):
    """A notebook whose first cells load the extension and open the panel, run as a person would."""
    write_notebook(lab, name, ["%load_ext offgrid_jupyter", chat, *more])
    nb = open_notebook(name, ui=ui)
    with failing_shows(open_notebook):
        for i in range(2):
            nb.run(i)
            nb.wait_done(i)
        nb.box.wait_for()
    return nb


@pytest.mark.parametrize("ui", ["lab", "notebook"])
def test_keys_typed_in_the_panel_never_reach_the_notebook(lab, open_notebook, ui):
    baseline = []
    if ui == "notebook":  # Notebook 7 itself reports a page error while it loads (a plain notebook
        write_notebook(lab, "plain.ipynb", ["1 + 1"])  # shows it too): the panel must add none of its own
        plain = open_notebook("plain.ipynb", ui=ui)
        plain.run(0)
        plain.wait_done(0)
        baseline = plain.errors
    nb = open_chat(open_notebook, lab, f"keys-{ui}.ipynb", ui=ui)
    with failing_shows(open_notebook):
        cells, prompt, sources = nb.cells.count(), nb.prompt(1), nb.sources()
        box = nb.box.element_handle()
        nb.box.click()
        nb.page.keyboard.type(LONG[:30])
        nb.page.keyboard.press("Shift+Enter")  # a new line, not "run this cell"
        nb.page.keyboard.type(LONG[30:])
        assert nb.box.input_value() == LONG[:30] + "\n" + LONG[30:]
        assert is_connected(box) and nb.prompt(1) == prompt and nb.cells.count() == cells  # the cell did not re-run
        assert nb.page.evaluate("() => document.activeElement.classList.contains('offgrid-message-box')")

        nb.page.keyboard.press("Enter")  # sends
        nb.wait_for_cursor()
        nb.page.keyboard.type("and dd ab")  # command-mode keys, typed while the reply streams
        assert nb.box.input_value() == "and dd ab"
        assert nb.cells.count() == cells and nb.sources() == sources and nb.prompt(1) == prompt
        nb.page.keyboard.press("Enter")  # sending waits for the reply: the draft stays
        assert nb.box.input_value() == "and dd ab" and len(nb.bubbles()) == 2

        nb.panel.get_by_role("button", name="Stop").click()
        nb.wait_for_reply_done()
        assert nb.bubbles()[-1].rstrip().endswith("interrupted")
        assert set(nb.errors) <= set(baseline), (nb.errors, baseline)


def test_the_conversation_follows_new_text_unless_the_reader_scrolled_up(lab, open_notebook):
    nb = open_chat(open_notebook, lab, "follow.ipynb", "%offgrid chat -n 350 -t 0")
    with failing_shows(open_notebook):
        nb.send(LONG)
        messages = nb.panel.locator(".offgrid-messages")
        geometry = messages.evaluate("m => [m.scrollTop, m.clientHeight, m.scrollHeight]")
        top, height, full = geometry
        assert full > height + 100, geometry  # the reply overflows the 480 px area...
        assert top + height >= full - 5, geometry  # ...and the view followed it to the end
        nb.send("Tell me another long story, about a baker.", wait=False)
        nb.wait_for_cursor()
        messages.evaluate("m => { m.scrollTop = 0; m.dispatchEvent(new Event('scroll')); }")  # the reader goes up
        before = messages.evaluate("m => m.scrollHeight")
        nb.page.wait_for_function("([m, h]) => m.scrollHeight > h + 50", arg=[messages.element_handle(), before])
        assert messages.evaluate("m => m.scrollTop") < 50  # left where the reader is
        nb.wait_for_reply_done()


def test_a_cell_and_the_panel_share_the_notebooks_session_and_the_cells_turn_streams_in(lab, open_notebook):
    nb = open_chat(open_notebook, lab, "shared.ipynb", "%offgrid chat -n 30 -t 0", "lab",
                   "%%offgrid -t 0 -n 250\nWrite a long poem about rain.")
    with failing_shows(open_notebook):
        picked = nb.panel.locator("select").evaluate("s => s.options[s.selectedIndex].text").replace("\xa0", " ")
        assert "this notebook's session" in picked
        nb.send("Hello from the panel.")
        assert "shared" in nb.panel.locator(".widget-html").first.inner_text()  # the header names the session
        nb.run(2)
        nb.wait_for_cursor()  # the cell's reply streams into the panel while the cell runs
        nb.wait_done(2)
        nb.wait_for_reply_done()
        bubbles = nb.bubbles()
        assert len(bubbles) == 4 and "Write a long poem about rain." in bubbles[2]
        nb.page.wait_for_function("() => /4 messages/.test(document.querySelector('.offgrid-panel').textContent)")
        with api(lab) as c:
            sessions = c.get("offgrid/v1/sessions").json()["sessions"]
            names = [s["name"] for s in sessions]
            session = c.get("offgrid/v1/sessions/shared").json()
        assert "shared-2" not in names and [m["role"] for m in session["messages"]] == ["user", "assistant"] * 2
        assert session["messages"][0]["content"] == "Hello from the panel."
        nb.panel.locator("select").select_option(label="New session")  # the picker switches sessions
        nb.page.wait_for_function("() => !document.querySelector('.offgrid-panel .offgrid-messages > *')")
        nb.panel.get_by_text("A new session starts with your first message").wait_for()


# -- a crowd, and what is left in a saved file ---------------------------------------------------------
def test_a_second_notebook_shows_its_queue_position_then_completes(lab, open_notebook):
    write_notebook(lab, "first.ipynb", ["%load_ext offgrid_jupyter",
                                        "%%offgrid -t 0 -n 1500\nWrite a very long story about the sea."])
    write_notebook(lab, "second.ipynb", ["%load_ext offgrid_jupyter", "%%offgrid -t 0 -n 12\nSay hello."])
    first = open_notebook("first.ipynb")
    second = open_notebook("second.ipynb")
    with failing_shows(open_notebook):
        second.run(0)
        second.wait_done(0)
        first.run(0)
        first.wait_done(0)
        first.run(1)
        first.page.wait_for_function("([sel, c]) => document.querySelectorAll(sel)[1].textContent.includes(c)",
                                     arg=[CELLS, CURSOR])
        base = lab["url"] + "offgrid/v1/"
        with api(lab) as c:
            running = c.get("offgrid/v1/generation/status").json()  # the first notebook's turn
        # the model's other slots busy too, each holding few enough cells that all fit beside the first turn
        with slots_taken(base, parallel_slots(base, LAB_AUTH) - 1, LAB_AUTH, max_tokens=250):
            second.run(1)
            output = second.cell(1).locator(".jp-OutputArea")
            output.get_by_text("queued: position 1").wait_for(timeout=60_000)
            with api(lab) as c:  # let the first one go: the second is served next
                assert c.post("offgrid/v1/generation/cancel",
                              json={"request_id": running["generating_request_id"]}).status_code == 200
            second.wait_done(1)
        assert "queued" not in output.inner_text() and output.inner_text().strip()
        assert second.errors_shown() == []


def test_a_saved_panel_comes_back_live_after_a_reload_while_its_kernel_runs(lab, open_notebook):
    nb = open_chat(open_notebook, lab, "reloaded.ipynb", "%offgrid chat -n 16 -t 0")
    console = []
    nb.page.on("console", lambda msg: msg.type == "error" and console.append(msg.text))
    with failing_shows(open_notebook):
        nb.send("Name a colour.")
        nb.page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        nb.page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')")
        with api(lab) as c:
            data = c.get("api/contents/reloaded.ipynb").json()["content"]["cells"][1]["outputs"][0]["data"]
        assert set(data) == {"application/vnd.offgrid.panel+json", "text/markdown", "text/plain"}
        nb.page.reload()  # the kernel runs on
        nb.page.wait_for_selector(".offgrid-panel", timeout=60_000)  # the live panel, not its snapshot
        assert "Name a colour." in nb.bubbles()[0]
        nb.send("Name another one.")  # and it works
        assert len(nb.bubbles()) == 4
        assert nb.page.get_by_text("Error displaying widget").count() == 0 and console == []


def test_a_saved_notebook_with_a_panel_reopens_without_a_widget_error(lab, open_notebook):
    nb = open_chat(open_notebook, lab, "saved.ipynb", "%offgrid chat -n 16 -t 0")
    with failing_shows(open_notebook):
        nb.send("Name a colour.")
        nb.page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        nb.page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')")
        with api(lab) as c:
            saved = c.get("api/contents/saved.ipynb").json()["content"]
            outputs = saved["cells"][1]["outputs"]
            assert "application/vnd.jupyter.widget-view+json" not in outputs[0]["data"]  # (ours keeps its id)
            assert "Name a colour." in outputs[0]["data"]["text/markdown"]
            for session in c.get("api/sessions").json():  # the kernel goes: no widget can live on
                c.delete(f"api/sessions/{session['id']}")
        nb.page.close()
        again = open_notebook("saved.ipynb")
        again.cell(1).get_by_text("run this cell to reopen").wait_for()  # the snapshot (the kernel is new)
        assert again.page.get_by_text("Error displaying widget").count() == 0
        assert "Name a colour." in again.cell(1).inner_text()
