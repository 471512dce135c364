"""Inline completion: the prompt and where a suggestion ends (logic), the engine's reserved
sequence (never behind a chat, cancelled within a step, the next keystroke read from the cache),
the route with hostile input and an aborted request, and ghost text in a real JupyterLab."""

import json
import threading
import time

import httpx
import pytest

from offgrid_jupyter.errors import InvalidRequestError
from offgrid_jupyter.inference.completion import CompletionRequest, cache_key, prompt_tokens, trim

from .browser import (TOKEN, Notebook, api, browser, jp_asyncio_loop, jp_server_cleanup,  # noqa: F401 - fixtures
                      jupyter_lab, screenshots_on_failure, write_notebook)


class Letters:
    """A tokenizer of one token per character, for the prompt's logic (unit test only)."""

    def __init__(self, fim=None, bos=()):
        self.fim, self.bos = fim, list(bos)

    def tokenize(self, text):
        return [ord(c) for c in text]

    def fim_tokens(self):
        return self.fim

    def start_tokens(self):
        return self.bos


def test_a_request_is_checked_and_names_what_is_wrong():
    for bad, field in ((dict(prefix="x\ud800"), "prefix"), (dict(prefix="x", max_tokens=0), "max_tokens"),
                       (dict(prefix="x", max_tokens=True), "max_tokens"), (dict(prefix="x" * 200_001), "prefix"),
                       (dict(prefix="x", context=["a"] * 101), "context"), (dict(prefix="x", context=["\udfff"]), "context")):
        with pytest.raises(InvalidRequestError, match=field):
            CompletionRequest(**bad).check()
    assert cache_key("a/b c.ipynb") == "completion:a/b c.ipynb" and cache_key("../x;rm") == "completion:../x_rm"


def test_the_prompt_is_fim_when_the_model_has_the_tokens_and_keeps_the_text_near_the_cursor():
    request = CompletionRequest(prefix="def f(x):\n    ", suffix="\nprint(f(2))", context=["import os"])
    assert request.indent == "    " and request.text_before() == "import os\n\ndef f(x):\n"  # the indentation comes back
    plain = prompt_tokens(Letters(bos=[1]), request, 100)
    assert plain == [1, *map(ord, "import os\n\ndef f(x):\n")]  # prefix only: no suffix without FIM tokens
    fim = prompt_tokens(Letters(fim=(-2, -3, -4)), request, 100)
    assert fim == [-2, *map(ord, "import os\n\ndef f(x):\n"), -3, *map(ord, "\nprint(f(2))"), -4]
    long = CompletionRequest(prefix="".join(f"line {i}\n" for i in range(2000)) + "x = ")
    tokens = prompt_tokens(Letters(), long, 900)
    text = "".join(map(chr, tokens))
    assert len(tokens) <= 900 and text.endswith("line 1999\nx = ") and text.startswith("line ")  # a line's start
    grown = CompletionRequest(prefix=long.prefix + "1")  # the next keystroke: the same start, so the cache serves it
    assert "".join(map(chr, prompt_tokens(Letters(), grown, 900))).startswith(text[:-1])


def test_a_suggestion_ends_at_the_line_the_block_or_the_brackets_and_never_repeats_the_suffix():
    mid = CompletionRequest(prefix="print(", suffix=")\n")
    assert trim("len(xs))  # done\nmore", mid) == "len(xs)"  # the cursor's bracket closes: the suffix has it
    assert trim("a, b", CompletionRequest(prefix="f(", suffix=", c)")) == "a, b"
    body = CompletionRequest(prefix="def f(x):\n    ")
    assert trim("\treturn x * 2\n    \n    y = 1", body) == "return x * 2"  # the cursor's indentation, a blank line
    assert trim("return x\ndef g():\n    pass", body) == "return x"  # indentation dropped: its first line only
    assert trim("    y = x\n    return y\ndef g():", body) == "y = x\n    return y"  # back out of the block
    assert trim("\n    return x", body) == ""  # a blank line first: nothing to show
    top = CompletionRequest(prefix="import os\n", suffix="\nprint(total)\n")
    assert trim("total = 1\nprint(total)\nmore = 2", top) == "total = 1"  # the suffix is there already
    assert trim("x = 1\n```\nprose", top) == "x = 1" and trim("x = 1\nx = 1\nx = 1", top) == "x = 1"
    opener = CompletionRequest(prefix="for i in range(3):")
    assert trim("\n    print(i)\n    total += i\nprint('done')", opener) == "\n    print(i)\n    total += i"


