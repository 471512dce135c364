"""The chat panel: ipywidgets on the same engine, store and sessions as the magics.

Standard ipywidgets (so it works in JupyterLab, Notebook 7 and VS Code without our
labextension), plus one small anywidget: a message box where Enter sends and
Shift+Enter starts a new line. Generation runs on a background thread; it only
sets widget traits, which ipywidgets sends over the kernel's comm channel, so the
notebook stays free to run other cells meanwhile.
"""

from __future__ import annotations

import html
import threading
from typing import Any

import anywidget
import ipywidgets as widgets
import traitlets

from .context import Context
from .errors import OffgridError
from .store import Session

NEW = "__new__"
MB = 1 << 20

_MESSAGE_BOX_ESM = """
function render({ model, el }) {
  const box = document.createElement("textarea");
  box.rows = 3;
  box.placeholder = model.get("placeholder");
  box.style.cssText = "width: 100%; box-sizing: border-box; resize: vertical; font: inherit;";
  box.value = model.get("value");
  box.addEventListener("input", () => { model.set("value", box.value); model.save_changes(); });
  box.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();  // Enter sends; Shift+Enter is a new line
      model.set("value", box.value);
      model.set("submitted", model.get("submitted") + 1);
      model.save_changes();
    }
  });
  model.on("change:value", () => { if (box.value !== model.get("value")) box.value = model.get("value"); });
  model.on("change:disabled", () => { box.disabled = model.get("disabled"); });
  el.appendChild(box);
}
export default { render };
"""


class MessageBox(anywidget.AnyWidget):
    """A textarea whose Enter key sends (``submitted`` counts the sends)."""

    _esm = _MESSAGE_BOX_ESM
    value = traitlets.Unicode("").tag(sync=True)
    submitted = traitlets.Int(0).tag(sync=True)
    disabled = traitlets.Bool(False).tag(sync=True)
    placeholder = traitlets.Unicode("Message (Enter sends, Shift+Enter for a new line)").tag(sync=True)


def _user_bubble(text: str) -> widgets.HTML:
    return widgets.HTML(
        f'<div style="margin:4px 0 4px 20%;padding:6px 10px;border-radius:10px;background:#e8f0fe;'
        f'white-space:pre-wrap">{html.escape(text)}</div>')


def _markdown(text: str, note: str | None = None) -> tuple[dict, ...]:
    body = text + (f"\n\n*{note}*" if note else "")
    return ({"output_type": "display_data", "data": {"text/markdown": body or "…", "text/plain": body},
             "metadata": {}},)


def _assistant_bubble(text: str = "", note: str | None = None) -> widgets.Output:
    out = widgets.Output(layout=widgets.Layout(margin="4px 20% 4px 0", padding="2px 10px",
                                               border="1px solid #ddd"))
    out.outputs = _markdown(text, note)
    return out


