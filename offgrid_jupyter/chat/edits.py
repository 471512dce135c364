"""Fix, edit and generate cells: a turn whose reply is a proposal, never free text.

``%offgrid fix``/``edit`` in a kernel and the JupyterLab commands (through ``POST
sessions/{ref}/proposals``) ask the same way: the target cell (its source, and its error for a
fix) and the variables it reads go in as attachments (chat/attachments.py), the request says
what to do, and the reply is constrained by a grammar to a JSON object, so even the 135M default
returns a well-formed proposal: ``{"explanation", "code"}`` for a fix or an edit, ``{"cells":
[{"cell_type", "source"}]}`` for new cells. The turn is stored in the notebook's session with
``metadata.task`` and the target cell, like any other turn, so the conversation and the
statistics see it.

The code of a Python proposal is compiled (never run) before it is shown: ``compile_error``
says why it does not compile, and the magic then asks once more at another seed. What is shown
is a unified diff of the cell's source against the proposal (``diff_lines``).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ContextOverflowError, InvalidRequestError, ReplyInvalidError
from ..validation import check_text
from .attachments import estimate_tokens

TASKS = ("fix", "edit", "generate")
MAX_CELLS = 12  # a generate proposal's cells
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_FENCE = re.compile(r"```[\w+.-]*[^\n]*\n(.*?)(?:\n```|\Z)", re.S)
MAX_INSTRUCTION = 2_000  # characters
MAX_SOURCE = 100_000  # characters of the target cell (its tokens must also fit the window)

MAX_EXPLANATION = 300  # characters: the grammar ends it there, so a small model cannot ramble past the code
_PROPOSAL = {"type": "object", "additionalProperties": False, "required": ["code", "explanation"],
             "properties": {"code": {"type": "string"},
                            "explanation": {"type": "string", "maxLength": MAX_EXPLANATION}}}
_CELLS = {"type": "object", "additionalProperties": False, "required": ["cells"],
          "properties": {"cells": {"type": "array", "minItems": 1, "maxItems": MAX_CELLS, "items": {
              "type": "object", "additionalProperties": False, "required": ["cell_type", "source"],
              "properties": {"cell_type": {"enum": ["markdown", "code"]}, "source": {"type": "string"}}}}}}


@dataclass
class Task:
    """What to propose: ``kind`` fix | edit | generate, for the cell ``label`` (``In[3]``)."""

    kind: str
    source: str = ""  # the target cell's source (generate: the active cell's, for context; may be "")
    label: str = "the cell"
    error: str | None = None  # a fix: the cell's traceback, as plain text
    instruction: str | None = None  # an edit or generate: what the person asked
    language: str = "python"
    cell_id: str | None = None

    def check(self) -> "Task":
        """Every field checked, a 400 naming it otherwise."""
        if self.kind not in TASKS:
            raise InvalidRequestError(f"task must be one of {', '.join(TASKS)}, got {str(self.kind)[:40]!r}.")
        check_text(self.source, "source")
        if len(self.source) > MAX_SOURCE:
            raise InvalidRequestError(f"source is {len(self.source):,} characters; a cell to fix or edit may have "
                                      f"at most {MAX_SOURCE:,}.")
        if self.kind in ("fix", "edit") and not self.source.strip():
            raise InvalidRequestError(f"The cell to {self.kind} is empty: there is nothing to change.")
        if self.kind == "fix" and not (self.error or "").strip():
            raise InvalidRequestError("A fix needs the cell's error (error): the cell did not fail.")
        if self.kind in ("edit", "generate"):
            if not (self.instruction or "").strip():
                raise InvalidRequestError(f"Say what to do (instruction): an {self.kind} needs one, e.g. "
                                          "\"vectorise this loop\".")
            check_text(self.instruction, "instruction")
            if len(self.instruction) > MAX_INSTRUCTION:
                raise InvalidRequestError(f"instruction is {len(self.instruction):,} characters; at most "
                                          f"{MAX_INSTRUCTION:,}.")
        for name in ("label", "language"):
            value = getattr(self, name)
            check_text(value, name)
            if not value or len(value) > 100 or "\n" in value:
                raise InvalidRequestError(f"{name} must be one line of 1-100 characters.")
        if self.error is not None:
            check_text(self.error, "error")
        return self

    @property
    def python(self) -> bool:
        return self.language.lower() in ("python", "python3", "ipython", "ipython3")

    def message(self) -> str:
        """The request as the session keeps it (and the model reads it, after the attachments)."""
        lang = self.language if not self.python else "Python"
        if self.kind == "fix":
            last = plain(self.error or "").strip().splitlines()[-1:] or [""]
            return (f"Fix {self.label}: it failed with `{last[0][:200]}`. Reply with JSON: `code` (the whole "
                    f"corrected cell, {lang} only) and `explanation` (one or two sentences: what was wrong).")
        if self.kind == "edit":
            return (f"Edit {self.label}: {self.instruction.strip()}\nReply with JSON: `code` (the whole new cell, "
                    f"{lang} only) and `explanation` (one sentence: what changed).")
        return (f"Write notebook cells: {self.instruction.strip()}\nReply with JSON: `cells`, a list of at most "
                f"{MAX_CELLS} cells, each with `cell_type` (markdown or code) and `source` ({lang} for code).")

    def attachments(self) -> list[dict[str, Any]]:
        """The target cell as the model reads it: its source, and its error for a fix."""
        if not self.source.strip():
            return []
        fence = "python" if self.python else self.language.lower()
        text = f"```{fence}\n{self.source.rstrip()}\n```"
        if self.kind == "fix" and self.error:
            text += f"\nError:\n{shorten_traceback(plain(self.error).strip())}"
        return [{"kind": "cell", "name": self.label, "type": "error" if self.kind == "fix" else "code",
                 "text": text, "tokens": estimate_tokens(text)}]

    def response_format(self) -> dict[str, Any]:
        schema = _CELLS if self.kind == "generate" else _PROPOSAL
        return {"type": "json_schema", "json_schema": {"name": "cells" if self.kind == "generate" else "proposal",
                                                       "schema": schema}}

    def max_tokens(self, n_ctx: int) -> int:
        """Room for the whole cell again and an explanation (a fix mostly copies the cell)."""
        wanted = 2 * estimate_tokens(self.source) + 320 if self.kind != "generate" else 1024
        return max(128, min(wanted, n_ctx // 2))

    def check_fits(self, n_ctx: int) -> None:
        """A cell that cannot fit the window twice (as it is, and as proposed) is refused, with its size."""
        tokens = estimate_tokens(self.source)
        if self.kind != "generate" and 2 * tokens + 256 > n_ctx:
            raise ContextOverflowError(
                f"{self.label} is about {tokens:,} tokens: a {self.kind} needs room for it twice (as it is and as "
                f"proposed) in the model's {n_ctx:,}-token window. Split the cell, or use a model with a larger n_ctx.")

    def metadata(self) -> dict[str, Any]:
        """What the stored question says about the task: its kind, the target cell (label, id) and
        the source the proposal is a diff against."""
        out: dict[str, Any] = {"task": self.kind, "cell": self.label}
        if self.cell_id:
            out["cell_id"] = self.cell_id
        if self.kind != "generate":
            out["target_source"] = self.source
        return out


@dataclass
class Proposal:
    """A reply, parsed: the new cell (fix, edit) or new cells (generate)."""

    explanation: str = ""
    code: str | None = None
    cells: list[dict[str, str]] = field(default_factory=list)
    compile_error: str | None = None  # why the code does not compile (Python only)
    checked: bool = False  # whether it was compiled at all

    @property
    def empty(self) -> bool:
        """No code at all: a small model sometimes answers a fix with an empty cell (seen on CI's
        CPU for a NameError), which would delete the cell rather than fix it."""
        if self.code is not None:
            return not self.code.strip()
        return not any(c["source"].strip() for c in self.cells)

    @property
    def problem(self) -> str | None:
        """Why this proposal should not be offered as it is (asked once more when there is one)."""
        return self.compile_error or ("no code was proposed" if self.empty else None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"explanation": self.explanation, "checked": self.checked,
                               "compile_error": self.compile_error}
        if self.code is not None:
            out["code"] = self.code
        else:
            out["cells"] = self.cells
        return out


def parse(text: str, task: Task, compile_check: Callable[[str], str | None] | None = None) -> Proposal:
    """The reply as a proposal (the grammar made it JSON of the right shape; a code block that the
    model put around its code is taken off), checked by *compile_check* for Python."""
    try:
        value = json.loads(text, strict=False)
    except ValueError as exc:
        raise ReplyInvalidError(f"The proposal is not JSON ({exc}).") from None
    if task.kind == "generate":
        cells = [{"cell_type": c["cell_type"], "source": _unfenced(c["source"])} for c in value["cells"]]
        proposal = Proposal(cells=cells)
        codes = [c["source"] for c in cells if c["cell_type"] == "code"]
    else:
        proposal = Proposal(explanation=value["explanation"].strip(), code=_unfenced(value["code"]))
        codes = [proposal.code]
    if task.python:
        check = compile_check or compile_error
        proposal.checked = True
        proposal.compile_error = next((e for e in map(check, codes) if e), None)
    return proposal


def _unfenced(code: str) -> str:
    """*code* without the Markdown a model may have put around it: a fenced block's content
    (prose before it and after it dropped; an unclosed fence runs to the end)."""
    match = _FENCE.search(code)
    return match.group(1).strip("\n") if match else code.strip("\n")


def compile_error(code: str) -> str | None:
    """Why *code* is not valid Python (compiled, never run), or None. Lines that are IPython's
    (``%magic``, ``!shell``) are left out first: compile() does not know them."""
    plain = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in code.split("\n"))
    try:
        compile(plain, "<proposal>", "exec")
    except SyntaxError as exc:
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    except (ValueError, OverflowError, RecursionError, MemoryError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def diff_lines(old: str, new: str, label: str = "the cell") -> list[str]:
    """A unified diff of the cell's source (*old*) and the proposal (*new*), without the two
    header lines; empty when nothing changes."""
    lines = list(difflib.unified_diff(old.split("\n"), new.split("\n"), label, "proposed", lineterm="", n=3))
    return lines[2:]


def plain(text: str) -> str:
    """*text* without terminal colour codes (a traceback as IPython or a notebook shows it)."""
    return _ANSI.sub("", text)


def shorten_traceback(traceback: str, head: int = 800, tail: int = 1600) -> str:
    """A long traceback's start (the cell's own frame) and end (the frames nearest the error and
    the error itself), whole lines, with what was left out said: a pandas KeyError is 150 lines
    of library frames that would take a small model's whole window."""
    if len(traceback) <= head + tail:
        return traceback
    lines = traceback.split("\n")
    first, used = [], 0
    while lines and used + len(lines[0]) < head:
        used += len(lines[0]) + 1
        first.append(lines.pop(0))
    last, used = [], 0
    while lines and used + len(lines[-1]) < tail:
        used += len(lines[-1]) + 1
        last.insert(0, lines.pop())
    return "\n".join([*first, f"… ({len(lines)} lines of frames left out)", *last]) if lines else traceback
