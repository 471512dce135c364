"""``%offgrid fix [N]`` and ``%offgrid edit N INSTRUCTION`` in a kernel.

The task (chat/edits.py) is a turn of the notebook's session: the target cell with its error, and
the variables the cell reads, described as ``@name`` would describe them, go in as attachments;
the reply is a proposal constrained to ``{"explanation", "code"}``. Python code is compiled (not
run); if it does not compile, the turn is asked once more at another seed (replacing the first),
and a proposal that still does not compile is shown with a warning. The cell then shows the
explanation and a coloured unified diff, and the corrected code is offered as the next input
(IPython's ``set_next_input``: JupyterLab and Notebook 7 put it in a new cell below; replacing
the cell itself is the JupyterLab commands' job, which can reach the notebook).
"""

from __future__ import annotations

import ast
import html
import json
import re
import types
from typing import Any

from ..chat.edits import Proposal, Task, diff_lines, parse
from ..errors import ReplyCutError
from ..chat.turns import TurnResult
from .describe import RawJSON, attachment

MAX_VARIABLES = 8  # described with a fix or an edit
VARIABLE_TOKENS = 200  # each
RETRY_TEMPERATURE = 0.7
_CODE = re.compile(r'"code"\s*:\s*"((?:[^"\\]|\\.)*)', re.S)


def reads(source: str, namespace: dict[str, Any]) -> list[str]:
    """The names *source* reads that are variables of *namespace* (not modules, not builtins), in
    the order they first appear: what the model should know to fix the cell. A cell that does not
    parse reads nothing we can tell."""
    try:
        tree = ast.parse("\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in source.split("\n")))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    first: dict[str, tuple[int, int]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in namespace \
                and not node.id.startswith("_") and not isinstance(namespace[node.id], types.ModuleType):
            where = (node.lineno, node.col_offset)
            first[node.id] = min(first.get(node.id, where), where)
    return sorted(first, key=first.get)[:MAX_VARIABLES]


def partial_code(text: str) -> str:
    """The ``code`` of a proposal still being written (its JSON string so far, unescaped)."""
    match = _CODE.search(text)
    if not match:
        return ""
    raw = match.group(1)
    raw = raw[:-1] if raw.endswith("\\") and not raw.endswith("\\\\") else raw  # half an escape
    try:
        return json.loads(f'"{raw}"')
    except ValueError:
        return raw.replace("\\n", "\n").replace('\\"', '"')


class ProposalView:
    """A proposal in the notebook: what was wrong, the diff of the cell against the proposal in
    colour (HTML; plain text elsewhere), whether it compiles, and what happens next."""

    def __init__(self, task: Task, proposal: Proposal, *, note: str | None = None):
        self.task, self.proposal, self.note = task, proposal, note
        self.diff = diff_lines(task.source, proposal.code or "", task.label)

    def _status(self) -> list[str]:
        lines = []
        if self.proposal.compile_error:
            lines.append(f"⚠ does not compile: {self.proposal.compile_error}")
        elif self.proposal.empty:
            lines.append("⚠ no code was proposed: the cell is left as it is")
        elif not self.proposal.checked:
            lines.append(f"not checked: {self.task.language} code is compiled only for Python kernels")
        if self.note:
            lines.append(self.note)
        return lines

    def _repr_html_(self) -> str:
        rows = []
        for line in self.diff or ["(no change proposed)"]:
            cls = ("offgrid-diff-add" if line.startswith("+") else "offgrid-diff-del" if line.startswith("-") else
                   "offgrid-diff-hunk" if line.startswith("@@") else "offgrid-diff-ctx")
            colour = {"offgrid-diff-add": "var(--jp-success-color3,#e6ffed)", "offgrid-diff-del":
                      "var(--jp-error-color3,#ffeef0)"}.get(cls, "transparent")
            rows.append(f'<div class="{cls}" style="background:{colour}">{html.escape(line) or "&nbsp;"}</div>')
        status = "".join(f'<div style="color:var(--jp-ui-font-color2,#666)">{html.escape(s)}</div>'
                         for s in self._status())
        return (f'<div class="offgrid-proposal"><div>{html.escape(self.proposal.explanation)}</div>'
                f'<pre class="offgrid-diff" style="padding:4px;border:1px solid var(--jp-border-color2,#ddd)">'
                f'{"".join(rows)}</pre>{status}</div>')

    def __repr__(self) -> str:
        return "\n".join([self.proposal.explanation, *(self.diff or ["(no change proposed)"]), *self._status()])


def variables(task: Task, namespace: dict[str, Any]) -> list[dict[str, Any]]:
    return [attachment(name, namespace[name], max_tokens=VARIABLE_TOKENS) for name in reads(task.source, namespace)]


def kernel_reads(source: str) -> RawJSON:
    """For the JupyterLab commands (a silent ``user_expressions`` call in the notebook's kernel):
    the variables *source* reads, described, as JSON attachments."""
    from IPython import get_ipython

    shell = get_ipython()
    ns = shell.user_ns if shell is not None else {}
    names = reads(source, ns) if isinstance(source, str) else []
    return RawJSON(json.dumps([attachment(n, ns[n], max_tokens=VARIABLE_TOKENS) for n in names]))


def run(context: Any, task: Task, session_id: str | None, namespace: dict[str, Any], *, params: dict[str, Any],
        local: bool = False, on_text: Any = None) -> tuple[TurnResult, Proposal, str | None]:
    """Ask for the proposal (once more at another seed when its Python does not compile): the
    turn's outcome, the proposal, and a note when it was asked twice."""
    n_ctx = context.runner(local=local).describe().get("n_ctx") or 4096
    task.check_fits(n_ctx)
    attached = task.attachments() + variables(task, namespace)
    params = {"max_tokens": task.max_tokens(n_ctx), "temperature": 0.0, **{k: v for k, v in params.items()
                                                                          if v is not None},
              "response_format": task.response_format()}
    note = None
    replace = None
    for attempt in (1, 2):
        turn = context.start_turn(session_id, task.message(), params=params, local=local, source=task.kind,
                                  metadata=task.metadata(), replace=replace, context=attached)
        if session_id is not None:
            context.turn_started(session_id, turn)
        try:
            if on_text is not None:
                on_text(turn)
            outcome = turn.finish()
        except KeyboardInterrupt:
            turn.cancel()
            outcome = turn.finish()
        except ReplyCutError:  # the JSON never closed (a small model can loop until the limit): not stored
            if attempt == 2:
                raise
            note = "asked twice: the first reply reached the token limit before its JSON was complete"
            params = {**params, "temperature": RETRY_TEMPERATURE, "seed": (params.get("seed") or 0) + 1}
            continue
        except BaseException:
            turn.abort()
            raise
        finally:
            context.turn_done(session_id)
        if outcome.result.finish_reason == "cancelled":
            return outcome, Proposal(), None
        proposal = parse(outcome.result.text, task)
        if not proposal.problem or attempt == 2:
            return outcome, proposal, note
        note = (f"asked twice: the first proposal did not compile ({proposal.compile_error})"
                if proposal.compile_error else f"asked twice: {proposal.problem} the first time")
        replace = outcome.user_message.id if outcome.user_message is not None else None
        params = {**params, "temperature": RETRY_TEMPERATURE, "seed": (params.get("seed") or 0) + 1}
    raise AssertionError("unreachable")