@pytest.fixture(scope="module")
def engine():
    from offgrid_jupyter.inference.engine import Engine

    e = Engine(n_ctx=1024, n_parallel=2, tune_threads=False)
    yield e
    e.close()


def test_a_completion_joins_a_running_chat_at_once_and_the_next_keystroke_reads_from_the_cache(engine):
    above = ["import math", "radius = 2.0"]
    first = engine.complete_inline(CompletionRequest(prefix="def area(r):\n    ", context=above, path="a.ipynb"))
    r1 = first.wait()
    assert r1.source == "completion" and r1.finish_reason in ("stop", "length") and r1.usage["prompt_tokens"] > 5
    # two chats hold both chat sequences and a third waits in the queue: the completion does not wait
    chats = [engine.generate([{"role": "user", "content": f"Count from 1 to 200, story {i}."}], max_tokens=300,
                             temperature=0.0) for i in range(3)]
    while sum(g.state == "running" for g in chats) < 2:
        time.sleep(0.01)
    assert chats[2].state == "queued"
    nxt = engine.complete_inline(CompletionRequest(prefix="def area(r):\n    ret", context=above, path="a.ipynb"))
    r2 = nxt.wait()
    assert chats[2].state == "queued" and all(g.state == "running" for g in chats[:2])  # it went past them
    assert r2.queue_stats["queue_wait_ms"] < 1000  # joined the next step (a generous bound: a chat's step)
    assert r2.usage["cached_tokens"] >= r1.usage["prompt_tokens"] - 2  # only the new characters were read
    status = engine.status()
    assert all(g["request_id"] != nxt.request_id for g in status["generating"])  # not a turn anyone waits on
    # a newer keystroke replaces a waiting one for the same file; cancel frees the slot within a step
    slow = engine.complete_inline(CompletionRequest(prefix="for i in range(10):\n", path="b.py", max_tokens=256))
    while slow.state != "running":
        time.sleep(0.005)
    time.sleep(0.1)
    slow.cancel()
    assert slow.wait().finish_reason == "cancelled"
    assert engine._batcher.reserved_free
    for g in chats:
        g.cancel()
    assert all(g.wait().finish_reason == "cancelled" or g.wait().finish_reason in ("stop", "length") for g in chats)


def test_a_completions_cells_stay_while_someone_types_beside_a_chat_and_go_once_typing_stops(engine, monkeypatch):
    from offgrid_jupyter.inference import batching

    monkeypatch.setattr(batching, "COMPLETION_IDLE", 0.5)
    chat = engine.generate([{"role": "user", "content": "Count from 1 to 300."}], max_tokens=400, temperature=0.0)
    while chat.state != "running":
        time.sleep(0.01)
    prefix = "import math\n\ndef circle(r):\n    area = math.pi"
    first = engine.complete_inline(CompletionRequest(prefix=prefix, path="idle.py", max_tokens=4)).wait()
    reserved = engine._batcher.reserved
    assert reserved.owner == "completion:idle.py" and reserved.tokens  # kept beside the running chat
    typed = engine.complete_inline(CompletionRequest(prefix=prefix + " *", path="idle.py", max_tokens=4)).wait()
    assert typed.usage["cached_tokens"] >= first.usage["prompt_tokens"] - 2
    deadline = time.monotonic() + 30
    while reserved.tokens and time.monotonic() < deadline:
        if chat.done:  # (a reply may end early) something must keep running for the cells to be in the way
            chat = engine.generate([{"role": "user", "content": "Name every month."}], max_tokens=400)
        time.sleep(0.05)  # polling the engine's state, not waiting a fixed time
    assert not reserved.tokens and engine.kv.get("completion:idle.py") is not None  # out, into the snapshot LRU
    later = engine.complete_inline(CompletionRequest(prefix=prefix + " * r", path="idle.py", max_tokens=4)).wait()
    assert later.usage["cached_tokens"] >= first.usage["prompt_tokens"] - 2  # restored, not read again
    chat.cancel()
    chat.wait()


