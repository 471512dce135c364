"""A real JupyterLab (and Notebook 7) in headless Chromium, driven by Playwright, for the browser tests.

The server runs on a loopback port with its own token, config, runtime, settings,
workspaces and offgrid data directories; the browser is Debian's Chromium (Playwright's
own browser download is not available here). Without Chromium the tests fail with the
command that installs it, unless OFFGRID_SKIP_BROWSER_TESTS=1 opts out explicitly.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from .kernels import clean_env, free_port, serving

TOKEN = "browser-test-token"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SKIP_ENV = "OFFGRID_SKIP_BROWSER_TESTS"
CURSOR = "▌"
CELLS = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell"  # the cells of the notebook in view


def chromium() -> str:
    path = os.environ.get("OFFGRID_CHROMIUM", "/usr/bin/chromium")
    if Path(path).exists():
        return path
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"no Chromium at {path} and {SKIP_ENV}=1")
    pytest.fail(f"The browser tests need Chromium at {path}: install it with `apt-get install -y chromium` "
                f"(Debian/Ubuntu), point OFFGRID_CHROMIUM at another Chromium, or set {SKIP_ENV}=1 to skip them.")


@contextmanager
def jupyter_lab(root: Path):
    """`jupyter lab` on a loopback port, everything it keeps in *root*; yields {url, home, proc}."""
    port = free_port()
    dirs = {name: root / name for name in ("notebooks", "config", "runtime", "settings", "workspaces", "home")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    news = dirs["settings"] / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True, exist_ok=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no network, no popup
    env = clean_env(dirs["home"], JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
                    JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]), JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]))
    with serving("jupyterlab", port, dirs["notebooks"], env, "--LabApp.expose_app_in_browser=True",
                 token=TOKEN) as proc:
        yield {"url": f"http://127.0.0.1:{port}/", "root": dirs["notebooks"], "home": dirs["home"], "proc": proc}


def api(lab) -> httpx.Client:
    return httpx.Client(base_url=lab["url"], headers={"Authorization": f"token {TOKEN}"}, timeout=60)


def write_notebook(lab, name: str, sources: list[str]) -> str:
    cells = [{"cell_type": "markdown" if src.startswith("#") else "code", "id": f"cell-{i}", "metadata": {},
              "source": src, **({} if src.startswith("#") else {"outputs": [], "execution_count": None})}
             for i, src in enumerate(sources)]
    nb = {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}
    with api(lab) as c:
        assert c.put(f"api/contents/{name}", json={"type": "notebook", "content": nb}).status_code in (200, 201)
    return name


class Notebook:
    """One notebook open in a page (JupyterLab, or Notebook 7 with ``ui="notebook"``)."""

    def __init__(self, page, lab, path: str, ui: str = "lab"):
        self.page, self.lab, self.path, self.ui = page, lab, path, ui
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        # a workspace of its own, so no other notebook is restored into the page
        where = f"lab/workspaces/{uuid.uuid4().hex[:8]}/tree" if ui == "lab" else "notebooks"
        page.goto(f"{lab['url']}{where}/{path}?token={TOKEN}")
        page.wait_for_selector(f"{CELLS}", timeout=90_000)
        self.wait_for_kernel()

    # -- the notebook ---------------------------------------------------------------------
    def wait_for_kernel(self, timeout: float = 90) -> None:
        """Until the notebook's kernel has started and is idle (asked through the REST API)."""
        deadline = time.monotonic() + timeout
        with api(self.lab) as c:
            while time.monotonic() < deadline:
                sessions = [s for s in c.get("api/sessions").json() if s["path"].endswith(self.path)]
                if sessions and sessions[0]["kernel"]["execution_state"] == "idle":
                    return
                self.page.wait_for_timeout(200)
        raise AssertionError(f"the kernel of {self.path} never became idle")

    @property
    def cells(self):
        return self.page.locator(CELLS)

    def cell(self, i: int):
        return self.cells.nth(i)

    def prompt(self, i: int) -> str:
        return self.cell(i).locator(".jp-InputPrompt").inner_text().strip()

    def run(self, i: int) -> None:
        """Run cell *i* the way a person does: click it, press Shift+Enter."""
        self.cell(i).locator(".jp-InputArea-prompt").click()
        self.page.keyboard.press("Escape")
        self.page.keyboard.press("Shift+Enter")

    def run_all(self) -> None:
        self.page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")

    def wait_done(self, i: int, timeout: float = 120) -> None:
        """Until cell *i* shows an execution count (not [*] or [ ])."""
        self.page.wait_for_function(
            "([sel, i]) => { const c = document.querySelectorAll(sel)[i];"
            " return c && /\\[\\d+\\]/.test(c.querySelector('.jp-InputPrompt').textContent); }",
            arg=[CELLS, i], timeout=timeout * 1000)

    def errors_shown(self) -> list[str]:
        return self.page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
                                 ).all_inner_texts()

    def sources(self) -> list[str]:
        return self.page.evaluate(
            "sel => Array.from(document.querySelectorAll(sel)).map(e => e.textContent)",
            arg=f"{CELLS} .jp-InputArea-editor")

    # -- the chat panel ----------------------------------------------------------------------
    @property
    def panel(self):
        return self.page.locator(".offgrid-panel").last

    @property
    def box(self):
        return self.panel.locator("textarea.offgrid-message-box")

    def bubbles(self) -> list[str]:
        return self.panel.locator(".offgrid-messages > *").all_inner_texts()

    def send(self, text: str, *, wait: bool = True) -> None:
        """Type *text* into the panel and press Enter; then (by default) wait for the whole reply."""
        before = len(self.bubbles())
        self.box.fill(text)
        self.box.press("Enter")
        self.page.wait_for_function(  # the question and its reply bubble are shown
            "n => document.querySelectorAll('.offgrid-panel .offgrid-messages > *').length >= n", arg=before + 2)
        if wait:
            self.wait_for_reply_done()

    def wait_for_cursor(self, timeout: float = 60) -> None:
        """Until the panel's last bubble is streaming (shows the cursor)."""
        self.page.wait_for_function(
            "cursor => { const m = document.querySelectorAll('.offgrid-panel .offgrid-messages > *');"
            " return m.length && m[m.length - 1].textContent.includes(cursor); }", arg=CURSOR, timeout=timeout * 1000)

    def wait_for_reply_done(self, timeout: float = 120) -> None:
        """Until the panel is idle again: Stop disabled, no cursor in the last bubble."""
        self.page.wait_for_function(
            "cursor => { const p = document.querySelectorAll('.offgrid-panel'); const panel = p[p.length - 1];"
            " const stop = Array.from(panel.querySelectorAll('button')).find(b => b.textContent.includes('Stop'));"
            " const m = panel.querySelectorAll('.offgrid-messages > *');"
            " return stop && stop.disabled && !(m.length && m[m.length - 1].textContent.includes(cursor)); }",
            arg=CURSOR, timeout=timeout * 1000)


@contextmanager
def screenshots_on_failure(folder: Path, *notebooks: Notebook):
    """Re-raise a failure with the folder where every page's screenshot went."""
    try:
        yield
    except BaseException as exc:
        folder.mkdir(parents=True, exist_ok=True)
        for i, nb in enumerate(notebooks):
            try:
                name = re.sub(r"[^\w.-]", "_", nb.path)
                nb.page.screenshot(path=str(folder / f"{i}-{name}.png"), full_page=True)
            except Exception:  # noqa: BLE001 - the page may be gone; the failure matters more
                pass
        errors = [e for nb in notebooks for e in nb.errors]
        raise AssertionError(f"{exc}\n(screenshots in {folder}; page errors: {errors})") from exc


# -- fixtures the browser test modules import ------------------------------------------------------
@pytest.fixture(autouse=True)
def jp_asyncio_loop():
    """pytest-jupyter's loop fixture would adopt Playwright's (running) loop and fail to close it:
    these tests need no loop of their own."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(autouse=True)
def jp_server_cleanup():
    """No in-process Jupyter server here (the lab is a subprocess): nothing for pytest-jupyter to clean."""
    yield


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()
