"""``%%offgrid`` (the cell is the prompt) and ``%offgrid SUBCOMMAND``.

Options are parsed with ``shlex`` and ``argparse``: quoting works, and a bad
option is a short usage message (IPython's ``UsageError``). Expected failures
(no model, unknown session, queue timeout, an interrupt) are one line, through
IPython's ``_render_traceback_`` hook; the cell still fails, so "Run all" stops
there as it should.
"""

from __future__ import annotations

import argparse
import json
import re
import string
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display
from traitlets import Bool, Dict, Enum, Float, Int, Unicode, Union, observe

from . import proposals
from .cells import CellLog
from .proposals import ProposalView, partial_code
from ..chat.edits import Task
from .context import Context, set_loaded
from .describe import DEFAULT_TOKENS, attachment, mentions, resolve
from ..chat.attachments import label, stored_context
from .parsers import FORMATS, HELP, STRUCTURED, SUBCOMMANDS, HelpShown, cell_parser, line_parser, split
from ..errors import (DuplicateNameError, Interrupted, OffgridError, OffgridMagicError, ReplyCutError,
                      ReplyInvalidError, SessionNotFoundError)
from .render import Conversation, Note, Progress, Reply, Table, context_gauge, tool_lines
from ..stats import summarize
from ..chat.store import SESSION_ID_RE
from ..chat.profiles import check_profile
from ..retrieval.chunking import Limits
from ..retrieval.rag import sources_markdown
from ..inference.structured import Shape
from .remote import RemoteTurn
from ..chat.turns import ChatTurn, TurnResult

MB = 1 << 20


# -- interpolation ------------------------------------------------------------------
_FIELD = re.compile(r"\{\{|\}\}|\{([^{}\n]+)\}")
SHOWN_ITEMS = 50  # values of an array or index written into a prompt (then "… N more")


class _Formatter(string.Formatter):
    """``str.format`` for prompts: a pandas Index or array, or a 1-d numpy array, is written as the
    list of its values (``['month', 'region']``), not its repr (pandas 3 wrote ``<ArrowStringArray>``,
    the dtype and the length into the prompt, and the model quoted it back)."""

    def format_field(self, value: Any, format_spec: str) -> str:
        if not format_spec and _array_like(value):
            items = value.tolist()
            more = len(items) - SHOWN_ITEMS
            return repr(items[:SHOWN_ITEMS])[:-1] + (f", … {more} more]" if more > 0 else "]")
        return super().format_field(value, format_spec)


def _array_like(value: Any) -> bool:
    module = type(value).__module__.split(".")[0]
    if module == "numpy":
        return getattr(value, "ndim", 0) == 1
    if module == "pandas":  # an Index or an ExtensionArray (a Series or a DataFrame prints readably)
        return hasattr(value, "tolist") and type(value).__name__ not in ("Series", "DataFrame")
    return False


_formatter = _Formatter()


