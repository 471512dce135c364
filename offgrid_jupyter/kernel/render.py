"""Display objects for notebooks: a reply, a conversation, a key/value table, a note.

Each one renders as Markdown (with a plain-text fallback) through IPython's
rich display protocol; a reply carries its provenance in the output metadata.
"""

from __future__ import annotations

import html
import re
import time
from typing import Any, Iterable, Iterator

from ..chat.attachments import chip, stored_context
from ..chat.store import Session
from ..retrieval.rag import sources_markdown
from ..inference.toolcalls import call_label

CURSOR = "▌"


_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}#|~])")
_MD_BULLET = re.compile(r"^(\s*)([-+>])(?=\s)")
_MD_NUMBERED = re.compile(r"^(\s*\d+)([.)])(?=\s)")


def plain_markdown(line: str) -> str:
    """One line of a person's text as Markdown that shows exactly that text: HTML and Markdown's
    marks escaped (``<ArrowStringArray>`` vanished as a tag; ``*`` made italics)."""
    line = _MD_SPECIAL.sub(r"\\\1", html.escape(line, quote=False))
    line = _MD_BULLET.sub(r"\1\\\2", line)
    return _MD_NUMBERED.sub(r"\1\\\2", line)


def blockquote(text: str) -> str:
    """*text* (a person's message) quoted as it was written: every line kept (a Markdown line break
    at each), nothing in it read as Markdown or HTML."""
    return "\n".join("> " + plain_markdown(line) + "  " if line.strip() else ">" for line in text.splitlines())


def context_gauge(used: int, n_ctx: int) -> str:
    """``context 1,840 / 4,096 tokens``, and what the engine leaves out first when the session
    outgrows the window (the oldest turns; never the system prompt or the newest message)."""
    return f"context {used:,} / {n_ctx:,} tokens (when full, the oldest turns go first)"


def chips_html(items: list[dict[str, Any]]) -> str:
    """A message's attachments as collapsed chips (``@df · DataFrame · 312 tokens``) that open on
    what the model read; HTML that Markdown passes through (JupyterLab's sanitizer keeps
    details, summary and pre)."""
    return "".join(f'<details class="offgrid-chip"><summary>{html.escape(chip(i))}</summary>'
                   f'<pre style="white-space:pre-wrap;max-height:240px;overflow:auto">{html.escape(i["text"])}</pre>'
                   "</details>" for i in items)


class Reply:
    """A reply as it streams and when it is done (``format`` markdown, text, code or json)."""

    def __init__(self, text: str = "", *, format: str = "markdown", status: str | None = None,
                 done: bool = False, metadata: dict | None = None):
        self.text, self.format, self.status, self.done = text, format, status, done
        self.metadata = metadata

    def _body(self) -> str:
        text = self.text
        if self.format == "json" and text and not text.lstrip().startswith("```"):
            text = f"```json\n{text}\n```"
        if not self.done and text:
            text += CURSOR
        return text

    def _repr_mimebundle_(self, include=None, exclude=None):
        status = f"*{self.status}*" if self.status else ""
        plain = "\n\n".join(p for p in (self.text, f"[{self.status}]" if self.status else "") if p)
        data = {"text/plain": plain or "…"}
        if self.format != "text":
            data["text/markdown"] = "\n\n".join(p for p in (self._body(), status) if p) or "…"
        return (data, {"offgrid": self.metadata}) if self.metadata else data


class Progress:
    """A streaming reply as its events arrive: the text so far and one status line.

    Shared by the cell magic and the chat panel, so both say the same thing while a
    turn waits in the queue (position and time waited, growing), loads the model,
    evaluates the prompt, or writes."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.parts: list[str] = []
        self.calls: list[str] = []  # one collapsed line per tool call made so far
        self._call: dict | None = None  # the tool_start waiting for its tool_end
        self.started = clock()
        self.position: int | None = None
        self.phase = "waiting for the model…"

    @property
    def text(self) -> str:
        """What a display shows: the calls made so far, then the reply's text."""
        return "\n\n".join([*self.calls, "".join(self.parts)]) if self.calls else "".join(self.parts)

    def feed(self, batch: list) -> None:
        for kind, payload in batch:
            if kind == "token":
                self.parts.append(payload)
                self.phase = None
            elif kind == "round_start" and payload["round"] > 1:
                self.phase = f"round {payload['round']} of {payload['max_rounds']}: thinking…"
            elif kind == "tool_start":
                self._call = payload
                self.phase = f"calling {call_label(payload['tool_name'], payload.get('arguments'))}…"
            elif kind == "tool_end":
                arguments = (self._call or {}).get("arguments")
                self.calls.append(tool_line(payload["tool_name"], arguments,
                                            payload.get("result", f"Error: {payload.get('error')}")))
                self.phase = "thinking…"
            elif kind == "queued":
                self.position = payload or None
            elif kind == "loading":
                self.position = None
                self.phase = f"loading {payload['model']} ({payload['size_bytes'] / (1 << 20):.0f} MB)…"
            elif kind == "start":
                self.position = None
                self.phase = "thinking…"

    def views(self, batches: Iterable[list]) -> Iterator[tuple[str, str | None]]:
        """Feed *batches* (a generation's, with heartbeats); yield ``(text, status)`` each
        time what a display shows would change, and stop at the batch that completes."""
        shown = None
        for batch in batches:
            self.feed(batch)
            if batch and batch[-1][0] in ("complete", "error"):
                return
            view = (self.text, self.status)
            if view != shown:  # a heartbeat redraws only when the waiting time moved on
                shown = view
                yield view

    @property
    def status(self) -> str | None:
        """None once text flows; else what the turn is waiting for."""
        if self.parts and not self._calling:
            return None
        if self.position:
            waited = self.clock() - self.started
            return f"queued: position {self.position} · waiting {waited:.0f} s (another generation is running)"
        return self.phase


    @property
    def _calling(self) -> bool:
        return self.phase is not None and self.phase.startswith("calling ")


