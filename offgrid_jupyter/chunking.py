"""Files cut into chunks that follow their structure, for retrieval (see rag.py).

A chunk is a piece of one file that can answer a question on its own and says where
it came from: a Markdown or reStructuredText section (under its heading path), a Python
function or class (``ast``, with its decorators), a block of other source or text, a
notebook cell (its source and its text outputs), a page of a PDF, the schema and first
rows of a table. Long pieces are split at blank lines, so a chunk stays around
:data:`TARGET` characters: small enough that several fit in a small model's context,
large enough to carry a complete thought.
"""

from __future__ import annotations

import ast
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

TARGET = 1200  # characters a chunk aims at
MAX = 2400  # a chunk is cut (at a line) past this

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


def chunk(path: Path, data: bytes) -> tuple[str, list[Chunk]]:
    """*data* (the bytes of *path*) as ``(kind, chunks)``; :class:`Unreadable` when it cannot be."""
    kind = kind_of(path) or "text"
    if kind == "pdf":
        return kind, _pdf(data)
    if kind == "table":
        return kind, [_table(path, data)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unreadable(f"not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise Unreadable("binary (it contains NUL bytes)")
    if kind == "notebook":
        return kind, _notebook(text)
    if kind == "markdown":
        return kind, _sections(text, _markdown_heading)
    if kind == "rst":
        return kind, _sections(text, _rst_heading)
    if path.suffix.lower() in (".py", ".pyi"):
        return kind, _python(text)
    return kind, _blocks(text.splitlines(), 1, "")


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
        buf.append(line)
        if line.strip():
            last = number
        size += len(line) + 1
        if (size >= TARGET and not line.strip()) or size >= MAX:
            flush(number)
    flush(first + len(lines) - 1)
    return out


_ATX = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _markdown_heading(lines: list[str], i: int) -> tuple[int, str] | None:
    m = _ATX.match(lines[i])
    return (len(m.group(1)), m.group(2)) if m else None


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
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
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
def _notebook(text: str) -> list[Chunk]:
    try:
        nb = json.loads(text)
        cells = nb["cells"]
    except (ValueError, KeyError, TypeError):
        raise Unreadable("not a notebook (no cells in its JSON)") from None
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
            out.append(Chunk(n, n, "cell", label, body[:MAX * 2].strip()))
    return out


def _joined(value) -> str:
    if isinstance(value, list):
        return "".join(v for v in value if isinstance(v, str))
    return value if isinstance(value, str) else ""


# -- tables and PDFs -----------------------------------------------------------------------------
def _table(path: Path, data: bytes) -> Chunk:
    """A table's shape, columns with their types, and its first rows: what a question about it needs."""
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            try:
                frame = pd.read_parquet(io.BytesIO(data))
            except ImportError:
                raise Unreadable("reading Parquet needs pyarrow: pip install 'offgrid-jupyter[rag]'") from None
            rows = len(frame)
        else:
            sep = "\t" if suffix == ".tsv" else ","
            frame = pd.read_csv(io.BytesIO(data), sep=sep, nrows=1000)
            rows = data.count(b"\n") - 1 if data.endswith(b"\n") else data.count(b"\n")
    except Unreadable:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas' parser errors say where
        raise Unreadable(f"not a readable table: {' '.join(str(exc).split())[:200]}") from None
    columns = "\n".join(f"- {c}: {t}" for c, t in frame.dtypes.astype(str).items())
    text = (f"Table {path.name}: {rows} rows, {len(frame.columns)} columns.\nColumns:\n{columns}\n"
            f"First rows:\n{frame.head(5).to_string(max_cols=20, max_colwidth=40)}")
    return Chunk(1, max(1, rows + 1), "line", "schema", text[:MAX * 2])


def _pdf(data: bytes) -> list[Chunk]:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise Unreadable("reading PDFs needs pypdf: pip install 'offgrid-jupyter[rag]'") from None
    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as exc:  # noqa: BLE001 - a broken PDF is one unreadable file, not a failure of all
        raise Unreadable(f"not a readable PDF: {' '.join(str(exc).split())[:200]}") from None
    out = []
    for n, page in enumerate(pages, start=1):
        for piece in _blocks(page.splitlines(), 1, f"page {n}"):
            out.append(Chunk(n, n, "page", f"page {n}", piece.text))
    return out
