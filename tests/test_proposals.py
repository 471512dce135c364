"""Fix, edit and generate cells as diffs the person accepts, in a real JupyterLab and Notebook 7 in
headless Chromium: the diff appears on the cell (`.offgrid-diff`), Accept changes exactly the source
and one undo restores it, Reject and Escape leave it, Accept and Run executes it, an edit of the cell
while the proposal is written drops it, Generate inserts its cells in one undoable step."""

import json

import pytest

from offgrid_jupyter.chat.edits import Task, parse

from .browser import (TOKEN, Notebook, api, browser, jp_asyncio_loop, jp_server_cleanup,  # noqa: F401 - fixtures
                      jupyter_lab, screenshots_on_failure, write_notebook)

FAILING = ["values = [3, 1, 2]", "total = sum(values) + missing_offset"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with jupyter_lab(tmp_path_factory.mktemp("proposals")) as server:
        yield server


@pytest.fixture
def open_notebook(lab, browser, tmp_path):
    pages = []

    def open_(path: str, ui: str = "lab") -> Notebook:
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        nb = Notebook(context.new_page(), lab, path, ui)
        pages.append((context, nb))
        return nb

    with screenshots_on_failure(tmp_path / "screenshots", *[]):
        yield open_
    for context, nb in pages:
        context.close()


def source(nb: Notebook, i: int) -> str:
    """Cell *i*'s source as its editor shows it (JupyterLab and Notebook 7 alike)."""
    return nb.page.evaluate("i => [...document.querySelectorAll('.jp-Notebook .jp-Cell')[i]"
                            ".querySelectorAll('.jp-InputArea-editor .cm-line')].map(l => l.textContent).join('\\n')",
                            i)


def cell_count(nb: Notebook) -> int:
    return nb.page.evaluate("() => window.jupyterapp.shell.currentWidget.content.widgets.length")


def stored_proposal(lab, path: str, kind: str, original: str) -> str:
    """The code the server's stored reply proposes (parsed as the route parses it)."""
    with api(lab) as c:
        sid = c.get("offgrid/v1/notebooks/session", params={"path": path}).json()["session"]["id"]
        messages = c.get(f"offgrid/v1/sessions/{sid}").json()["messages"]
    question, reply = messages[-2], messages[-1]
    assert question["metadata"]["task"] == kind and question["metadata"]["target_source"] == original
    return parse(reply["content"], Task(kind, original, "x", error="e", instruction="i")).code


def wait_state(nb: Notebook, state: str, timeout: float = 120) -> None:
    nb.page.wait_for_selector(f'.offgrid-diff[data-state="{state}"]', timeout=timeout * 1000)


def fail_second_cell(lab, path: str, ui: str, open_notebook) -> Notebook:
    write_notebook(lab, path, FAILING)
    nb = open_notebook(path, ui)
    for i in range(2):
        nb.run(i)
        nb.wait_done(i)
    return nb


@pytest.mark.parametrize("ui", ["lab", "notebook"])
def test_fix_shows_a_diff_and_accept_replaces_exactly_that_and_undo_restores(lab, open_notebook, ui, tmp_path):
    baseline = []
    if ui == "notebook":  # Notebook 7 itself reports page errors while it loads: ours must add none
        write_notebook(lab, "plain.ipynb", ["1 + 1"])
        plain = open_notebook("plain.ipynb", ui)
        plain.run(0)
        plain.wait_done(0)
        baseline = plain.errors
    path = f"fix-{ui}.ipynb"
    nb = fail_second_cell(lab, path, ui, open_notebook)
    button = nb.cell(1).locator(".offgrid-fix-button")  # the error's own button
    button.wait_for(timeout=30_000)
    button.click()
    nb.page.wait_for_selector(".offgrid-diff", timeout=30_000)
    wait_state(nb, "ready")
    nb.page.screenshot(path=str(tmp_path / f"fix-{ui}-ready.png"))
    proposed = stored_proposal(lab, path, "fix", FAILING[1])
    shown = nb.page.locator(".offgrid-diff-body").inner_text()
    assert any(line.startswith("+") for line in shown.splitlines())  # a diff of the cell, filled in
    assert source(nb, 1) == FAILING[1]  # nothing changes before Accept
    nb.page.locator(".offgrid-diff-accept").click()
    nb.page.wait_for_selector(".offgrid-diff", state="detached")
    assert source(nb, 1) == proposed  # exactly what the diff showed
    nb.cell(1).locator(".jp-InputArea-editor .cm-content").click()
    nb.page.keyboard.press("Control+z")  # one undo in the cell restores it
    nb.page.wait_for_function("s => [...document.querySelectorAll('.jp-Notebook .jp-Cell')[1].querySelectorAll("
                              "'.jp-InputArea-editor .cm-line')].map(l => l.textContent).join('\\n') === s",
                              arg=FAILING[1], timeout=10_000)
    assert set(nb.errors) <= set(baseline), (nb.errors, baseline)


def test_reject_escape_and_a_second_proposal_leave_the_cell_and_accept_and_run_runs_it(lab, open_notebook):
    path = "fix-reject.ipynb"
    nb = fail_second_cell(lab, path, "lab", open_notebook)
    app = "window.jupyterapp"
    nb.page.evaluate(f"() => {{ const nb = {app}.shell.currentWidget.content; nb.activeCellIndex = 1; }}")
    nb.page.evaluate(f"() => {app}.commands.execute('offgrid:fix-cell')")
    wait_state(nb, "ready")
    nb.page.locator(".offgrid-diff-reject").click()
    nb.page.wait_for_selector(".offgrid-diff", state="detached")
    assert source(nb, 1) == FAILING[1]
    nb.page.evaluate(f"() => {app}.commands.execute('offgrid:fix-cell')")
    nb.page.evaluate(f"() => {app}.commands.execute('offgrid:fix-cell')")  # a second one replaces the first
    wait_state(nb, "ready")
    assert nb.page.locator(".offgrid-diff").count() == 1
    nb.page.locator(".offgrid-diff").press("Escape")
    nb.page.wait_for_selector(".offgrid-diff", state="detached")
    assert source(nb, 1) == FAILING[1]
    count_before = nb.prompt(1)
    nb.page.evaluate(f"() => {app}.commands.execute('offgrid:fix-cell')")
    wait_state(nb, "ready")
    proposed = stored_proposal(lab, path, "fix", FAILING[1])
    nb.page.locator(".offgrid-diff-accept-run").click()
    nb.page.wait_for_function("p => { const c = document.querySelectorAll('.jp-Notebook .jp-Cell')[1];"
                              " const t = c.querySelector('.jp-InputPrompt').textContent;"
                              " return /\\[\\d+\\]/.test(t) && t.trim() !== p; }", arg=count_before, timeout=60_000)
    assert source(nb, 1) == proposed  # accepted, then run: its prompt shows a new execution count


def test_edit_has_a_shortcut_no_default_uses_and_an_edit_of_the_cell_drops_the_proposal(lab, open_notebook, tmp_path):
    path = "edit.ipynb"
    write_notebook(lab, path, ["squares = []\nfor i in range(10):\n    squares.append(i * i)"])
    nb = open_notebook(path)
    taken = nb.page.evaluate("() => window.jupyterapp.commands.keyBindings.filter(b => b.keys.join(' ') === "
                             "'Ctrl Alt E').map(b => b.command)")
    assert taken == ["offgrid:edit-cell"]  # no JupyterLab default shares the keys
    nb.cell(0).locator(".jp-InputArea-editor .cm-content").click()
    nb.page.keyboard.press("Control+Alt+e")
    box = nb.page.locator(".offgrid-diff-instruction")
    box.wait_for(timeout=10_000)
    box.fill("Rewrite this loop as a list comprehension.")
    nb.page.screenshot(path=str(tmp_path / "edit-asking.png"))
    box.press("Enter")
    wait_state(nb, "ready")
    nb.page.screenshot(path=str(tmp_path / "edit-ready.png"))
    nb.page.locator(".offgrid-diff-reject").click()
    original = source(nb, 0)
    # again, and the person types in the cell while the proposal is written: it is dropped
    nb.page.evaluate("() => window.jupyterapp.commands.execute('offgrid:edit-cell')")
    box = nb.page.locator(".offgrid-diff-instruction")
    box.fill("Add a docstring-like comment on top explaining the loop in detail.")
    box.press("Enter")
    wait_state(nb, "streaming")
    nb.page.evaluate("() => window.jupyterapp.shell.currentWidget.content.widgets[0].model.sharedModel"
                     ".updateSource(0, 0, '# mine\\n')")
    wait_state(nb, "dropped", timeout=30)
    assert "nothing was overwritten" in nb.page.locator(".offgrid-diff-warning").inner_text()
    assert source(nb, 0) == "# mine\n" + original


def test_generate_previews_cells_and_inserts_them_in_one_undoable_step(lab, open_notebook, tmp_path):
    path = "generate.ipynb"
    write_notebook(lab, path, ["import math"])
    nb = open_notebook(path)
    nb.page.evaluate("() => window.jupyterapp.commands.execute('offgrid:generate-cells')")
    box = nb.page.locator(".offgrid-diff-instruction")
    box.wait_for(timeout=10_000)
    box.fill("Compute the square root of 2 and print it.")
    box.press("Enter")
    wait_state(nb, "ready")
    nb.page.screenshot(path=str(tmp_path / "generate-ready.png"))
    previewed = nb.page.locator(".offgrid-diff-body .offgrid-diff-hunk").count()
    assert previewed >= 1 and cell_count(nb) == 1
    nb.page.locator(".offgrid-diff-accept").click()
    nb.page.wait_for_function(f"n => window.jupyterapp.shell.currentWidget.content.widgets.length === n",
                              arg=1 + previewed, timeout=10_000)
    nb.page.evaluate("() => window.jupyterapp.commands.execute('notebook:undo-cell-action')")
    nb.page.wait_for_function("() => window.jupyterapp.shell.currentWidget.content.widgets.length === 1",
                              timeout=10_000)  # one undo removes them all
    assert source(nb, 0) == "import math"


def test_the_proposals_route_refuses_bad_input_naming_the_field(lab):
    with api(lab) as c:
        c.post("offgrid/v1/sessions", json={"name": "proposals-bad"})
        for body, needle in (({"task": "rewrite"}, "task"),
                             ({"task": "fix", "source": "x = 1"}, "error"),
                             ({"task": "edit", "source": "x = 1"}, "instruction"),
                             ({"task": "edit", "source": "  ", "instruction": "go"}, "empty"),
                             ({"task": "fix", "source": "x = 1\n" * 9000, "error": "E"}, "tokens")):
            r = c.post("offgrid/v1/sessions/proposals-bad/proposals", json=body)
            assert r.status_code in (400, 413) and needle in r.json()["error"]["message"], (body, r.text)
        assert c.get("offgrid/v1/sessions/proposals-bad").json()["messages"] == []
