"""What the model is shown of a kernel's variable: ``describe(obj, name=...)``.

One function for every surface: ``@df`` in a ``%%offgrid`` cell or the chat panel runs it in
the kernel, and the JupyterLab sidebar runs it in the notebook's kernel through a silent
``user_expressions`` call (``kernel_attach``), so a DataFrame reads the same wherever it was
attached. The description is Markdown, because that is how the model saw most tables.

Three promises, because the object is the user's and may be anything:

- **Bounded in size**: each description fits a token budget (``max_tokens``, default 400),
  counted by ``chat.attachments.estimate_tokens``: every digit and every punctuation mark counts
  as a token, as the small models' tokenizers split them, so a table of numbers is not undercounted.
- **Bounded in time**: nothing scans a large object. A DataFrame or an array over
  ``SAMPLE_ROWS`` rows is summarised from an evenly spaced sample of that many rows, and says
  so; a 1M-row x 20-column frame is described in about 20 ms (``bench/context.py``).
- **Never a failed cell**: a ``repr`` (or any attribute) that raises, or runs for more than
  ``SLOW_S``, gives a one-line stand-in; a name that looks like a credential (key, token,
  secret, password) has its value masked, whatever it holds.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import reprlib
import signal
import threading
import types
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ..chat.attachments import clip, estimate_tokens

DEFAULT_TOKENS = 400
SAMPLE_ROWS = 10_000  # rows a summary reads at most
HEAD_ROWS = 5
TABLE_COLUMNS = 8  # columns shown in the first-rows table (all are listed with their dtype)
CELL_CHARS = 24  # a value in that table
SLOW_S = 1.0  # a repr that takes longer is abandoned
CREDENTIAL = re.compile(r"key|token|secret|passw|pwd|credential|auth", re.I)
# An @mention: not after a word character, a dot or another @ (an e-mail address, a.b@c),
# an identifier with optional dotted attributes; a trailing dot is the sentence's.
MENTION = re.compile(r"(?<![\w.@])@([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
_FENCED = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


class Slow(Exception):
    """A repr or an attribute that took longer than SLOW_S."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Interrupt Python code that runs past *seconds* (SIGALRM: only on the main thread, where a
    cell, a comm message and a silent execute run; elsewhere the code simply runs)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise Slow()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _safely(make: Callable[[], str], what: str) -> str:
    try:
        with _time_limit(SLOW_S):
            return make()
    except Slow:
        return f"<{what}: describing it took over {SLOW_S:g} s>"
    except Exception as exc:  # noqa: BLE001 - the object's own code failed: a stand-in, never a failed cell
        return f"<{what}: describing it raised {type(exc).__name__}>"


