"""The magics in real Jupyter kernels (jupyter_client, nbclient) on the real default model."""

import os
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from offgrid_jupyter.stats import requests_frame
from offgrid_jupyter.chat.store import Store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def kernel_env(home, notebook=None):
    env = {k: v for k, v in os.environ.items() if k != "JPY_SESSION_NAME"}
    env["OFFGRID_HOME"] = str(home)
    if notebook:
        env["JPY_SESSION_NAME"] = str(notebook)  # what jupyter-server tells the kernels it starts
    return env


@pytest.fixture
def kernel(home):
    km, kc = start_new_kernel(kernel_name="python3", env=kernel_env(home), startup_timeout=60)
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def execute(kc, code, *, cell_id=None, on_message=None, timeout=120):
    """Run one cell the way JupyterLab does (cellId in the request metadata);
    return the execute_reply and the cell's iopub messages."""
    msg = kc.session.msg("execute_request", {"code": code, "silent": False, "store_history": True,
                                             "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
                         metadata={"cellId": cell_id} if cell_id else {})
    kc.shell_channel.send(msg)
    msg_id = msg["header"]["msg_id"]
    messages = []
    while True:
        m = kc.get_iopub_msg(timeout=timeout)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(m)
        if on_message is not None:
            on_message(m)
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
    while True:
        reply = kc.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply, messages


def displays(messages):
    return [m for m in messages if m["msg_type"] in ("display_data", "update_display_data")]


def test_streaming_through_a_kernel_and_rerun_by_cell_id(kernel, home):
    _km, kc = kernel
    reply, _ = execute(kc, "%load_ext offgrid_jupyter")
    assert reply["content"]["status"] == "ok"
    cell = "%%offgrid -t 0 --seed 42 -n 80\nWrite a short story about a lighthouse keeper."
    reply, messages = execute(kc, cell, cell_id="cell-a")
    assert reply["content"]["status"] == "ok"
    shown = displays(messages)
    assert shown[0]["msg_type"] == "display_data"
    display_id = shown[0]["content"]["transient"]["display_id"]
    updates = [m for m in shown if m["msg_type"] == "update_display_data"]
    assert len(updates) >= 2 and all(m["content"]["transient"]["display_id"] == display_id for m in updates)
    meta = updates[-1]["content"]["metadata"]["offgrid"]
    assert meta["usage"]["completion_tokens"] > 0 and meta["model"].startswith("SmolLM2")

    reply, messages = execute(kc, cell.replace("lighthouse keeper", "baker"), cell_id="cell-a")  # re-run
    assert reply["content"]["status"] == "ok"
    store = Store(home / "offgrid.sqlite3")
    session = store.get(meta["session_id"])
    assert len(session.messages) == 2 and "baker" in session.messages[0].content
    requests = requests_frame(store)  # the kernel recorded both runs in the shared database
    assert len(requests) == 2 and meta["request_id"] in set(requests["request_id"])
    assert set(requests["source"]) == {"magic"}


def test_interrupt_stops_generation_keeps_the_partial_reply_and_the_next_cell_runs(kernel, home):
    km, kc = kernel
    execute(kc, "%load_ext offgrid_jupyter")
    execute(kc, "%%offgrid -t 0 -n 3\nHi.")  # the model is loaded: the interrupt hits decoding
    state = {}

    def interrupt_once_text_streams(m):
        if (m["msg_type"] == "update_display_data" and "interrupted_at" not in state
                and m["content"]["data"].get("text/markdown", "").endswith("▌")):
            state["interrupted_at"] = time.monotonic()
            km.interrupt_kernel()
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            state["idle_at"] = time.monotonic()

    reply, messages = execute(kc, "%%offgrid -t 0 --seed 42 -n 400\nWrite a long essay about the history of maps.",
                              on_message=interrupt_once_text_streams)
    assert "interrupted_at" in state
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "Interrupted"
    errors = [m for m in messages if m["msg_type"] == "error"]
    assert len(errors) == 1 and len(errors[0]["content"]["traceback"]) == 1  # one line, no traceback
    assert "partial reply is kept" in errors[0]["content"]["traceback"][0]
    final = displays(messages)[-1]["content"]
    assert "interrupted after" in final["data"]["text/markdown"]
    assert final["metadata"]["offgrid"]["finish_reason"] == "cancelled"
    latency = state["idle_at"] - state["interrupted_at"]
    print(f"interrupt to idle: {latency * 1000:.0f} ms")  # bench/magics.py measures this figure

    store = Store(home / "offgrid.sqlite3")
    last = store.messages(final["metadata"]["offgrid"]["session_id"])[-1]
    assert last.role == "assistant" and last.finish_reason == "cancelled"
    assert 0 < last.usage["completion_tokens"] < 400 and last.content.strip()

    reply, messages = execute(kc, "%%offgrid -t 0 -n 5\nSay hi.")
    assert reply["content"]["status"] == "ok"
    assert displays(messages)[-1]["content"]["metadata"]["offgrid"]["finish_reason"] in ("stop", "length")


def run_notebook(cells, home, notebook_path):
    nb = new_notebook(cells=[new_code_cell(c) for c in cells])
    client = NotebookClient(nb, kernel_name="python3", timeout=120)
    client.execute(env=kernel_env(home, notebook_path))
    return nb


def offgrid_meta(cell):
    return [o["metadata"]["offgrid"] for o in cell.outputs if "offgrid" in o.get("metadata", {})]


def test_a_restarted_kernel_continues_the_notebooks_session(home, tmp_path):
    notebook = tmp_path / "Sales analysis.ipynb"
    first = run_notebook(["%load_ext offgrid_jupyter",
                          "%%offgrid -t 0 --seed 42 -n 20\nMy name is Ada. Reply with one word."], home, notebook)
    second = run_notebook(["%load_ext offgrid_jupyter",
                           "%%offgrid -t 0 --seed 42 -n 20\nWhat is my name?",
                           "%offgrid history"], home, notebook)
    (m1,), (m2,) = offgrid_meta(first.cells[1]), offgrid_meta(second.cells[1])
    assert m1["session_id"] == m2["session_id"]
    assert m2["usage"]["prompt_tokens"] > m1["usage"]["total_tokens"]  # the first kernel's turn is in the prompt
    session = Store(home / "offgrid.sqlite3").get(m1["session_id"])
    assert session.name == "Sales-analysis" and len(session.messages) == 4
    assert "My name is Ada" in second.cells[2].outputs[0]["data"]["text/markdown"]


def test_quickstart_notebook_runs_headless(home):
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute(env=kernel_env(home))  # raises CellExecutionError if any cell fails
    replies = [meta for cell in nb.cells if cell.cell_type == "code" for meta in offgrid_meta(cell)]
    assert len(replies) == 4
    assert len({m["session_id"] for m in replies if m["session_id"]}) == 1  # one conversation, plus a one-shot
    json_cell = next(c for c in nb.cells if c.cell_type == "code" and "-f json" in c.source)
    assert any(o["output_type"] == "execute_result" for o in json_cell.outputs)


def test_extension_loads_from_ipython_config(tmp_path):
    profile = tmp_path / "ipython" / "profile_default"
    profile.mkdir(parents=True)
    (profile / "ipython_config.py").write_text(
        'c.InteractiveShellApp.extensions = ["offgrid_jupyter"]\n'
        "c.OffgridMagics.max_tokens = 7\n"
        'c.OffgridMagics.format = "text"\n')
    import subprocess
    import sys

    code = ("m = get_ipython().magics_manager.registry['OffgridMagics']; "
            "print('settings', m.max_tokens, m.format, m.context.engine.loaded)")
    out = subprocess.run([sys.executable, "-m", "IPython", f"--ipython-dir={tmp_path / 'ipython'}",
                          "--no-banner", "-c", code], capture_output=True, text=True, timeout=60,
                         env=kernel_env(tmp_path / "home"))
    assert "settings 7 text False" in out.stdout, out.stdout + out.stderr  # loaded, configured, model not loaded