def test_a_completion_model_of_its_own_is_an_engine_of_its_own(engine):
    from offgrid_jupyter.runtime import make_completer

    assert make_completer(engine, None) is engine  # by default, the chat model's reserved sequence
    own = make_completer(engine, str(engine.model.path), completion_ctx=512)  # c.OffgridApp.completion_model
    try:
        assert own is not engine and own.completion_ctx == 512 and own.n_parallel == 1
        result = own.complete_inline(CompletionRequest(prefix="total = ", max_tokens=4)).wait()
        assert result.finish_reason in ("stop", "length") and result.source == "completion"
        assert engine.status()["generating"] == [] and not engine._urgent  # the chat engine did nothing
    finally:
        own.close()


def test_a_crowd_of_files_gets_busy_errors_past_the_bound_and_the_engine_serves_on(engine):
    from offgrid_jupyter.errors import EngineBusyError
    from offgrid_jupyter.inference.engine import MAX_URGENT

    started, refused = [], 0
    for i in range(MAX_URGENT + 6):  # more files than may wait at once (one runs, MAX_URGENT wait)
        try:
            started.append(engine.complete_inline(CompletionRequest(prefix=f"value_{i} = ", path=f"crowd-{i}.py",
                                                                    max_tokens=8)))
        except EngineBusyError as exc:
            refused += 1
            assert "try again" in str(exc)
    assert refused >= 5 and len(started) >= MAX_URGENT
    assert all(g.wait().finish_reason in ("stop", "length") for g in started)  # every one admitted is served
    again = engine.complete_inline(CompletionRequest(prefix="x = ", path="after.py", max_tokens=4)).wait()
    assert again.finish_reason in ("stop", "length") and engine._batcher.reserved_free


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with jupyter_lab(tmp_path_factory.mktemp("completion")) as server:
        yield server


def test_the_route_answers_refuses_hostile_input_and_an_abort_stops_the_model(lab):
    url = f"{lab['url']}offgrid/v1/completions/inline"
    with api(lab) as c:
        ok = c.post(url, json={"prefix": "import math\n\ndef area(r):\n    ", "suffix": "", "path": "x.ipynb",
                               "context": ["radius = 2.0"], "max_tokens": 16})
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert set(body) >= {"items", "model", "latency_ms", "finish_reason", "usage"} and body["latency_ms"] > 0
        assert all(isinstance(i["insertText"], str) and i["insertText"].strip() for i in body["items"])
        empty = c.post(url, json={"prefix": "", "max_tokens": 256})  # nothing to continue: an answer, at once
        assert empty.status_code == 200 and empty.json()["items"] == [], empty.text
        for bad, status, field in (({}, 400, "prefix"), ({"prefix": 1}, 400, "prefix"),
                                   ({"prefix": "x", "max_tokens": 10**9}, 400, "max_tokens"),
                                   ({"prefix": "x", "context": "cells"}, 400, "context"),
                                   ({"prefix": "x", "context": [["nested"]]}, 400, "context"),
                                   ({"prefix": "x", "suffix": "\ud800"}, 400, "suffix"),
                                   ({"prefix": "x" * 3_000_000}, 413, "")):
            r = c.post(url, content=json.dumps(bad), headers={"Content-Type": "application/json"})
            assert r.status_code == status and field in r.json()["error"]["message"], (bad, r.text)
        assert httpx.post(url, json={"prefix": "x"}).status_code == 403  # Jupyter's authentication
        before = c.get(f"{lab['url']}offgrid/v1/stats").json()["completions"]["models"]
        cancelled_before = sum(m["cancelled"] for m in before.values())

    # a client that goes away (the editor's next keystroke aborts its fetch) stops the model
    def abandon():
        try:
            httpx.post(url, json={"prefix": "for i in range(100):\n", "max_tokens": 256},
                       headers={"Authorization": f"token {TOKEN}"}, timeout=0.3)
        except httpx.TimeoutException:
            pass

    t = threading.Thread(target=abandon)
    t.start()
    t.join()
    with api(lab) as c:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = c.get(f"{lab['url']}offgrid/v1/stats").json()
            if sum(m["cancelled"] for m in stats["completions"]["models"].values()) > cancelled_before:
                break
            time.sleep(0.1)
        models = stats["completions"]["models"]
        assert sum(m["cancelled"] for m in models.values()) == cancelled_before + 1
        assert all(m["requests"] >= 2 for m in models.values())
        chats = stats["inference"]["models"]  # counted apart: the chats' figures hold no completion
        assert all(m["total_requests"] == 0 for m in chats.values()) or not chats