def type_name(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if inspect.isroutine(obj):
        return "function"
    return type(obj).__name__


def looks_secret(name: str) -> bool:
    return bool(CREDENTIAL.search(name.rsplit(".", 1)[-1]))


def describe(obj: Any, name: str | None = None, *, max_tokens: int = DEFAULT_TOKENS) -> str:
    """A compact Markdown description of *obj* (called *name*) within *max_tokens*."""
    label = f"`{name}`" if name else "the value"
    kind = type_name(obj)
    if name and looks_secret(name):
        return f"{label}: {kind}, value hidden (its name looks like a credential)"
    text = _safely(lambda: "\n".join(_describe(obj, label, kind, max_tokens)), f"{label}: {kind}")
    return clip(text, max_tokens)


# -- by kind -------------------------------------------------------------------------------
def _describe(obj: Any, label: str, kind: str, budget: int) -> list[str]:
    module = type(obj).__module__.split(".")[0]
    if module == "pandas":
        cls = type(obj).__name__
        if cls == "DataFrame":
            return _frame(obj, label, budget)
        if cls == "Series":
            return _series(obj, label)
        if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # an Index, an ExtensionArray
            return [f"{label}: pandas {cls}, {len(obj):,} items, dtype {obj.dtype}",
                    f"first items: {_items(obj[:20].tolist())}"]
    if module == "numpy" and hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return _array(obj, label)
    if isinstance(obj, types.ModuleType):
        return _module(obj, label)
    if inspect.isclass(obj) or inspect.isroutine(obj):
        return _callable(obj, label, kind)
    if isinstance(obj, (str, bytes)):
        shown = _short_repr(obj, budget * 3)
        return [f"{label}: {kind}, {len(obj):,} characters" if isinstance(obj, str) else
                f"{label}: bytes, {len(obj):,} bytes", shown]
    if isinstance(obj, (bool, int, float, complex)) or obj is None:
        return [f"{label}: {kind} = {_short_repr(obj, 200)}"]
    if isinstance(obj, dict):
        first = [f"- {_short_repr(k, 60)}: {_short_repr(v, 120)}" for k, v in _first(obj.items(), 20)]
        return [f"{label}: {kind} with {len(obj):,} keys", *first] + (["- …"] if len(obj) > 20 else [])
    if isinstance(obj, (list, tuple, set, frozenset)):
        kinds = sorted({type(x).__name__ for x in _first(obj, 100)})
        return [f"{label}: {kind} of {len(obj):,} items ({', '.join(kinds[:5]) or 'empty'})",
                f"first items: {_items(list(_first(obj, 20)))}"]
    shape = getattr(obj, "shape", None)
    head = f"{label}: {kind}" + (f", shape {tuple(shape)}" if isinstance(shape, tuple) else "")
    return [head, _short_repr(obj, budget * 3)]


def _first(items: Any, n: int) -> Iterator[Any]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 200, 200, 20, 20, 3


def _short_repr(obj: Any, chars: int) -> str:
    """A repr that is bounded while it is made (reprlib, for the built-in containers) and after."""
    text = _repr.repr(obj) if isinstance(obj, (list, tuple, dict, set, frozenset)) else repr(obj)
    return text if len(text) <= chars else text[:chars] + f"… ({len(text):,} characters)"


def _items(values: list[Any]) -> str:
    return "[" + ", ".join(_short_repr(v, 40) for v in values) + "]"


def _num(value: Any) -> str:
    """A number as a person reads it in a summary: 4 significant digits."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return _cell(value)
    if math.isnan(f):
        return "NaN"
    if f.is_integer() and abs(f) < 1e15:
        return f"{int(f):,}"
    return f"{f:.4g}"


def _cell(value: Any) -> str:
    text = str(value).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _sample(frame: Any) -> tuple[Any, bool]:
    """*frame* itself, or an evenly spaced sample of SAMPLE_ROWS rows (no full scan)."""
    n = len(frame)
    if n <= SAMPLE_ROWS:
        return frame, False
    step = n // SAMPLE_ROWS
    return frame.iloc[::step][:SAMPLE_ROWS], True


def _frame(df: Any, label: str, budget: int) -> list[str]:
    """Shape, columns (dtype, nulls), the first rows, a numeric summary: the columns and the
    first rows each get at most a third of *budget*, so a wide frame still shows its values."""
    rows, cols = df.shape
    sample, sampled = _sample(df)
    of = f" (in an evenly spaced sample of {len(sample):,} rows)" if sampled else ""
    counted = f" (counted in an evenly spaced sample of {len(sample):,} rows)" if sampled else ""
    nulls = sample.isna().sum()
    dtypes = df.dtypes
    nulls_of = {str(col): int(nulls.iloc[i]) for i, col in enumerate(df.columns) if nulls.iloc[i]}
    if cols <= 12:  # one line each (by position: column names may repeat)
        listing = [f"- {_cell(col)}: {dtypes.iloc[i]}, {int(nulls.iloc[i]):,} null{'s' * (int(nulls.iloc[i]) != 1)}"
                   for i, col in enumerate(df.columns)]
        title = f"Columns (dtype, nulls{counted}):"
    else:  # grouped by dtype, so a wide frame's names fit
        groups: dict[str, list[str]] = {}
        for i, col in enumerate(df.columns):
            groups.setdefault(str(dtypes.iloc[i]), []).append(_cell(col))
        listing = ["- nulls: " + (", ".join(f"{_cell(c)} {n:,}" for c, n in list(nulls_of.items())[:20])
                                  if nulls_of else "none") + counted]
        for dtype, names in sorted(groups.items(), key=lambda g: len(g[1])):  # the longest list last: cut first
            listing.append(f"- {dtype} ({len(names):,}): {', '.join(names[:100])}" + (" …" if len(names) > 100 else ""))
        title = "Columns by dtype:"
    header = [f"{label}: pandas DataFrame, {rows:,} rows × {cols:,} columns", title]
    third = max(40, budget // 3)
    lines = [*header, clip("\n".join(listing), max(40, budget // 4))]
    table, n_rows, n_cols = _head_table(df, third)
    more = f" (first {n_cols} columns)" if cols > n_cols else ""
    lines += ["", f"First {n_rows} rows{more}:" if n_rows != 1 else f"First row{more}:", *table]
    numeric = sample.select_dtypes("number")
    if numeric.shape[1]:
        stats = numeric.iloc[:, :TABLE_COLUMNS * 2].agg(["mean", "std", "min", "max"]).T
        title = f"Numeric summary{of}:"
        room = budget - estimate_tokens("\n".join(lines)) - estimate_tokens(title) - 20
        table = _table(["column", "mean", "std", "min", "max"],
                       [[_cell(c), *(_num(v) for v in r)] for c, r in zip(stats.index, stats.itertuples(False))])
        kept = 2
        while kept < len(table) and estimate_tokens("\n".join(table[:kept + 1])) <= room:
            kept += 1
        if kept > 2:
            cut = numeric.shape[1] - (kept - 2)
            lines += ["", title, *table[:kept], *([f"(… {cut} more numeric columns)"] if cut else [])]
    return lines


def _head_table(df: Any, budget: int) -> tuple[list[str], int, int]:
    """The first rows as a Markdown table within *budget*: fewer rows and columns, in that
    order of shapes, until it fits (a row cut in half would mislead more than a smaller table)."""
    table: list[str] = []
    for n_rows, n_cols in ((HEAD_ROWS, TABLE_COLUMNS), (3, TABLE_COLUMNS), (3, 6), (3, 4), (2, 4), (2, 3),
                           (1, 3), (1, 2), (1, 1)):
        head = df.iloc[:n_rows, :n_cols]
        table = _table(["", *map(_cell, head.columns)],
                       [[_cell(i), *(_num(v) if _is_number(v) else _cell(v) for v in row)]
                        for i, row in zip(head.index, head.itertuples(index=False, name=None))])
        if estimate_tokens("\n".join(table)) <= budget:
            return table, len(head), head.shape[1]
    return table[:2], 0, min(df.shape[1], 1)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'s' * (n != 1)}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or type(value).__module__ == "numpy" \
        and getattr(value, "dtype", None) is not None and value.dtype.kind in "iuf"


def _series(s: Any, label: str) -> list[str]:
    sample, sampled = _sample(s)
    of = f" (in a sample of {len(sample):,})" if sampled else ""
    lines = [f"{label}: pandas Series{f' {s.name!r}' if s.name is not None else ''}, {len(s):,} values, "
             f"dtype {s.dtype}, {_plural(int(sample.isna().sum()), 'null')}{of}",
             f"first values: {_items(s.iloc[:10].tolist())}"]
    if s.dtype.kind in "iuf" and len(sample):
        lines.append(f"mean {_num(sample.mean())}, std {_num(sample.std())}, min {_num(sample.min())}, "
                     f"max {_num(sample.max())}{of}")
    return lines


def _array(a: Any, label: str) -> list[str]:
    lines = [f"{label}: numpy array, shape {tuple(a.shape)}, dtype {a.dtype}"]
    flat = a.reshape(-1) if a.flags.c_contiguous or a.size <= SAMPLE_ROWS else a.ravel()
    sampled = flat.size > SAMPLE_ROWS * 10
    part = flat[:: max(1, flat.size // (SAMPLE_ROWS * 10))] if sampled else flat
    if a.dtype.kind in "iuf" and part.size:
        import numpy as np
        of = f" (in a sample of {part.size:,})" if sampled else ""
        lines.append(f"min {_num(np.nanmin(part))}, max {_num(np.nanmax(part))}, mean {_num(np.nanmean(part))}{of}")
    lines.append(f"first values: {_items(flat[:10].tolist())}")
    return lines


def _module(m: types.ModuleType, label: str) -> list[str]:
    doc = (inspect.getdoc(m) or "").strip().split("\n\n")[0]
    public = [n for n in dir(m) if not n.startswith("_")]
    return [f"{label}: module {m.__name__}" + (f" {m.__version__}" if isinstance(getattr(m, "__version__", None),
                                                                           str) else ""),
            *([doc] if doc else []), f"{len(public)} public names: {', '.join(public[:30])}" +
            (" …" if len(public) > 30 else "")]


def _callable(obj: Any, label: str, kind: str) -> list[str]:
    try:
        signature = str(inspect.signature(obj))
    except (TypeError, ValueError):
        signature = "(…)"
    doc = inspect.getdoc(obj) or ""
    lines = [f"{label}: {kind} {getattr(obj, '__qualname__', label)}{signature}"]
    if doc:
        lines.append(doc)
    if inspect.isclass(obj):
        methods = [n for n, v in vars(obj).items() if callable(v) and not n.startswith("_")]
        if methods:
            lines.append(f"methods: {', '.join(methods[:30])}")
    return lines


# -- @mentions -----------------------------------------------------------------------------------
def resolve(path: str, namespace: dict[str, Any]) -> tuple[bool, Any]:
    """``name`` or ``name.attr.attr`` in *namespace*, without running code that is not ours to run:
    attributes are read statically (no property, no ``__getattr__``), except a module's and a
    DataFrame's columns (``df.sales``). (False, None) when it is not there."""
    first, *rest = path.split(".")
    if first not in namespace:
        return False, None
    obj = namespace[first]
    for attr in rest:
        try:
            value = inspect.getattr_static(obj, attr)
        except AttributeError:
            columns = getattr(obj, "columns", None) if type(obj).__name__ == "DataFrame" else None
            if columns is not None and attr in columns:
                obj = obj[attr]
                continue
            return False, None
        if isinstance(obj, types.ModuleType) or inspect.isroutine(value) or isinstance(
                value, (staticmethod, classmethod, types.MemberDescriptorType, types.GetSetDescriptorType)):
            obj = getattr(obj, attr)  # a module's name, a method, a slot or a C-level attribute: nothing runs
        elif hasattr(type(value), "__get__") and not inspect.isclass(value):
            return False, None  # a property or another descriptor: its code would run
        else:
            obj = value
    return True, obj


def mentions(text: str, namespace: dict[str, Any]) -> list[str]:
    """The ``@name``s in *text* that are variables of *namespace*, in order, once each. Text
    inside fenced code blocks and decorator lines (``@name`` alone on a line above a ``def``,
    a ``class`` or another decorator) is code, not a mention."""
    prose = _FENCED.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    lines = prose.split("\n")
    found: list[str] = []
    for i, line in enumerate(lines):
        if re.fullmatch(r"\s*@[\w.]+(\(.*\))?\s*", line):
            following = next((ln for ln in lines[i + 1:] if ln.strip()), "")
            if re.match(r"\s*(@|def |async def |class )", following):
                continue
        for match in MENTION.finditer(line):
            path = match.group(1)
            while path and not resolve(path, namespace)[0] and "." in path:
                path = path.rsplit(".", 1)[0]  # @df.columns.values -> as far as it resolves
            if path and resolve(path, namespace)[0] and path not in found:
                found.append(path)
    return found


def attachment(name: str, obj: Any, *, max_tokens: int = DEFAULT_TOKENS) -> dict[str, Any]:
    """The ``metadata.context`` item for the variable *name*."""
    text = describe(obj, name, max_tokens=max_tokens)
    return {"kind": "variable", "name": name, "type": type_name(obj), "text": text,
            "tokens": estimate_tokens(text)}


# -- for the sidebar (called in the notebook's kernel with user_expressions) ----------------------
class RawJSON:
    """A value whose text/plain is exactly its text, so a ``user_expressions`` reply carries our
    JSON as it is (a string's would be its Python repr, quotes and escapes included)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text)


def _user_ns() -> dict[str, Any]:
    from IPython import get_ipython

    shell = get_ipython()
    return shell.user_ns if shell is not None else {}


def _hidden() -> set[str]:
    from IPython import get_ipython

    shell = get_ipython()
    return set(shell.user_ns_hidden) if shell is not None else set()


def kernel_variables(limit: int = 500) -> RawJSON:
    """The kernel's variables as JSON ``[{name, type}]`` (what the sidebar's ``@`` list shows):
    what a user would call their data: no modules, no ``_names``, nothing IPython keeps."""
    hidden = _hidden()
    out = []
    for name, value in list(_user_ns().items()):
        if name.startswith("_") or name in hidden or isinstance(value, types.ModuleType):
            continue
        out.append({"name": name, "type": type_name(value)})
        if len(out) >= limit:
            break
    return RawJSON(json.dumps(out))


def kernel_attach(names: list[str], text: str = "") -> RawJSON:
    """The attachments for *names* (the sidebar's chips) and for the ``@name``s of *text* (the
    message, read as the magic reads a cell), those that are variables of the kernel, as JSON,
    each within the kernel's ``c.OffgridMagics.attach_tokens`` (the magic's budget)."""
    from IPython import get_ipython

    shell = get_ipython()
    magics = shell.magics_manager.registry.get("OffgridMagics") if shell is not None else None
    budget = getattr(magics, "attach_tokens", DEFAULT_TOKENS)
    ns = _user_ns()
    wanted = [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    wanted += [n for n in (mentions(text, ns) if isinstance(text, str) else []) if n not in wanted]
    out = []
    for name in wanted[:32]:
        ok, obj = resolve(name, ns) if isinstance(name, str) else (False, None)
        if ok:
            out.append(attachment(name, obj, max_tokens=budget))
    return RawJSON(json.dumps(out))
