"""Saved notebooks keep a readable snapshot of a chat panel, not a dead widget.

A widget lives in its kernel: a notebook saved with a chat panel and opened again
with a new kernel would show "Error displaying widget: model not found". This
pre-save hook of the Jupyter server's contents manager replaces, in the file only
(the open notebook keeps its live panel), each panel's widget output with
Markdown: the session's last messages and how to reopen the panel. A panel marks
its output with ``metadata.offgrid_panel`` (see :mod:`offgrid_jupyter.kernel.widget`).

The output also keeps the widget's id under a type of our own (PANEL_MIME): the
JupyterLab extension renders it as the live panel when the kernel still holds that
widget (a page reloaded while the kernel runs), else as the snapshot; anything else
(a notebook viewer, VS Code, nbconvert) shows the Markdown.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..errors import OffgridError
from ..kernel.render import blockquote
from ..chat.store import Store

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
PANEL_MIME = "application/vnd.offgrid.panel+json"  # the widget's id and the snapshot (labextension/src/panel.ts)
PANEL_KEY = "offgrid_panel"
SHOWN_MESSAGES = 6
SHOWN_CHARS = 1200
REOPEN = "run this cell to reopen the live chat panel"

log = logging.getLogger(__name__)


def _clip(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + " …"


def panel_markdown(store: Store, panel: dict[str, Any]) -> str:
    """The Markdown a saved panel turns into."""
    session = None
    try:
        if panel.get("session_id"):
            session = store.get(panel["session_id"])
        elif panel.get("notebook"):
            found = store.notebook_session(panel["notebook"])
            session = store.get(found.id) if found else None
    except OffgridError:
        session = None
    if session is None or not session.messages:
        return f"**offgrid chat** — {REOPEN}."
    shown = session.messages[-SHOWN_MESSAGES:]
    parts = [f"**offgrid chat** · session `{session.name or session.id}` · {session.message_count} messages "
             f"(as saved; {REOPEN})"]
    if len(shown) < len(session.messages):
        parts.append(f"*… {len(session.messages) - len(shown)} earlier messages*")
    for m in shown:
        if m.role == "user":
            parts.append("**You:**\n\n" + blockquote(_clip(m.content)))
        elif m.role == "assistant":
            parts.append(f"**{m.metadata.get('model', 'model')}:**\n\n{_clip(m.content)}")
    return "\n\n".join(parts)


def pre_save_hook(store: Store) -> Callable[..., None]:
    """A contents-manager pre-save hook that snapshots chat panels (never raises)."""

    def hook(model: dict, path: str, contents_manager: Any = None, **kwargs: Any) -> None:
        if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
            return
        try:
            for cell in model["content"].get("cells", []):
                for output in cell.get("outputs") or []:
                    panel = (output.get("metadata") or {}).get(PANEL_KEY)
                    data = output.get("data") or {}
                    view = data.get(WIDGET_MIME) or (data.get(PANEL_MIME) or {}).get("view")
                    if isinstance(panel, dict) and isinstance(view, dict):
                        text = panel_markdown(store, panel)
                        output["data"] = {PANEL_MIME: {"view": view, "snapshot": text}, "text/markdown": text,
                                          "text/plain": text}
        except Exception:  # a snapshot must never stand between the user and a save
            log.exception("offgrid: could not snapshot the chat panels of %s", path)

    return hook