@pytest.mark.parametrize("ui", ["lab", "notebook"])
def test_ghost_text_appears_tab_inserts_it_and_a_different_key_dismisses_it(lab, browser, tmp_path, ui):
    path = write_notebook(lab, f"complete-{ui}.ipynb", ["import math\nradius = 2.0", ""])
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    baseline = []
    if ui == "notebook":  # Notebook 7 itself reports page errors while it loads: ours must add none
        plain = Notebook(context.new_page(), lab, write_notebook(lab, "plain.ipynb", ["1 + 1"]), ui)
        baseline = plain.errors
    console = []
    page = context.new_page()
    page.on("console", lambda m: m.type == "error" and console.append(m.text))
    answers = []
    page.on("response", lambda r: "completions/inline" in r.url and r.ok and answers.append(r.json()))
    nb = Notebook(page, lab, path, ui)
    with screenshots_on_failure(tmp_path / "screenshots", nb):
        editor = nb.cell(1).locator(".jp-InputArea-editor .cm-content")
        editor.click()
        # JupyterLab asks on its own once the line has text before the cursor (CodeMirror indents the body)
        page.keyboard.type("def area(r):\nreturn ")
        ghost = page.locator(".jp-GhostText")
        ghost.wait_for(timeout=60_000)
        assert page.locator('[data-provided-by="offgrid"]').count() >= 1  # ours, on by default (no setting made)
        shown = ghost.inner_text()
        assert shown.strip()
        page.screenshot(path=str(tmp_path / f"ghost-{ui}.png"))
        page.keyboard.press("Tab")  # JupyterLab's key to accept
        page.wait_for_selector(".jp-GhostText", state="detached", timeout=10_000)
        text = page.evaluate("() => [...document.querySelectorAll('.jp-Notebook .jp-Cell')[1].querySelectorAll("
                             "'.jp-InputArea-editor .cm-line')].map(l => l.textContent).join('\\n')")
        # the server's answer the ghost showed (accepting it asks again: later answers may follow)
        suggested = [i["insertText"] for a in answers for i in a["items"]
                     if " ".join(i["insertText"].split()) == " ".join(shown.split())]
        assert suggested and text.startswith("def area(r):\n    return "), (text, shown, answers)
        # what Tab inserted is the suggestion (up to whitespace: the editor re-indents what it inserts)
        assert " ".join(text.split()) == " ".join(("def area(r):\n    return " + suggested[-1]).split()), (
            repr(text), repr(suggested[-1]), answers)

        # the next line: a suggestion appears; a key it does not begin with dismisses it
        page.keyboard.press("Enter")
        page.keyboard.press("Shift+Tab")  # back out of the function's body
        page.keyboard.type("print(area(")
        ghost.wait_for(timeout=60_000)
        first = ghost.inner_text()
        other = next(ch for ch in "#@~" if not first.lstrip().startswith(ch))
        page.keyboard.type(other)
        page.wait_for_function("g => { const e = document.querySelector('.jp-GhostText');"
                               " return !e || e.textContent !== g; }", arg=first, timeout=10_000)
        page.screenshot(path=str(tmp_path / f"dismissed-{ui}.png"))
    context.close()
    assert set(nb.errors) <= set(baseline) and not console, (nb.errors, baseline, console)


def test_the_inline_completion_notebook_runs_headless(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    from .test_kernel import kernel_env

    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    nb = nbformat.read(root / "notebooks" / "inline-completion.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(root / "notebooks")}}).execute(
        env=kernel_env(tmp_path / "home"))
    shown = nb.cells[1].outputs[0]["data"]["text/plain"]
    assert "'items'" in shown and "'usage'" in shown
    table = nb.cells[-1].outputs[0]["data"]["text/html"]
    assert table.count("</tr>") == 4  # a header and the three completions, each counted as one