def tool_line(name: str, arguments: Any, result: str) -> str:
    """One tool call as a collapsed line: ``called add(a=2, b=3) → 5``, the whole result inside."""
    short = " ".join(str(result).split())
    short = short if len(short) <= 80 else short[:79] + "…"
    return (f"<details><summary>🔧 called <code>{html.escape(call_label(name, arguments))}</code> → "
            f"<code>{html.escape(short)}</code></summary>\n\n<pre>{html.escape(str(result))}</pre>\n\n</details>")


def tool_lines(result: Any) -> list[str]:
    """The calls a turn's result made, as :func:`tool_line` lines."""
    return [tool_line(c["name"], c.get("arguments"), r["result"])
            for c, r in zip(getattr(result, "tool_calls", None) or [], getattr(result, "tool_results", None) or [])]


class Conversation:
    """A session rendered as a readable chat."""

    def __init__(self, session: Session, last: int | None = None):
        self.session = session
        self.messages = list(session.messages or [])[-last:] if last else list(session.messages or [])

    def _header(self) -> str:
        s = self.session
        label = s.name or s.id
        extra = f" — {s.title}" if s.title and s.title != s.name else ""
        shown = "" if len(self.messages) == s.message_count else f", last {len(self.messages)} shown"
        return f"**Session `{label}`**{extra} · {s.message_count} messages{shown}" + (" · ended" if s.ended else "")

    def _repr_markdown_(self) -> str:
        parts = [self._header()]
        if self.session.system_prompt:
            parts.append(f"*System:* {html.escape(self.session.system_prompt)}")
        for m in self.messages:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.timestamp))
            if m.role == "user":
                chips = chips_html(stored_context(m.metadata))
                parts.append(f"**You** · {when}\n\n{blockquote(m.content)}" + (f"\n\n{chips}" if chips else ""))
            elif m.role == "tool":
                call = m.metadata.get("tool_call") or {}
                parts.append(tool_line(call.get("name", "tool"), call.get("arguments"), m.content))
            else:
                model = m.metadata.get("model", m.role)
                note = " · *interrupted*" if m.finish_reason == "cancelled" else ""
                sources = sources_markdown(m.metadata.get("sources") or [])
                parts.append(f"**{model}** · {when}{note}\n\n{m.content}" + (f"\n\n{sources}" if sources else ""))
        if not self.messages:
            parts.append("*No messages yet.*")
        return "\n\n---\n\n".join(parts)

    def __repr__(self) -> str:
        lines = [re.sub(r"[*`]", "", self._header())]
        for m in self.messages:
            lines.append(f"[{m.role}] {m.content}")
        return "\n".join(lines)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


class Table:
    """A small key/value table (status, settings)."""

    def __init__(self, title: str, rows: list[tuple[str, Any]]):
        self.title, self.rows = title, rows

    def _repr_markdown_(self) -> str:
        body = "\n".join(f"| {k} | {_cell(v)} |" for k, v in self.rows)
        return f"**{self.title}**\n\n| | |\n|---|---|\n{body}"

    def __repr__(self) -> str:
        width = max((len(k) for k, _ in self.rows), default=0)
        return "\n".join([self.title] + [f"  {k.ljust(width)}  {v}" for k, v in self.rows])


class Note:
    """A one-line confirmation (``renamed a to b``)."""

    def __init__(self, text: str):
        self.text = text

    def _repr_markdown_(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return re.sub(r"[*`]", "", self.text)
