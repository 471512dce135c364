"""Files cut into chunks that follow their structure, for retrieval (see rag.py).

A chunk is a piece of one file that can answer a question on its own and says where
it came from: a Markdown or reStructuredText section (under its heading path), a Python
function or class (``ast``, with its decorators), a block of other source or text, a
notebook cell (its source and its text outputs), a page of a PDF, the schema and first
rows of a table. Long pieces are split at blank lines, so a chunk stays around
:data:`TARGET` characters: small enough that several fit in a small model's context,
large enough to carry a complete thought.

Every file comes from outside, so everything here is bounded whatever its shape:

- no chunk is longer than :data:`MAX` characters (a 15 MB file of one line is cut, not kept
  as one 15 MB chunk that every search would then return);
- parsing is linear in the file: headings are found without a backtracking regular expression
  (``#`` and 1,600 spaces stalled a server for 5 s), Python that is too deep for ``ast`` (200,000
  ``1+1+…`` terms) and JSON too deep for ``json`` become plain text or a clear reason;
- a table gives its schema and first rows, read in one small batch (a 456 KB Parquet file of 100
  million zeros is never expanded); :class:`Limits` bound the columns, rows, pages and text taken
  from one file, and a file past them is refused with the limit in its reason.

``retrieval/reader.py`` runs this in a process of its own, so a file that still finds a way to
exhaust memory or time fails alone.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError

TARGET = 1200  # characters a chunk aims at
MAX = 2400  # a chunk is cut (at a line, else within it) past this: no chunk is longer
AST_MAX_BYTES = 2 << 20  # Python longer than this is cut into blocks without parsing it


@dataclass
class Limits:
    """What one learned file may hold (``c.OffgridApp.learn_limits``, ``c.OffgridMagics.learn_limits``)."""

    max_file_mb: float = 20.0  # bytes read from one file
    max_text_mb: float = 20.0  # text taken from one file once decoded (a PDF's pages, a notebook's cells)
    max_columns: int = 1000  # a table's columns
    max_rows: int = 10_000_000  # a table's rows (counted, never all read: its first rows are taken)
    max_pages: int = 2000  # a PDF's pages
    max_cells: int = 10_000  # a notebook's cells
    max_files: int = 10_000  # files one learn takes
    max_entries: int = 200_000  # folder entries one learn may look at (a walk through links has an end)
    seconds_per_file: float = 60.0  # reading and chunking one file
    memory_mb: int = 1024  # the reader process's address space

    @classmethod
    def from_config(cls, values: dict[str, Any] | None) -> "Limits":
        """*values* (a config mapping) as Limits, each checked: a 400 naming the key otherwise."""
        known = {f.name: f.type for f in fields(cls)}
        out = cls()
        for key, value in (values or {}).items():
            if key not in known:
                raise InvalidRequestError(f"learn_limits has no {key!r}: use {', '.join(known)}.")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1e12:
                raise InvalidRequestError(f"learn_limits {key} must be a positive number, got {value!r}.")
            setattr(out, key, type(getattr(out, key))(value))
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

MARKDOWN = {".md", ".markdown", ".mdx"}
RST = {".rst"}
TEXT = {".txt", ".text", ".log", ".tex", ".org", ".adoc"}
SOURCE = {".py", ".pyi", ".r", ".jl", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".sql", ".sh", ".bash", ".c", ".h",
          ".cc", ".cpp", ".hpp", ".java", ".go", ".rs", ".rb", ".scala", ".kt", ".swift", ".m", ".toml", ".yaml",
          ".yml", ".ini", ".cfg", ".json", ".css", ".html", ".xml"}
TABLES = {".csv", ".tsv", ".parquet"}
KNOWN = MARKDOWN | RST | TEXT | SOURCE | TABLES | {".ipynb", ".pdf"}


@dataclass
class Chunk:
    start: int  # first line (or cell, or page), 1-based
    end: int  # last one, inclusive
    unit: str  # "line" | "cell" | "page"
    heading: str  # where in the file: "Install > Linux", "def fit", "cell 3", ...
    text: str


class Unreadable(Exception):
    """A file that cannot be learned; the message says why (and what would help)."""


def kind_of(path: Path) -> str | None:
    """The file's kind by its suffix, or None for one we do not learn."""
    suffix = path.suffix.lower()
    for kind, suffixes in (("markdown", MARKDOWN), ("rst", RST), ("text", TEXT), ("source", SOURCE),
                           ("table", TABLES)):
        if suffix in suffixes:
            return kind
    return {"": None, ".ipynb": "notebook", ".pdf": "pdf"}.get(suffix)


