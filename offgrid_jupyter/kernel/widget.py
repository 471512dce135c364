"""The chat panel: ipywidgets on the same engine, store and sessions as the magics.

Standard ipywidgets (so it works in JupyterLab, Notebook 7 and VS Code without our
labextension), plus one small anywidget (``panel.js``): the message box, where Enter
sends and Shift+Enter starts a new line, which also keeps every key typed in the panel
away from the notebook's shortcuts and keeps the conversation scrolled to the newest
text. Generation runs on a background thread; it only sets widget traits, which
ipywidgets sends over the kernel's comm channel, so the notebook stays free to run
other cells meanwhile.

In a notebook the panel opens on the notebook's session (the one ``%%offgrid`` cells
use), and its first message creates that session if no cell has yet. A turn made by a
cell in the panel's session streams into the panel as it is written.

A saved notebook keeps no live widget: the server extension's pre-save hook
(:mod:`offgrid_jupyter.server.snapshot`) writes a readable snapshot of the panel into
the file instead, so reopening it never shows "Error displaying widget".
"""

from __future__ import annotations

import html
import threading
from pathlib import Path
from typing import Any, Iterator

import anywidget
import ipywidgets as widgets
import traitlets

from .context import Context, loaded
from ..errors import OffgridError, TurnCancelledError
from ..retrieval.rag import sources_markdown
from .describe import attachment, mentions, resolve
from .proposals import ProposalView
from ..chat.edits import Task, parse
from .render import Progress, chips_html, context_gauge, tool_line, tool_lines
from ..chat.attachments import stored_context
from ..chat.store import Session

NEW = "__new__"  # a new session with a generated name, not used by the cells
NEW_WITH = "__new__:"  # ... made with the profile named after the colon
CURRENT = "__current__"  # the notebook's session, created by the first message
PANEL_MIME_KEY = "offgrid_panel"  # output metadata that marks a panel (for the pre-save snapshot)
FOLLOW_INTERVAL = 0.1  # seconds between redraws of a streaming reply


class MessageBox(anywidget.AnyWidget):
    """A textarea whose Enter key sends (``submitted`` counts the sends)."""

    _esm = Path(__file__).with_name("panel.js")
    value = traitlets.Unicode("").tag(sync=True)
    submitted = traitlets.Int(0).tag(sync=True)
    placeholder = traitlets.Unicode("Message (Enter sends, Shift+Enter for a new line, @name attaches a variable)"
                                    ).tag(sync=True)


def _user_bubble(text: str, attached: list[dict] | None = None) -> widgets.HTML:
    chips = f'<div style="white-space:normal;font-size:90%">{chips_html(attached)}</div>' if attached else ""
    return widgets.HTML(
        f'<div style="margin:4px 0 4px 20%;padding:6px 10px;border-radius:10px;'
        f'background:var(--jp-layout-color2,#e8f0fe);white-space:pre-wrap">{html.escape(text)}{chips}</div>')


def _markdown(text: str, note: str | None = None) -> tuple[dict, ...]:
    body = text + (f"\n\n*{note}*" if note else "")
    return ({"output_type": "display_data", "data": {"text/markdown": body or "…", "text/plain": body},
             "metadata": {}},)


def _streaming(text: str, status: str | None) -> tuple[dict, ...]:
    return _markdown(text + "▌" if text else "", status)


def _assistant_bubble(text: str = "", note: str | None = None) -> widgets.Output:
    out = widgets.Output(layout=widgets.Layout(margin="4px 20% 4px 0", padding="2px 10px",
                                               border="1px solid var(--jp-border-color2, #ddd)"))
    out.outputs = _markdown(text, note)
    return out


def _ending(finish_reason: str, params: dict) -> str | None:
    if finish_reason == "cancelled":
        return "interrupted"
    if finish_reason == "length":
        return f"stopped at {params['max_tokens']} tokens"
    return None


