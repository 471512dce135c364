"""What the kernel remembers of the cells it ran: source, printed text, result and error.

IPython keeps a cell's source (``In``) and result (``Out``) but neither what it printed nor its
error. ``CellLog`` keeps those too, for ``%%offgrid --context N`` (the cells before this one,
as the model reads them) and ``{Err[n]}`` (the plain-text traceback of the cell ``In[n]``):

- **Printed text**: the kernel's ``sys.stdout``/``sys.stderr`` get a ``write`` that also keeps
  the first ``KEEP_CHARS`` a cell prints (the stream object itself is not replaced, so
  ipykernel, ipywidgets' Output and ``%%capture`` see what they always saw).
- **Errors**: the traceback IPython shows, without its colour codes and with a long middle of
  library frames left out, in ``Err`` (a dict in the user's namespace like ``Out``, hidden from
  ``%who``; a variable of the user's named ``Err`` is left alone and then wins).

Only the last ``KEEP_CELLS`` cells are kept, each bounded, so a long session costs little.
"""

from __future__ import annotations

import re
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..chat.attachments import clip, estimate_tokens
from ..chat.edits import plain, shorten_traceback

KEEP_CELLS = 200
KEEP_CHARS = 8_000  # of what one cell printed
_OURS = re.compile(r"\s*%%?offgrid\b")


@dataclass
class CellRecord:
    number: int  # the execution count: In[number]
    source: str
    cell_id: str | None = None  # the notebook's id of the cell (Jupyter sends it with the request)
    printed: list[str] = field(default_factory=list)
    printed_chars: int = 0
    result: str | None = None  # the repr of Out[number]
    error: str | None = None  # the plain traceback

    def text(self, max_tokens: int) -> str:
        """The cell as the model reads it: its source, then its output or error (the output's
        start, the traceback's end, where each says the most)."""
        parts = [f"```python\n{self.source.strip()}\n```"]
        out = "".join(self.printed)
        if self.printed_chars > KEEP_CHARS:
            out += f"\n… ({self.printed_chars:,} characters printed in all)"
        if self.result is not None:
            out = (out + "\n" if out else "") + self.result
        source_budget = max_tokens // 2
        parts[0] = clip(parts[0], source_budget)
        left = max(20, max_tokens - estimate_tokens(parts[0]) - 10)
        if self.error:
            parts.append("Error:\n" + clip(self.error.strip(), left, keep="tail"))
        elif out.strip():
            parts.append("Output:\n" + clip(out.strip(), left))
        return "\n".join(parts)


class CellLog:
    """Installed on a shell by the extension (``install``), removed by ``uninstall``."""

    def __init__(self, shell: Any):
        self.shell = shell
        self.cells: OrderedDict[int, CellRecord] = OrderedDict()
        self.errors: dict[int, str] = {}  # the dict the namespace's Err is
        self._running: CellRecord | None = None
        self._streams: list[Any] = []
        self._lock = threading.Lock()

    # -- install ----------------------------------------------------------------------
    def install(self) -> None:
        self.shell.events.register("pre_run_cell", self.pre_run_cell)
        self.shell.events.register("post_run_cell", self.post_run_cell)
        ns = self.shell.user_ns
        if "Err" not in ns:
            ns["Err"] = self.errors
            self.shell.user_ns_hidden["Err"] = self.errors
        for stream in (sys.stdout, sys.stderr):
            write = getattr(stream, "write", None)
            if write is None or getattr(write, "_offgrid", False):
                continue
            try:
                stream.write = self._tee(write)  # an instance attribute: print() finds it first
            except (AttributeError, TypeError):  # a stream that takes no attributes: not kept
                continue
            self._streams.append(stream)

    def uninstall(self) -> None:
        for name, hook in (("pre_run_cell", self.pre_run_cell), ("post_run_cell", self.post_run_cell)):
            try:
                self.shell.events.unregister(name, hook)
            except ValueError:
                pass
        for stream in self._streams:
            try:
                del stream.write
            except AttributeError:
                pass
        self._streams = []
        if self.shell.user_ns.get("Err") is self.errors:
            del self.shell.user_ns["Err"]
            self.shell.user_ns_hidden.pop("Err", None)

    def _tee(self, write: Any) -> Any:
        def tee(text: str) -> Any:
            cell = self._running
            if cell is not None and isinstance(text, str):
                with self._lock:
                    room = KEEP_CHARS - sum(len(p) for p in cell.printed)
                    if room > 0:
                        cell.printed.append(text[:room])
                    cell.printed_chars += len(text)
            return write(text)

        tee._offgrid = True  # type: ignore[attr-defined]
        return tee

    # -- IPython events ------------------------------------------------------------------
    def pre_run_cell(self, info: Any) -> None:
        number = self.shell.execution_count
        self._running = CellRecord(number, getattr(info, "raw_cell", "") or "", getattr(info, "cell_id", None))

    def post_run_cell(self, result: Any) -> None:
        cell, self._running = self._running, None
        if cell is None:
            return
        cell.number = getattr(result, "execution_count", None) or cell.number
        value = getattr(result, "result", None)
        if value is not None:
            try:
                text = repr(value)
            except Exception as exc:  # noqa: BLE001 - a result whose repr fails
                text = f"<{type(value).__name__}: its repr raised {type(exc).__name__}>"
            cell.result = text[:KEEP_CHARS]
        error = getattr(result, "error_in_exec", None) or getattr(result, "error_before_exec", None)
        if error is not None:
            cell.error = self._traceback(error)
            self.errors[cell.number] = cell.error
        self.cells[cell.number] = cell
        while len(self.cells) > KEEP_CELLS:
            number, _ = self.cells.popitem(last=False)
            self.errors.pop(number, None)

    def _traceback(self, error: BaseException) -> str:
        """The traceback as IPython showed it, as plain text."""
        try:
            lines = self.shell.InteractiveTB.structured_traceback(type(error), error, error.__traceback__)
            text = plain("\n".join(lines))
            text = re.sub(r"^-{20,}\n", "", text)  # IPython's rule above the traceback: tokens, no meaning
        except Exception:  # noqa: BLE001 - IPython's formatter failed: the standard library's
            import traceback
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        return shorten_traceback(text)

    # -- for a prompt ------------------------------------------------------------------------
    def before(self, number: int, count: int | None) -> list[CellRecord]:
        """The cells run before ``In[number]``, oldest first: the last *count* of them (None: all),
        leaving out the cells that were prompts themselves (their turns are in the session)."""
        earlier = [c for n, c in self.cells.items() if n < number and not _OURS.match(c.source)]
        return earlier if count is None else earlier[-count:] if count > 0 else []

    def failed(self, number: int | None = None) -> CellRecord | None:
        """The cell In[*number*], or the last one that failed (None when there is none)."""
        if number is not None:
            return self.cells.get(number)
        return next((c for c in reversed(self.cells.values()) if c.error), None)

    def attachments(self, number: int, count: int | None, max_tokens: int) -> list[dict[str, Any]]:
        out = []
        for cell in self.before(number, count):
            text = cell.text(max_tokens)
            out.append({"kind": "cell", "name": f"In[{cell.number}]", "type": "error" if cell.error else "code",
                        "text": text, "tokens": estimate_tokens(text)})
        return out