def chunk(path: Path, data: bytes, limits: Limits | None = None) -> tuple[str, list[Chunk]]:
    """*data* (the bytes of *path*) as ``(kind, chunks)``; :class:`Unreadable` when it cannot be.
    Every chunk is at most :data:`MAX` characters."""
    limits = limits or Limits()
    kind = kind_of(path) or "text"
    if kind == "pdf":
        return kind, _bounded(_pdf(data, limits))
    if kind == "table":
        return kind, _bounded([_table(path, data, limits)])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unreadable(f"not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise Unreadable("binary (it contains NUL bytes)")
    if kind == "notebook":
        return kind, _bounded(_notebook(text, limits))
    if kind == "markdown":
        return kind, _bounded(_sections(text, _markdown_heading))
    if kind == "rst":
        return kind, _bounded(_sections(text, _rst_heading))
    if path.suffix.lower() in (".py", ".pyi"):
        return kind, _bounded(_python(text))
    return kind, _bounded(_blocks(text.splitlines(), 1, ""))


def _bounded(chunks: list[Chunk]) -> list[Chunk]:
    """Every chunk at most MAX characters: a longer one (a single long line, a huge cell) is cut
    into pieces that keep its place and heading."""
    out = []
    for c in chunks:
        if len(c.text) <= MAX:
            out.append(c)
            continue
        out += [Chunk(c.start, c.end, c.unit, c.heading, c.text[i:i + MAX]) for i in range(0, len(c.text), MAX)]
    return out


# -- text ----------------------------------------------------------------------------------------
def _blocks(lines: list[str], first: int, heading: str) -> list[Chunk]:
    """Lines (the first is line *first*) cut at blank lines into chunks of about TARGET characters."""
    out: list[Chunk] = []
    start, size, buf, last = first, 0, [], first

    def flush(end: int) -> None:
        nonlocal start, size, buf
        body = "\n".join(buf).strip()
        if body:
            out.append(Chunk(start, last, "line", heading, body))  # up to its last line with text
        start, size, buf = end + 1, 0, []

    for i, line in enumerate(lines):
        number = first + i
        if not buf and not line.strip():
            start = number + 1
            continue
        if len(line) > MAX:  # a line longer than a chunk (minified JSON, one-line files) is cut within
            if buf:
                flush(number - 1)
            cut = len(line) - len(line) % MAX or len(line) - MAX
            out += [Chunk(number, number, "line", heading, line[k:k + MAX]) for k in range(0, cut, MAX)]
            line, start = line[cut:], number
        buf.append(line)
        if line.strip():
            last = number
        size += len(line) + 1
        if (size >= TARGET and not line.strip()) or size >= MAX:
            flush(number)
    flush(first + len(lines) - 1)
    return out


def _markdown_heading(lines: list[str], i: int) -> tuple[int, str] | None:
    """An ATX heading (``## Title ##``) as (level, title), in one pass over the line: the regular
    expression this replaces backtracked cubically on ``#`` followed by many spaces."""
    line = lines[i]
    level = len(line) - len(line.lstrip("#"))
    if not 1 <= level <= 6 or len(line) == level or not line[level].isspace():
        return None
    title = line[level:].strip()
    closing = title.rstrip("#")  # a closing run of #s, when a space stands before it
    if closing != title and (not closing or closing[-1].isspace()):
        title = closing.rstrip()
    return level, title


_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")
_RST_LEVELS = "=-~^\"'`#*+"


def _rst_heading(lines: list[str], i: int) -> tuple[int, str] | None:
    if i + 1 < len(lines) and lines[i].strip() and _RST_UNDERLINE.match(lines[i + 1]) \
            and len(lines[i + 1].rstrip()) >= len(lines[i].rstrip()):
        return _RST_LEVELS.index(lines[i + 1][0]) + 1, lines[i].strip()
    return None


def _sections(text: str, heading_at) -> list[Chunk]:
    """A document cut at its headings; each section knows its heading path ("A > B")."""
    lines = text.splitlines()
    out: list[Chunk] = []
    path: list[tuple[int, str]] = []
    start, in_fence = 0, False
    for i in range(len(lines) + 1):
        if i < len(lines) and lines[i].lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        found = heading_at(lines, i) if i < len(lines) and not in_fence else None
        if found is None and i < len(lines):
            continue
        if i > start:
            out += _blocks(lines[start:i], start + 1, " > ".join(t for _, t in path))
        if found is not None:
            level, title = found
            path = [(lv, t) for lv, t in path if lv < level] + [(level, title)]
            start = i
    return out


# -- Python ------------------------------------------------------------------------------------------
def _python(text: str) -> list[Chunk]:
    """Top-level functions and classes (with their decorators) one chunk each; the rest in blocks."""
    lines = text.splitlines()
    if len(text) > AST_MAX_BYTES:
        return _blocks(lines, 1, "")
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # too deep for the parser: plain text
        return _blocks(lines, 1, "")
    out: list[Chunk] = []
    covered = 0  # lines before this one are in a chunk
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if first - 1 > covered:
            out += _blocks(lines[covered:first - 1], covered + 1, "module")
        kind = "class" if isinstance(node, ast.ClassDef) else "def"
        body = lines[first - 1:node.end_lineno]
        pieces = _blocks(body, first, f"{kind} {node.name}") if sum(map(len, body)) > MAX else [
            Chunk(first, node.end_lineno, "line", f"{kind} {node.name}", "\n".join(body))]
        out += pieces
        covered = node.end_lineno
    if covered < len(lines):
        out += _blocks(lines[covered:], covered + 1, "module")
    return out


# -- notebooks ---------------------------------------------------------------------------------------
def _notebook(text: str, limits: Limits) -> list[Chunk]:
    try:
        nb = json.loads(text)
        cells = nb["cells"]
    except RecursionError:
        raise Unreadable("its JSON is nested too deeply to read") from None
    except (ValueError, KeyError, TypeError):
        raise Unreadable("not a notebook (no cells in its JSON)") from None
    if isinstance(cells, list) and len(cells) > limits.max_cells:
        raise Unreadable(f"{len(cells):,} cells; at most {limits.max_cells:,} are learned (learn_limits max_cells)")
    out: list[Chunk] = []
    for n, cell in enumerate(cells if isinstance(cells, list) else [], start=1):
        if not isinstance(cell, dict):
            continue
        source = _joined(cell.get("source"))
        outputs = []
        for o in cell.get("outputs") or []:
            if not isinstance(o, dict):
                continue
            if o.get("output_type") == "stream":
                outputs.append(_joined(o.get("text")))
            elif isinstance(o.get("data"), dict):
                outputs.append(_joined(o["data"].get("text/plain")))
        body = source + ("\n\n# output:\n" + "\n".join(filter(None, outputs)) if any(outputs) else "")
        if body.strip():
            label = f"cell {n} ({cell.get('cell_type', 'code')})"
            out.append(Chunk(n, n, "cell", label, body.strip()))
    return out


def _joined(value) -> str:
    if isinstance(value, list):
        return "".join(v for v in value if isinstance(v, str))
    return value if isinstance(value, str) else ""


def _text_mb(text: str) -> float:
    return len(text) / (1 << 20)


# -- tables and PDFs -----------------------------------------------------------------------------
def _table(path: Path, data: bytes, limits: Limits) -> Chunk:
    """A table's shape, columns with their types, and its first rows: what a question about it needs.
    Only the header and a few rows are parsed (a Parquet file's metadata gives its shape), so the
    table's size costs nothing; more columns than ``max_columns`` is refused."""
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            frame, rows, columns = _parquet_head(data, limits)
        else:
            sep = "\t" if suffix == ".tsv" else ","
            first = data.split(b"\n", 1)[0][: 4 << 20].decode("utf-8", errors="replace")
            columns = len(next(csv.reader([first], delimiter=sep), []))
            if columns > limits.max_columns:
                raise Unreadable(f"{columns:,} columns; at most {limits.max_columns:,} are learned "
                                 "(learn_limits max_columns)")
            rows = data.count(b"\n") - 1 if data.endswith(b"\n") else data.count(b"\n")
            if rows > limits.max_rows:
                raise Unreadable(f"{rows:,} rows; at most {limits.max_rows:,} (learn_limits max_rows)")
            frame = pd.read_csv(io.BytesIO(data), sep=sep, nrows=20)
    except Unreadable:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas' parser errors say where
        raise Unreadable(f"not a readable table: {' '.join(str(exc).split())[:200]}") from None
    shown = ", ".join(f"{c}: {t}" for c, t in list(frame.dtypes.astype(str).items())[:50])
    more = f" (and {columns - 50} more)" if columns > 50 else ""
    text = (f"Table {path.name}: {rows} rows, {columns} columns.\nColumns: {shown}{more}\n"
            f"First rows:\n{frame.head(5).to_string(max_cols=20, max_colwidth=40)}")
    return Chunk(1, max(1, rows + 1), "line", "schema", text[:MAX])


def _parquet_head(data: bytes, limits: Limits):
    """(the first rows as a frame, rows, columns) from the file's metadata and one small batch."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise Unreadable("reading Parquet needs pyarrow: pip install 'offgrid-jupyter[rag]'") from None
    pf = pq.ParquetFile(io.BytesIO(data))
    rows, columns = pf.metadata.num_rows, pf.metadata.num_columns
    if columns > limits.max_columns:
        raise Unreadable(f"{columns:,} columns; at most {limits.max_columns:,} are learned (learn_limits max_columns)")
    if rows > limits.max_rows:
        raise Unreadable(f"{rows:,} rows; at most {limits.max_rows:,} (learn_limits max_rows)")
    batch = next(pf.iter_batches(batch_size=5), None)
    frame = batch.to_pandas() if batch is not None else pf.schema_arrow.empty_table().to_pandas()
    return frame, rows, columns


def _pdf(data: bytes, limits: Limits) -> list[Chunk]:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise Unreadable("reading PDFs needs pypdf: pip install 'offgrid-jupyter[rag]'") from None
    pages: list[str] = []
    try:
        reader = PdfReader(io.BytesIO(data))
        if len(reader.pages) > limits.max_pages:
            raise Unreadable(f"{len(reader.pages):,} pages; at most {limits.max_pages:,} are learned "
                             "(learn_limits max_pages)")
        size = 0.0
        for page in reader.pages:
            pages.append(page.extract_text() or "")
            size += _text_mb(pages[-1])
            if size > limits.max_text_mb:
                raise Unreadable(f"more than {limits.max_text_mb:g} MB of text (learn_limits max_text_mb)")
    except Unreadable:
        raise
    except MemoryError:
        raise Unreadable("its pages expand to more than the reader's memory (a compressed bomb?)") from None
    except Exception as exc:  # noqa: BLE001 - a broken PDF is one unreadable file, not a failure of all
        raise Unreadable(f"not a readable PDF: {' '.join(str(exc).split())[:200]}") from None
    out = []
    for n, page in enumerate(pages, start=1):
        for piece in _blocks(page.splitlines(), 1, f"page {n}"):
            out.append(Chunk(n, n, "page", f"page {n}", piece.text))
    return out