def interpolate(text: str, namespace: dict[str, Any]) -> str:
    """Replace ``{expr}`` fields (``{df.shape}``, ``{In[3]}``, ``{x:.2f}``) from
    *namespace*; a field that does not resolve is left as written, and
    ``{{``/``}}`` give literal braces."""

    def field(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        try:
            return _formatter.vformat(token, (), namespace)
        except Exception:  # noqa: BLE001 - any unresolvable field stays as the user wrote it
            return token

    return _FIELD.sub(field, text)


# -- reply post-processing ---------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """The fenced code blocks of a reply joined together, else the whole reply."""
    blocks = [body.strip("\n") for _lang, body in _FENCE.findall(text)]
    return "\n\n".join(b for b in blocks if b.strip()) or text.strip()


def parse_json(text: str) -> Any:
    """Parse a reply as JSON (inside a code fence or not)."""
    candidates = [text.strip()]
    fenced = _FENCE.findall(text)
    if fenced:
        candidates.insert(0, fenced[0][1].strip())
    first = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    last = max(text.rfind("}"), text.rfind("]"))
    if 0 <= first < last:
        candidates.append(text[first:last + 1])
    error: json.JSONDecodeError | None = None
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError as exc:
            error = error or exc
    raise ValueError(f"{error.msg} (line {error.lineno} column {error.colno})" if error else "empty reply")


@magics_class
class OffgridMagics(Magics):
    """The magics; settings come from traitlets config (``c.OffgridMagics.…``)."""

    max_tokens = Int(None, allow_none=True, help="Longest reply in tokens (None: the engine default, 512)."
                     ).tag(config=True)
    temperature = Float(None, allow_none=True, help="Sampling temperature (None: the engine default, 0.2)."
                        ).tag(config=True)
    system_prompt = Unicode(None, allow_none=True, help="System prompt for sessions the magic creates."
                            ).tag(config=True)
    format = Enum(FORMATS, default_value="markdown", help="Default reply format.").tag(config=True)
    update_interval = Float(0.1, help="Seconds between redraws of a streaming reply.").tag(config=True)
    rerun = Enum(("replace", "append"), default_value="replace",
                 help="What re-running a cell does: replace the turn it made before, or append a new one."
                 ).tag(config=True)
    interpolate = Bool(True, help="Replace {name} fields in prompts from the user namespace.").tag(config=True)
    learn_limits = Dict(help="What `%offgrid learn` may take from one file: max_file_mb, max_text_mb, max_columns, "
                        "max_rows, max_pages, max_cells, and per learn max_files, max_entries, seconds_per_file, "
                        "memory_mb (see the README's 'Ask your own files').").tag(config=True)
    context_cells = Union([Int(), Enum(["all"])], default_value=0,
                          help="Earlier cells every %%offgrid cell attaches (--context's default): a number, or "
                               "'all' (as many as fit). A session's profile can set its own.").tag(config=True)
    attach_tokens = Int(DEFAULT_TOKENS, help="Longest description of one @variable or one attached cell, in "
                        "(estimated) tokens.").tag(config=True)
    profiles = Dict(help="Profiles to define: {name: {system_prompt, temperature, max_tokens, top_p, top_k, "
                    "repeat_penalty, seed, model, tools, max_rounds}} (put in the store the first time a cell or "
                    "`%offgrid profile(s)` runs).").tag(config=True)

    def __init__(self, shell=None, context: Context | None = None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.context = context or Context(shell)
        self._cell_id: str | None = None
        self._cell_parser, self._line_parser = cell_parser(), line_parser()
        self._profiles_defined = False
        self.cells = CellLog(shell)  # installed by load(): what earlier cells printed and raised
        self.context.attach_tokens = self.attach_tokens  # (the panel's @name too)

    @observe("attach_tokens")
    def _attach_tokens_changed(self, change: Any) -> None:
        self.context.attach_tokens = change["new"]

    def pre_run_cell(self, info) -> None:
        """IPython event: remember which notebook cell is running (for re-runs)."""
        self._cell_id = getattr(info, "cell_id", None)

    @line_cell_magic
    def offgrid(self, line: str, cell: str | None = None):
        """%%offgrid: ask the model (the cell is the prompt). %offgrid help: subcommands."""
        try:
            if cell is None:
                return self._subcommand(line)
            return self._ask(line, cell)
        except HelpShown:
            return None
        except OffgridError as exc:
            raise OffgridMagicError(str(exc)) from None

    # -- %%offgrid -------------------------------------------------------------------------
    def _ask(self, line: str, cell: str) -> Any:
        args = self._cell_parser.parse_args(split(line))
        if args.local and self.context.remote_sessions and not args.no_history:
            raise UsageError("--local runs the cell in this kernel, but this notebook's sessions are on the server "
                             "it is connected to: add --no-history, or `%offgrid disconnect` first.")
        if args.no_history and (args.session or args.new):
            raise UsageError("--no-history keeps nothing, so it cannot be combined with -s/--session or --new.")
        prompt = cell if args.no_interpolate or not self.interpolate else interpolate(cell, self.shell.user_ns)
        prompt = prompt.strip()
        if not prompt:
            raise UsageError("The cell is empty: write the prompt on the lines below %%offgrid.")
        fmt = "frame" if args.frame else args.format or ("json" if args.schema else self.format)
        shape = self._shape(args.schema) if args.schema else None
        if shape is not None and fmt not in STRUCTURED:
            raise UsageError(f"--schema makes the reply JSON: use it with -f json or -f frame, not -f {fmt}.")
        params = {"max_tokens": args.max_tokens if args.max_tokens is not None else self.max_tokens,
                  "temperature": args.temperature if args.temperature is not None else self.temperature,
                  "seed": args.seed}
        if fmt in STRUCTURED:
            params["response_format"] = shape.response_format if shape else {"type": "json_object"}
        store = self.context.store
        session_id = replace = note = None
        if not args.no_history:
            session, note = self._target_session(args)
            session_id = session.id
            if args.system is not None and args.system != session.system_prompt:
                store.update(session_id, system_prompt=args.system)
            if self._cell_id and self.rerun == "replace":
                replace = store.cell_turn(session_id, self._cell_id)
        if (args.tool_choice or args.max_rounds) and not args.tools and args.no_history:
            raise UsageError("--tool-choice and --max-rounds go with --tools (or a session whose profile offers tools).")
        tools = self.context.find_tools([t.strip() for t in args.tools.split(",") if t.strip()]) \
            if args.tools else None
        if args.k is not None and args.rag is None:
            raise UsageError("-k is how many excerpts --rag retrieves: add --rag [COLLECTION].")
        rag = None if args.rag is None else {"collection": args.rag or None, "k": args.k or 5}
        context = self._attachments(cell, args, session_id)
        try:
            turn = self.context.start_turn(session_id, prompt, params=params, local=args.local,
                                           system_prompt=args.system or self.system_prompt, model=args.model,
                                           metadata={"cell_id": self._cell_id} if self._cell_id else None,
                                           replace=replace, tools=tools, tool_choice=args.tool_choice,
                                           max_rounds=args.max_rounds, rag=rag, context=context)
        except KeyboardInterrupt:  # Stop while an earlier turn of this session (a panel's) still runs
            raise Interrupted("stopped while an earlier turn of this session was running; nothing was stored.") \
                from None
        if session_id is not None:
            self.context.turn_started(session_id, turn)  # chat panels on this session follow it
        try:
            outcome = self._run(turn, "json" if fmt == "frame" else fmt, stream=not args.no_stream, note=note,
                                local=args.local)
        except (ReplyCutError, ReplyInvalidError) as exc:  # a constrained reply that is not whole: not stored
            if args.output:
                self.shell.user_ns[args.output] = getattr(exc, "text", "")
            kept = f" The text is in {args.output}." if args.output else " Use -o VAR to keep the text."
            raise OffgridMagicError(f"{exc}{kept}") from None
        finally:
            self.context.turn_done(session_id)
        return self._deliver(outcome, fmt, args.output, shape)

    def _attachments(self, cell: str, args: argparse.Namespace, session_id: str | None) -> list[dict[str, Any]]:
        """What the cell attaches: a description of each ``@name`` that is a variable (unless
        --no-interpolate), and the cells run before it (--context, else the session's profile's
        context_cells, else c.OffgridMagics.context_cells)."""
        ns = self.shell.user_ns
        items = []
        if not args.no_interpolate:
            for name in mentions(cell, ns):
                items.append(attachment(name, resolve(name, ns)[1], max_tokens=self.attach_tokens))
        count = args.context
        if count is None and session_id is not None:
            count = self._profile_cells(session_id)
        if count is None:
            count = self.context_cells
        if count:
            items += self.cells.attachments(self.shell.execution_count, None if count == "all" else count,
                                            self.attach_tokens)
        return items

    def _profile_cells(self, session_id: str) -> int | str | None:
        profile = getattr(self.context.store.get(session_id, messages=False), "profile", None)
        if not profile:
            return None
        try:
            return self._profiles().get(profile).context_cells
        except OffgridError:  # deleted since, or sessions on a server elsewhere
            return None

    def _shape(self, spec: str) -> Shape:
        """--schema SPEC: a name in the notebook's namespace, ``list[Name]``, or inline JSON."""
        listed = re.fullmatch(r"\s*list\[\s*([A-Za-z_][\w.]*)\s*\]\s*", spec)
        if listed and listed.group(1) in self.shell.user_ns:
            return Shape(list[self.shell.user_ns[listed.group(1)]])
        if spec in self.shell.user_ns:
            return Shape(self.shell.user_ns[spec])
        if spec.lstrip().startswith("{"):
            try:
                return Shape(json.loads(spec))
            except ValueError as exc:
                raise UsageError(f"--schema is not valid JSON: {exc}. Quote it: --schema '{{\"type\": ...}}'.") \
                    from None
        raise UsageError(f"--schema {spec!r} is not defined in the notebook (define the class or dict first) "
                         "and is not inline JSON.")

    def _target_session(self, args: argparse.Namespace) -> tuple[Any, str | None]:
        """The cell's session, and a note when the cell created it."""
        ctx = self.context
        system = args.system or self.system_prompt
        self._define_configured()
        if args.profile and not args.new and (not args.session or self._exists(args.session)):
            raise UsageError("--profile chooses how a new session is made: add --new, or -s a name that does "
                             "not exist yet (a session keeps the profile it was made with).")
        if args.new:
            try:
                s = ctx.new_session(args.session, system_prompt=system, profile=args.profile)
            except DuplicateNameError:
                raise DuplicateNameError(
                    f"A session named {args.session!r} already exists: `-s {args.session}` continues it; "
                    f"`%offgrid delete {args.session}` first to start it over.") from None
            return s, f"new session `{s.name or s.id}`"
        if args.session:
            try:
                return ctx.store.get(args.session, messages=False), None
            except SessionNotFoundError:
                if SESSION_ID_RE.fullmatch(args.session):
                    raise SessionNotFoundError(f"No session {args.session!r}. `%offgrid sessions` lists them.") \
                        from None
            try:  # a named session is created on first use, so a notebook re-runs anywhere
                s = ctx.new_session(args.session, system_prompt=system, adopt=False, profile=args.profile)
            except DuplicateNameError:  # another kernel created it just now
                return ctx.store.get(args.session, messages=False), None
            return s, f"created session `{s.name}`"
        return ctx.current_session(system_prompt=self.system_prompt), None

    def _run(self, turn: ChatTurn | RemoteTurn, fmt: str, *, stream: bool, note: str | None = None,
             local: bool = False) -> TurnResult:
        handle = display(Reply(format=fmt, status="waiting for the model…"), display_id=True) if stream else None
        try:
            if handle is not None:
                self._stream(turn, fmt, handle)
            outcome = turn.finish()
        except KeyboardInterrupt:  # the kernel's Stop button: keep what was generated
            turn.cancel()
            outcome = turn.finish()
        except BaseException as exc:
            turn.abort()
            if handle is not None and isinstance(exc, OffgridError):  # the partial text stays, marked
                handle.update(Reply(getattr(exc, "text", ""), format=fmt, status=f"not kept: {exc}", done=True))
            raise
        final = self._final(outcome, fmt)
        final.status = " · ".join(filter(None, [note, final.status, self._context_line(outcome, local)])) or None
        if handle is not None:
            handle.update(final)
        else:
            display(final)
        return outcome

    def _stream(self, turn: ChatTurn | RemoteTurn, fmt: str, handle) -> None:
        for text, status in Progress().views(turn.generation.batches(self.update_interval, heartbeat=True)):
            handle.update(Reply(text, format=fmt, status=status))

    def _context_line(self, outcome: TurnResult, local: bool) -> str | None:
        """What the turn attached (and what fitting cut), and the context gauge: how much of the
        model's window the session's next prompt takes, and what goes first when it is full."""
        msg = outcome.user_message
        metadata = msg.metadata if msg is not None else {}
        items = stored_context(metadata)
        parts = [f"attached {', '.join(label(i) for i in items)}"] if items else []
        if metadata.get("context_note"):
            parts.append(str(metadata["context_note"]))
        if outcome.session_id is not None:
            try:
                n_ctx = self.context.runner(local=local).describe().get("n_ctx")
            except OffgridError:
                n_ctx = None
            if n_ctx:
                used = outcome.result.usage.get("prompt_tokens", 0) + outcome.result.usage.get("completion_tokens", 0)
                parts.append(context_gauge(used, n_ctx))
        return " · ".join(parts) or None

    @staticmethod
    def _final(outcome: TurnResult, fmt: str) -> Reply:
        r = outcome.result
        status = None
        if r.finish_reason == "cancelled":
            status = f"⏹ interrupted after {r.usage['completion_tokens']} tokens"
        elif r.note:
            status = r.note
        elif r.finish_reason == "length":
            status = f"stopped at the {r.params['max_tokens']}-token limit (raise it with -n)"
        elif not r.text.strip():
            status = "the model returned an empty reply"
        if outcome.sources and fmt == "markdown":  # the reply ends with its sources, as links
            return Reply("\n\n".join([*tool_lines(r), r.text, sources_markdown(outcome.sources)]), format=fmt,
                         status=status, done=True, metadata=outcome.provenance())
        calls = tool_lines(r)
        if calls:
            status = " · ".join(filter(None, [f"{len(calls)} tool call{'s' * (len(calls) != 1)} in {r.rounds} "
                                              f"round{'s' * (r.rounds != 1)}", status]))
            if fmt == "markdown":
                return Reply("\n\n".join([*calls, r.text]), format=fmt, status=status, done=True,
                             metadata=outcome.provenance())
        return Reply(r.text, format=fmt, status=status, done=True, metadata=outcome.provenance())

    def _deliver(self, outcome: TurnResult, fmt: str, output: str | None, shape: Shape | None = None) -> Any:
        r = outcome.result
        if output:  # what the session keeps (a note when the tool rounds ended without an answer);
            self.shell.user_ns[output] = outcome.reply.content if outcome.reply else r.text  # the object below
        if r.finish_reason == "cancelled":
            where = (f"the partial reply is kept in session {outcome.session_name or outcome.session_id!r}"
                     if outcome.reply else "a JSON reply is kept only whole, so the turn was not stored"
                     if fmt in STRUCTURED and r.usage["completion_tokens"] else
                     "nothing was generated, so the turn was not stored")
            raise Interrupted(f"generation stopped after {r.usage['completion_tokens']} tokens; {where}.")
        if fmt == "code" and r.text.strip():
            self.shell.set_next_input(extract_code(r.text), replace=False)
        if fmt in STRUCTURED:
            kept = f" The text is in {output}." if output else " Use -o VAR to keep the text."
            try:
                if shape is not None:
                    value = shape.parse(r.text, r.finish_reason)
                elif r.finish_reason == "length":
                    raise ReplyCutError("The reply reached the token limit before its JSON was complete: "
                                        "raise -n (max tokens) and run the cell again.")
                else:
                    value = parse_json(r.text)
                if fmt == "frame":
                    value = (shape or Shape({"type": "array"})).frame(value)
            except ValueError as exc:
                raise OffgridMagicError(f"The reply is not valid JSON: {exc}.{kept}") from None
            except OffgridError as exc:
                raise OffgridMagicError(f"{exc}{kept}") from None
            if output:
                self.shell.user_ns[output] = value
            return value
        return None

    # -- %offgrid SUBCOMMAND ---------------------------------------------------------------------
    def _subcommand(self, line: str) -> Any:
        words = split(line)
        if not words:
            words = ["status"]
        if words[0] not in SUBCOMMANDS and words[0] not in ("-h", "--help"):
            raise UsageError(f"Unknown subcommand {words[0]!r}. Use one of: {', '.join(SUBCOMMANDS)}. "
                             "To ask the model, use the cell magic %%offgrid.")
        if words[0] in ("-h", "--help"):
            words = ["help"]
        args = self._line_parser.parse_args(words)
        return getattr(self, "_cmd_" + args.command)(args)

    def _cmd_help(self, args) -> Note:
        return Note(HELP)

    def _cmd_status(self, args) -> Table:
        ctx = self.context
        runner = ctx.runner()
        desc, status = runner.describe(), runner.status()
        current = ctx.current_session(create=False)
        rows: list[tuple[str, Any]] = []
        if "error" in desc:
            rows.append(("model", f"not available: {desc['error']}"))
        elif desc.get("kind") == "openai":
            rows += [("model", desc["name"]),
                     ("runs", f"{runner.where}: an OpenAI-compatible engine at {desc['url']}, up to "
                              f"{desc['max_concurrent']} requests at once")]
        else:
            rows += [("model", desc["name"]), ("model file", f"{desc['path']} ({desc['size_bytes'] / MB:.0f} MB, "
                                                            f"{desc['source']})"),
                     ("loaded", "yes" if desc["loaded"] else "no (loads on the first prompt)"),
                     ("runs", f"{runner.where}: llama.cpp on CPU, {desc['n_threads']} threads, "
                              f"{desc['n_ctx']}-token context")]
        rows += [("generating", status["generating_session_id"] or "nothing"),
                 ("queued", len(status["queued_session_ids"])),
                 ("session", f"{current.name or current.id} ({current.message_count} messages)" if current
                  else "none yet (created by the first %%offgrid cell)"),
                 ("notebook", ctx.notebook_path() or "unknown to this kernel"),
                 ("store", str(ctx.store.path))]
        if desc.get("source") == "default":
            rows.append(("note", "this is the embedded default, SmolLM2-135M: small enough to show how everything "
                                 "works, too small for good answers; the README's \"Choosing a model\" says which "
                                 "GGUF to use instead (`%offgrid model PATH`)"))
        return Table("offgrid status", rows)

    def _cmd_sessions(self, args):
        frame = self.context.store.sessions_frame()
        current = self.context.current_session(create=False)
        frame.insert(2, "current", frame["id"] == (current.id if current else None))
        return frame.head(args.limit) if args.limit else frame

    def _exists(self, ref: str) -> bool:
        try:
            self.context.store.get(ref, messages=False)
            return True
        except SessionNotFoundError:
            return False

    def _profiles(self):
        store = self.context.store
        if not hasattr(store, "profiles"):
            raise UsageError("Profiles are kept in the server's store: this kernel is connected to a server elsewhere; "
                             "GET /offgrid/v1/profiles there lists them.")
        self._define_configured()
        return store.profiles

    def _define_configured(self) -> None:
        """c.OffgridMagics.profiles into the store, once per kernel (the first use, not %load_ext)."""
        if self.profiles and not self._profiles_defined and hasattr(self.context.store, "profiles"):
            self.context.store.profiles.define(self.profiles)
        self._profiles_defined = True

    def _cmd_profiles(self, args):
        import pandas as pd

        rows = [p.to_dict() for p in self._profiles().list()]
        return pd.DataFrame(rows, columns=["name", "system_prompt", "params", "model", "tools", "max_rounds",
                                           "context_cells", "source"])

    def _cmd_profile(self, args) -> Note:
        profiles = self._profiles()
        if args.action == "delete":
            profiles.delete(args.name)
            return Note(f"Deleted profile `{args.name}`; sessions made with it keep their messages.")
        spec = {"system_prompt": args.system, "temperature": args.temperature, "max_tokens": args.max_tokens,
                "seed": args.seed, "model": args.model, "max_rounds": args.max_rounds,
                "tools": [t.strip() for t in args.tools.split(",") if t.strip()] if args.tools else [],
                "context_cells": args.context}
        profile = profiles.put(check_profile(args.name, {k: v for k, v in spec.items() if v is not None}))
        return Note(f"Profile `{profile.name}` saved: `%%offgrid --new --profile {profile.name}` starts a session "
                    "with it.")

    def _library(self):
        """Where this kernel's collections are: its store, or the server's (connected elsewhere)."""
        ctx = self.context
        return ctx.client.collections if ctx.remote_sessions else ctx.store.library

    # -- fix and edit: proposals as diffs (kernel/proposals.py) ------------------------------------
    def _cmd_fix(self, args) -> None:
        cell = self.cells.failed(args.n)
        if cell is None:
            raise UsageError(
                f"No cell In[{args.n}] in this kernel's record (it keeps the cells run since %load_ext offgrid_jupyter)."
                if args.n is not None else
                "No cell has failed since offgrid was loaded: run the failing cell, then `%offgrid fix` "
                "(or `%offgrid fix N` for In[N]).")
        if not cell.error:
            raise UsageError(f"In[{cell.number}] did not fail: `%offgrid edit {cell.number} INSTRUCTION` changes it.")
        task = Task("fix", cell.source, f"In[{cell.number}]", error=cell.error, cell_id=cell.cell_id).check()
        return self._propose(task, args)

    def _cmd_edit(self, args) -> None:
        cell = self.cells.failed(args.n)
        if cell is None:
            raise UsageError(f"No cell In[{args.n}] in this kernel's record (it keeps the cells run since "
                             "%load_ext offgrid_jupyter): run it first.")
        task = Task("edit", cell.source, f"In[{cell.number}]", instruction=" ".join(args.instruction),
                    cell_id=cell.cell_id).check()
        return self._propose(task, args)

    def _propose(self, task: Task, args) -> None:
        """Stream the proposal's code into the cell, then show it as a diff and offer it as the next input."""
        session = self.context.current_session(system_prompt=self.system_prompt)
        handle = display(Reply(status=f"proposing a {task.kind} of {task.label}…"), display_id=True)

        def stream(turn: Any) -> None:
            for text, status in Progress().views(turn.generation.batches(self.update_interval, heartbeat=True)):
                code = partial_code(text)
                handle.update(Reply(f"```python\n{code}\n```" if code else "", status=status))

        try:
            outcome, proposal, note = proposals.run(self.context, task, session.id, self.shell.user_ns,
                                                    params={"max_tokens": args.max_tokens}, on_text=stream)
        except OffgridError as exc:
            handle.update(Reply(status=f"not kept: {exc}", done=True))
            raise
        if outcome.result.finish_reason == "cancelled":
            handle.update(Reply(status="stopped: nothing was proposed", done=True))
            raise Interrupted("stopped; a proposal is kept only whole, so nothing was stored.")
        changed = proposal.code is not None and proposal.code.strip() != task.source.strip()
        if changed and not proposal.problem:
            self.shell.set_next_input(proposal.code, replace=False)
        after = ("no change proposed" if not changed else f"not put in a cell: {proposal.problem}"
                 if proposal.problem else "the new code is in a new cell below: run it, or delete it")
        handle.update(ProposalView(task, proposal, note=" · ".join(filter(None, [note, after]))),
                      metadata={"offgrid": outcome.provenance()})
        return None

    def _cmd_learn(self, args):
        import pandas as pd

        library = self._library()
        if args.delete:
            library.delete(args.delete)
            return Note(f"Deleted collection `{args.delete}`; the files themselves are untouched.")
        if args.list or not args.paths:
            rows = library.collections()
            frame = pd.DataFrame(rows, columns=["name", "documents", "chunks", "bytes", "last_learned_at",
                                                "embedding_model"])
            frame = frame.rename(columns={"name": "collection", "last_learned_at": "last_learned"})
            frame["last_learned"] = pd.to_datetime(frame["last_learned"], unit="s", utc=True)
            frame["embedding_model"] = [Path(m).name if isinstance(m, str) else None for m in frame["embedding_model"]]
            return frame
        from tqdm.auto import tqdm

        kwargs = {} if self.context.remote_sessions else {"limits": Limits.from_config(self.learn_limits)}
        report = library.learn(args.paths, args.collection, embedding_model=args.embedding_model,
                               progress=lambda items, **kw: tqdm(items, leave=False, **kw), **kwargs)
        return Note(report.summary() if hasattr(report, "summary") else str(report))

    def _cmd_search(self, args):
        import pandas as pd

        hits = self._library().search(" ".join(args.query), args.collection, args.k)
        rows = [{"path": h.path, "lines": f"{h.start}-{h.end}" if h.start != h.end else str(h.start), "unit": h.unit,
                 "heading": h.heading, "score": h.score, "collection": h.collection, "chunk_id": h.chunk_id,
                 "text": h.text[:200]} for h in hits]
        return pd.DataFrame(rows, columns=["path", "lines", "unit", "heading", "score", "collection", "chunk_id",
                                           "text"])

    def _cmd_use(self, args) -> Note:
        s = self.context.use(args.name)
        return Note(f"Using session `{s.name or s.id}` ({s.message_count} messages) for the following cells.")

    def _cmd_new(self, args) -> Note:
        s = self.context.new_session(args.name, system_prompt=args.system or self.system_prompt)
        return Note(f"Started session `{s.name or s.id}`; the following cells go to it.")

    def _cmd_history(self, args) -> Conversation | Note:
        ctx = self.context
        if args.name:
            return Conversation(ctx.store.get(args.name), args.last)
        current = ctx.current_session(create=False)
        if current is None:
            return Note("No session yet: the first `%%offgrid` cell starts one.")
        return Conversation(ctx.store.get(current.id), args.last)

    def _cmd_rename(self, args) -> Note:
        s = self.context.store.rename(args.old, args.new)
        return Note(f"Renamed `{args.old}` to `{s.name}`.")

    def _cmd_fork(self, args) -> Note:
        s = self.context.store.fork(args.name, name=args.new)
        return Note(f"Forked `{args.name}` as `{s.name or s.id}` ({s.message_count} messages). "
                    f"`%offgrid use {s.name or s.id}` to continue it.")

    def _cmd_delete(self, args) -> Note:
        store = self.context.store
        sid = store.get(args.name, messages=False).id
        store.delete(sid)
        self.context.forget(sid)
        return Note(f"Deleted session `{args.name}`.")

    def _cmd_end(self, args) -> Note:
        s = self.context.store.end(args.name)
        return Note(f"Ended session `{s.name or s.id}`; it stays readable.")

    def _cmd_export(self, args) -> Note:
        if args.all != (len(args.args) == 1) or len(args.args) > 2:
            raise UsageError("Usage: %offgrid export NAME PATH, or %offgrid export --all PATH.")
        *refs, path = args.args
        paths = self.context.store.export(path, None if args.all else refs)
        return Note(f"Exported {len(paths)} session(s) to `{path}`.")

    def _cmd_import(self, args) -> Note:
        sessions = self.context.store.import_(args.path)
        names = ", ".join(f"`{s.name or s.id}`" for s in sessions) or "nothing"
        return Note(f"Imported {len(sessions)} session(s): {names}.")

    def _cmd_model(self, args) -> Table | Note:
        runner = self.context.runner()
        if args.path:
            return Note(runner.switch_model(args.path))
        desc = runner.describe()
        if "error" in desc:
            raise OffgridMagicError(desc["error"])
        return Table("model", [(k, v) for k, v in desc.items()])

    def _cmd_stats(self, args):
        try:
            frame = self.context.store.stats_frame(since=args.since, session=args.session, model=args.model)
        except ValueError as exc:  # an unreadable --since
            raise UsageError(f"--since {args.since!r}: {exc}") from None
        if args.output:
            self.shell.user_ns[args.output] = frame
        if frame.empty:
            return Note("No requests recorded yet" + (" for that selection." if args.since or args.session
                                                      or args.model else ": the first `%%offgrid` cell makes one."))
        return summarize(frame, args.by or ["model", "session"])

    def _cmd_chat(self, args):
        from .widget import ChatPanel

        return ChatPanel(args.name, context=self.context,
                         max_tokens=args.max_tokens if args.max_tokens is not None else self.max_tokens,
                         temperature=args.temperature if args.temperature is not None else self.temperature,
                         rag=args.rag)

    def _cmd_connect(self, args) -> Note:
        client = self.context.connect(args.url, args.token)
        return Note(f"Connected: `%%offgrid` cells now use the model of the server at {client.base_url}.")

    def _cmd_engine(self, args) -> Note:
        if args.url == "local":
            self.context.use_engine(None)
            return Note("`%%offgrid` cells now use a GGUF loaded in this kernel.")
        engine = self.context.use_engine(args.url, model=args.model, api_key=args.api_key,
                                         max_concurrent=args.max_concurrent)
        desc = engine.describe()
        return Note(f"`%%offgrid` cells now generate on `{desc.get('name')}` at {desc.get('url')} "
                    f"(up to {desc.get('max_concurrent')} at once); sessions and statistics stay in this kernel's "
                    "store.")

    def _cmd_disconnect(self, args) -> Note:
        self.context.disconnect()
        return Note("Disconnected: `%%offgrid` cells use a model loaded in this kernel.")


_magics: OffgridMagics | None = None


def load(ipython: Any) -> None:
    """``%load_ext offgrid_jupyter``: register the magics (the engine and the model load on first use)."""
    global _magics
    unload(ipython)
    _magics = OffgridMagics(shell=ipython)
    ipython.register_magics(_magics)
    ipython.events.register("pre_run_cell", _magics.pre_run_cell)
    _magics.cells.install()
    set_loaded(_magics.context)


def unload(ipython: Any) -> None:
    global _magics
    if _magics is not None:
        _magics.context.close()
        _magics.cells.uninstall()
        try:
            ipython.events.unregister("pre_run_cell", _magics.pre_run_cell)
        except ValueError:
            pass
        _magics = None
        set_loaded(None)