class ChatPanel(widgets.VBox):
    """``%offgrid chat [SESSION]``: pick a session, chat, watch the reply stream in."""

    def __init__(self, session: str | None = None, *, context: Context | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, rag: str | bool | None = None, **kwargs: Any):
        self.context = context or _kernel_context()
        self.params = {"max_tokens": max_tokens, "temperature": temperature}
        # retrieval for every message: a collection's name, or True for every collection
        self.rag = None if rag in (None, False) else {"collection": None if rag is True else rag, "k": 5}
        self.session_id: str | None = None
        self._choice = CURRENT
        self._turn = None
        self._thread: threading.Thread | None = None
        self._followed = None  # a thread showing a turn made elsewhere (a cell)
        self._followed_turn = None
        self._stopping = False
        self._last_tps: float | None = None
        self._context_used = 0  # tokens the session's prompt took at its last turn (the context gauge)
        self._filling = False

        self.picker = widgets.Dropdown(description="Session", layout=widgets.Layout(width="60%"))
        self.refresh_button = widgets.Button(icon="refresh", tooltip="Reload the conversation",
                                             layout=widgets.Layout(width="40px"))
        self.title = widgets.HTML()
        self.messages = widgets.VBox(layout=widgets.Layout(max_height="480px", overflow="auto"))
        self.messages.add_class("offgrid-messages")
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
        self.context.watch(self._on_turn)

        super().__init__([widgets.HBox([self.picker, self.refresh_button]), self.title, self.messages, self.box,
                          widgets.HBox([self.send_button, self.stop_button]), self.status, self.error], **kwargs)
        self.add_class("offgrid-panel")
        if session is None:
            current = self.context.current_session(create=False)
            session = current.id if current else None
        self._fill_picker(session)
        self._show_status()

    def _repr_mimebundle_(self, **kwargs: Any):
        data = super()._repr_mimebundle_(**kwargs)
        data["text/plain"] = "offgrid chat panel: run this cell to open it (it needs a running kernel)."
        return data, {PANEL_MIME_KEY: {"session_id": self.session_id, "notebook": self.context.notebook_path()}}

    # -- sessions --------------------------------------------------------------------------
    def _current_label(self) -> str:
        notebook = self.context.notebook_path()
        name = Path(notebook).stem if notebook else "this kernel"
        return f"{name}: this notebook's session (starts with your first message)"

    def _fill_picker(self, select: str | None) -> None:
        try:
            sessions = self.context.store.list(limit=200)
            if select not in (None, CURRENT) and not self._is_new(select):
                select = self.context.store.get(select, messages=False).id
        except OffgridError as exc:
            self._fail(exc)
            sessions, select = [], None
        options = [(s.name or s.title or s.id, s.id) for s in sessions]
        profiles = [NEW_WITH + p.name for p in self._profiles()]
        if not any(value == select for _, value in options):
            select = select if select in (NEW, CURRENT, *profiles) else CURRENT
        if self.context.current_session(create=False) is None:
            options.insert(0, (self._current_label(), CURRENT))
        elif select == CURRENT:
            select = self.context.current_session(create=False).id
        options.append(("New session", NEW))
        options += [(f"New session with profile {p.name}", NEW_WITH + p.name) for p in self._profiles()]
        self._filling = True  # the picker's own change events wait until it is filled
        try:
            self.picker.options = options
            self.picker.value = select
        finally:
            self._filling = False
        self._picked()

    def _profiles(self) -> list:
        profiles = getattr(self.context.store, "profiles", None)  # (a server elsewhere keeps its own)
        try:
            return profiles.list() if profiles is not None else []
        except OffgridError:
            return []

    @staticmethod
    def _is_new(value: Any) -> bool:
        return value == NEW or str(value).startswith(NEW_WITH)

    def _picked(self, change: Any = None) -> None:
        if self._filling:
            return
        value = self.picker.value
        self._choice = value if value == CURRENT or self._is_new(value) else None
        self.session_id = None if value in (None, CURRENT) or self._is_new(value) else value
        self.refresh()

    def reload(self) -> None:
        """Re-read the list of sessions and the picked session's conversation."""
        self._fill_picker(self.session_id or self._choice)

    def refresh(self) -> None:
        """Show the picked session's conversation as it is in the store now."""
        self.error.value = ""
        if self.session_id is None:
            profile = self._choice[len(NEW_WITH):] if str(self._choice).startswith(NEW_WITH) else None
            self.title.value = ("<i>This notebook's session starts with your first message (or cell).</i>"
                                if self._choice == CURRENT else "<i>A new session starts with your first message"
                                + (f", made with the profile {html.escape(profile)}" if profile else "") + ".</i>")
            self.messages.children = ()
            return
        try:
            session = self.context.store.get(self.session_id)
        except OffgridError as exc:
            self._fail(exc)
            return
        self._render(session)

    def _render(self, session: Session) -> None:
        self._render_title(session)
        bubbles = []
        task = None  # the question before a reply, when it asked for a fix or an edit
        for m in session.messages or []:
            if m.role == "user":
                bubbles.append(_user_bubble(m.content + ("\n(no reply: interrupted)" if m.interrupted else ""),
                                            stored_context(m.metadata)))
                task = m.metadata if m.metadata.get("task") in ("fix", "edit") else None
            elif m.role == "assistant" and task is not None and (shown := self._proposal(task, m.content)):
                bubbles.append(shown)
            elif m.role == "assistant":
                body = "\n\n".join(filter(None, [m.content, sources_markdown(m.metadata.get("sources") or [])]))
                bubbles.append(_assistant_bubble(body, "interrupted" if m.finish_reason == "cancelled" else None))
            elif m.role == "tool":  # a call the model made, and what it returned
                call = m.metadata.get("tool_call") or {}
                bubbles.append(_assistant_bubble(tool_line(call.get("name", "tool"), call.get("arguments"), m.content)))
        self.messages.children = tuple(bubbles)

    def _proposal(self, question: dict, text: str) -> widgets.Widget | None:
        """A fix or an edit as the cell showed it (explanation and diff), with Apply: the code goes
        in through IPython's set_next_input, the one way a kernel can add a cell; it reaches the
        notebook with the next cell that runs (JupyterLab's own commands replace the cell itself)."""
        task = Task(question["task"], question.get("target_source") or "", question.get("cell") or "the cell",
                    error="e", instruction="i")
        try:
            proposal = parse(text, task)
        except (ValueError, KeyError, TypeError, OffgridError):  # not a proposal (an old or hand-made message)
            return None
        shown = widgets.HTML(ProposalView(task, proposal)._repr_html_())
        apply = widgets.Button(description="Apply below", icon="plus", tooltip=(
            "Put the proposed code in a new cell below the next cell you run (in JupyterLab, the cell "
            "commands replace the cell itself)"), disabled=not proposal.code or bool(proposal.compile_error)
            or getattr(self.context.shell, "set_next_input", None) is None)

        def applied(_: Any) -> None:
            self.context.shell.set_next_input(proposal.code, replace=False)
            apply.description, apply.disabled = "Applied: in a new cell below the next one you run", True

        apply.on_click(applied)
        return widgets.VBox([shown, apply], layout=widgets.Layout(margin="4px 20% 4px 0"))

    def _render_title(self, session: Session) -> None:
        title = html.escape(session.title or "(no messages yet)")
        count = f"{session.message_count} message{'s' * (session.message_count != 1)}"
        self.title.value = f"<b>{html.escape(session.name or session.id)}</b> — {title} · {count}"

    # -- turns made elsewhere (a %%offgrid cell) ---------------------------------------------
    def _on_turn(self, event: str, session_id: str | None, turn: Any) -> None:
        if session_id is None or (turn is not None and turn is self._turn):  # not for the panel's own turn
            return
        mine = session_id == self.session_id or (self.session_id is None and self._choice == CURRENT and
                                                 self._adopt_if_current(session_id))
        if not mine or self.busy:
            return
        if event == "started":
            self._follow(turn)
            return
        following = self._followed
        if following is not None:  # the cell's turn is over: the follower stops at its last event
            following.join(5)
        self.refresh()  # the stored turn, as the cell left it
        self._show_status()

    def _adopt_if_current(self, session_id: str) -> bool:
        """The cells just created the notebook's session this panel was waiting for."""
        current = self.context.current_session(create=False)
        if current is None or current.id != session_id:
            return False
        self._fill_picker(session_id)
        return True

    def _follow(self, turn: Any) -> None:
        """Stream a cell's turn into the panel: the cell consumes its events, the panel listens."""
        self.refresh()  # up to the cell's question, which is stored by now
        reply = _assistant_bubble("", "waiting for the model…")
        self.messages.children = (*self.messages.children, reply)
        pending: list = []
        lock, changed = threading.Lock(), threading.Event()

        def heard(kind: str, payload: Any) -> None:  # on the engine's (or the stream's) thread: just collect
            with lock:
                pending.append((kind, payload))
            changed.set()

        def batches() -> Iterator[list]:  # what was heard, at most every FOLLOW_INTERVAL
            while True:
                changed.wait(FOLLOW_INTERVAL)
                changed.clear()
                with lock:
                    batch, pending[:] = list(pending), []
                yield batch

        def show() -> None:
            try:
                for text, status in Progress().views(batches()):
                    reply.outputs = _streaming(text, status)
            finally:
                stop()
                self._followed = self._followed_turn = None
                self._set_busy(False)

        stop = turn.generation.listen(heard)
        self._followed_turn = turn  # the panel's Stop stops it too
        self._set_busy(True)
        self._followed = threading.Thread(target=show, name="offgrid-panel-follow", daemon=True)
        self._followed.start()

    # -- a turn ----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def send(self, text: str | None = None) -> None:
        """Send the message box's text (or *text*); the reply streams into a new bubble.
        While a reply is being written, sending waits: the draft stays in the box."""
        text = (text if text is not None else self.box.value).strip()
        if not text or self.busy or self._followed is not None:
            return
        self.error.value = ""
        try:
            if self.session_id is None:
                if self._is_new(self._choice):
                    profile = self._choice[len(NEW_WITH):] or None if self._choice != NEW else None
                    session = self.context.new_session(None, adopt=False, profile=profile)
                else:  # the notebook's session: the one %%offgrid cells use
                    session = self.context.current_session(create=True)
                self._fill_picker(session.id)
        except OffgridError as exc:
            self._fail(exc)
            return
        attached = self._attachments(text)
        self.box.value = ""
        self._stopping = False
        reply = _assistant_bubble("", "waiting for the model…")
        self.messages.children = (*self.messages.children, _user_bubble(text, attached), reply)
        self._set_busy(True)
        self._thread = threading.Thread(target=self._generate, args=(self.session_id, text, reply, attached),
                                        name="offgrid-panel", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the reply being generated; what it said so far is kept, marked cancelled."""
        self._stopping = True  # also when the turn is still being set up
        turn = self._turn or self._followed_turn
        if turn is not None:
            turn.cancel()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the reply being generated (True once nothing is generating)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.busy

    def _attachments(self, text: str) -> list[dict]:
        """``@name`` in the message: a description of that variable of the kernel, made here, on
        the kernel's main thread (where a slow repr can be interrupted), as the magic does."""
        ns = getattr(self.context.shell, "user_ns", None) or {}
        return [attachment(name, resolve(name, ns)[1], max_tokens=self.context.attach_tokens)
                for name in mentions(text, ns)]

    def _generate(self, session_id: str, text: str, reply: widgets.Output, attached: list[dict] | None = None) -> None:
        progress = Progress()
        try:
            self._turn = self.context.start_turn(session_id, text, params=self.params, source="panel", rag=self.rag,
                                                 context=attached or None)
            if self._stopping:
                self._turn.cancel()
            self.context.turn_started(session_id, self._turn)
            for shown, status in progress.views(self._turn.generation.batches(FOLLOW_INTERVAL, heartbeat=True)):
                reply.outputs = _streaming(shown, status)
                if status and status.startswith("queued"):
                    self.status.value = self._status_line(status)
            outcome = self._turn.finish()
            r = outcome.result
            if outcome.reply is None and r.finish_reason == "cancelled":  # stopped before any text
                self._take_back(text)
            else:
                self._last_tps = r.timings.get("tokens_per_second") or None
                self._context_used = r.usage.get("prompt_tokens", 0) + r.usage.get("completion_tokens", 0)
                body = "\n\n".join(filter(None, [*tool_lines(r), r.text, sources_markdown(outcome.sources)]))
                reply.outputs = _markdown(body, r.note or _ending(r.finish_reason, r.params))
        except TurnCancelledError:  # stopped while an earlier turn of the session was still running
            self._take_back(text)
        except Exception as exc:  # noqa: BLE001 - shown in the panel, never a traceback in another cell
            reply.outputs = _markdown(progress.text, "failed")
            self._fail(exc)
        finally:
            self._turn = None
            self.context.turn_done(session_id)
            self._set_busy(False)
            self._show_status()
            self._update_title(session_id)

    def _take_back(self, text: str) -> None:
        """A turn stopped before any text is neither stored nor shown; its draft comes back."""
        self.messages.children = self.messages.children[:-2]
        if not self.box.value:
            self.box.value = text

    def _update_title(self, session_id: str) -> None:
        try:
            self._render_title(self.context.store.get(session_id, messages=False))
        except OffgridError:
            pass

    def _set_busy(self, busy: bool) -> None:
        # the box stays editable: typing during a reply lands in the draft, only sending waits
        self.send_button.disabled = busy
        self.stop_button.disabled = not busy

    # -- status and errors -----------------------------------------------------------------------
    def _status_line(self, extra: str | None = None) -> str:
        runner = self.context.runner()
        try:
            desc = runner.describe()
            model = desc.get("name") or f"no model ({desc.get('error', 'unknown')})"
        except OffgridError as exc:
            model = f"no model ({exc})"
        parts = [html.escape(model), runner.label]
        if self._last_tps:
            parts.append(f"{self._last_tps:.1f} tok/s last reply")
        if self._context_used and desc.get("n_ctx"):
            parts.append(context_gauge(self._context_used, desc["n_ctx"]))
        if extra:
            parts.append(html.escape(extra))
        return f'<span style="color:var(--jp-ui-font-color2,#666);font-size:90%">{" · ".join(parts)}</span>'

    def _show_status(self) -> None:
        self.status.value = self._status_line()

    def _fail(self, exc: BaseException) -> None:
        message = str(exc) if isinstance(exc, OffgridError) else f"{type(exc).__name__}: {exc}"
        self.error.value = f'<span style="color:var(--jp-error-color1,#b00020)">⚠ {html.escape(message)}</span>'


def _kernel_context() -> Context:
    """The loaded extension's context (the magics' engine, store and sessions), else a new one."""
    context = loaded()
    if context is not None:
        return context
    from IPython import get_ipython

    return Context(get_ipython())