class ChatPanel(widgets.VBox):
    """``%offgrid chat [SESSION]``: pick a session, chat, watch the reply stream in."""

    def __init__(self, session: str | None = None, *, context: Context | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, **kwargs: Any):
        self.context = context or _kernel_context()
        self.params = {"max_tokens": max_tokens, "temperature": temperature}
        self.session_id: str | None = None
        self._turn = None
        self._thread: threading.Thread | None = None
        self._last_tps: float | None = None
        self._filling = False

        self.picker = widgets.Dropdown(description="Session", layout=widgets.Layout(width="60%"))
        self.refresh_button = widgets.Button(icon="refresh", tooltip="Reload the conversation",
                                             layout=widgets.Layout(width="40px"))
        self.title = widgets.HTML()
        self.messages = widgets.VBox(layout=widgets.Layout(max_height="480px", overflow="auto"))
        self.box = MessageBox()
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
        self.stop_button = widgets.Button(description="Stop", icon="stop", disabled=True)
        self.status = widgets.HTML()
        self.error = widgets.HTML()

        self.send_button.on_click(lambda _: self.send())
        self.stop_button.on_click(lambda _: self.stop())
        self.refresh_button.on_click(lambda _: self.reload())
        self.box.observe(lambda _: self.send(), names="submitted")
        self.picker.observe(self._picked, names="value")
        self.context.watch(self._turn_elsewhere)

        super().__init__([widgets.HBox([self.picker, self.refresh_button]), self.title, self.messages, self.box,
                          widgets.HBox([self.send_button, self.stop_button]), self.status, self.error], **kwargs)
        if session is None:
            current = self.context.current_session(create=False)
            session = current.id if current else None
        self._fill_picker(session)
        self._show_status()

    # -- sessions --------------------------------------------------------------------------
    def _fill_picker(self, select: str | None) -> None:
        try:
            sessions = self.context.store.list(limit=200)
            if select is not None:
                select = self.context.store.get(select, messages=False).id
        except OffgridError as exc:
            self._fail(exc)
            sessions, select = [], None
        options = [("New session", NEW)] + [(s.name or s.title or s.id, s.id) for s in sessions]
        self._filling = True  # the picker's own change events wait until it is filled
        try:
            self.picker.options = options
            self.picker.value = select if select in {v for _, v in options} else NEW
        finally:
            self._filling = False
        self._picked()

    def _picked(self, change: Any = None) -> None:
        if self._filling:
            return
        value = self.picker.value
        self.session_id = None if value in (None, NEW) else value
        self.refresh()

    def reload(self) -> None:
        """Re-read the list of sessions and the picked session's conversation."""
        self._fill_picker(self.session_id)

    def refresh(self) -> None:
        """Show the picked session's conversation as it is in the store now."""
        self.error.value = ""
        if self.session_id is None:
            self.title.value = "<i>A new session starts with your first message.</i>"
            self.messages.children = ()
            return
        try:
            session = self.context.store.get(self.session_id)
        except OffgridError as exc:
            self._fail(exc)
            return
        self._render(session)

    def _render(self, session: Session) -> None:
        title = html.escape(session.title or "(no messages yet)")
        self.title.value = f"<b>{html.escape(session.name or session.id)}</b> — {title}"
        bubbles = []
        for m in session.messages or []:
            if m.role == "user":
                bubbles.append(_user_bubble(m.content))
            elif m.role == "assistant":
                bubbles.append(_assistant_bubble(m.content, "interrupted" if m.finish_reason == "cancelled" else None))
        self.messages.children = tuple(bubbles)

    def _turn_elsewhere(self, session_id: str | None) -> None:
        if session_id is not None and session_id == self.session_id and not self.busy:
            self.refresh()

    # -- a turn ----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def send(self, text: str | None = None) -> None:
        """Send the message box's text (or *text*); the reply streams into a new bubble."""
        text = (text if text is not None else self.box.value).strip()
        if not text or self.busy:
            return
        self.error.value = ""
        try:
            if self.session_id is None:
                session = self.context.new_session(None, adopt=False)
                self._fill_picker(session.id)
        except OffgridError as exc:
            self._fail(exc)
            return
        self.box.value = ""
        reply = _assistant_bubble("", "waiting for the model…")
        self.messages.children = (*self.messages.children, _user_bubble(text), reply)
        self._set_busy(True)
        self._thread = threading.Thread(target=self._generate, args=(self.session_id, text, reply),
                                        name="offgrid-panel", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the reply being generated; what it said so far is kept, marked cancelled."""
        if self._turn is not None:
            self._turn.cancel()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the reply being generated (True once nothing is generating)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.busy

    def _generate(self, session_id: str, text: str, reply: widgets.Output) -> None:
        parts: list[str] = []
        try:
            self._turn = self.context.start_turn(session_id, text, params=self.params, source="panel")
            for batch in self._turn.generation.batches(0.1):
                note = None
                for kind, payload in batch:
                    if kind == "token":
                        parts.append(payload)
                    elif kind == "queued" and payload:
                        note = f"queued: position {payload}"
                        self.status.value = self._status_line(note)
                    elif kind == "loading":
                        note = f"loading {payload['model']} ({payload['size_bytes'] / MB:.0f} MB)…"
                if batch[-1][0] != "complete":
                    text = "".join(parts)
                    reply.outputs = _markdown(text + "▌" if text else "", note or (None if text else "thinking…"))
            outcome = self._turn.finish()
            r = outcome.result
            self._last_tps = r.timings.get("tokens_per_second") or None
            reply.outputs = _markdown(r.text, "interrupted" if r.finish_reason == "cancelled" else
                                      f"stopped at {r.params['max_tokens']} tokens" if r.finish_reason == "length"
                                      else None)
        except OffgridError as exc:
            reply.outputs = _markdown("".join(parts), "failed")
            self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - shown in the panel, never a traceback in another cell
            reply.outputs = _markdown("".join(parts), "failed")
            self._fail(exc)
        finally:
            self._turn = None
            self._set_busy(False)
            self._show_status()

    def _set_busy(self, busy: bool) -> None:
        self.send_button.disabled = busy
        self.box.disabled = busy
        self.stop_button.disabled = not busy

    # -- status and errors -----------------------------------------------------------------------
    def _status_line(self, extra: str | None = None) -> str:
        ctx = self.context
        try:
            desc = ctx.client.models()["current"] if ctx.client else ctx.engine.describe()
            model = desc.get("name") or "no model"
        except OffgridError as exc:
            model = f"no model ({exc})"
        where = "server" if ctx.client else "in-kernel"
        parts = [html.escape(model), where]
        if self._last_tps:
            parts.append(f"{self._last_tps:.1f} tok/s last reply")
        if extra:
            parts.append(html.escape(extra))
        return f'<span style="color:#666;font-size:90%">{" · ".join(parts)}</span>'

    def _show_status(self) -> None:
        self.status.value = self._status_line()

    def _fail(self, exc: BaseException) -> None:
        message = str(exc) if isinstance(exc, OffgridError) else f"{type(exc).__name__}: {exc}"
        self.error.value = f'<span style="color:#b00020">⚠ {html.escape(message)}</span>'


def _kernel_context() -> Context:
    """The loaded extension's context (the magics' engine, store and sessions), else a new one."""
    from . import _magics

    if _magics is not None:
        return _magics.context
    from IPython import get_ipython

    return Context(get_ipython())
