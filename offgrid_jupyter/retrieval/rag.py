"""Retrieval: learn your files into the store, find the chunks that answer a question.

Why this shape:

- Offline with no extra model: BM25 through SQLite's FTS5 in the store's own database
  (``documents``, ``chunks`` and an external-content ``chunks_fts`` index kept in step by
  triggers), so learning and searching need nothing downloaded and every process that shares
  the store (kernels, the server) sees the same collections.
- Chunks follow the files' structure (``chunking.py``) and carry their path and line, cell or
  page range, so an answer can cite exactly where it read something.
- Learning is incremental: a file whose size and mtime are unchanged is skipped, then one whose
  sha256 is unchanged; a changed file's chunks are replaced in one transaction; files that are
  gone are dropped. A file that cannot be read is reported with its reason and the rest goes on.
- A server learns only paths inside its root directory (:func:`inside`): no ``..``, no
  absolute path elsewhere, no symlink out.
- A question becomes an FTS5 query of its words (each quoted, joined by OR, common words
  dropped), ranked by ``bm25()`` with a heading and the path weighed above the body.
- A collection learned with an embedding model also ranks by its vectors, and the two rankings
  are fused (``embeddings.py``); without one, nothing here needs a model.
"""

from __future__ import annotations

import os
import re
import sqlite3
import statistics
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import CollectionNotFoundError, InvalidRequestError, NothingLearnedError
from ..validation import check_name, check_text
from . import embeddings
from .chunking import Limits, Unreadable
from . import Database
from .paths import expand
from .paths import shown as shown_path
from .reader import Reader

MAX_K = 50
COMMON = 0.1  # a word in more than this share of the chunks is left out of a query (see Library._query)
DEFAULT_K = 5
STOP = set("""a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have having he her
here hers him his how i if in into is it its itself just me more most my no nor not now of off on once only or
other our out over own same she should so some such than that the their them then there these they this those
through to too under until up very was we were what when where which while who whom why will with would you your
yours please tell explain give show find""".split())
_latencies: deque[float] = deque(maxlen=2000)  # this process's searches, ms (the stats document's figures)
_latencies_lock = threading.Lock()


@dataclass
class Hit:
    path: str
    start: int
    end: int
    unit: str
    heading: str
    score: float
    chunk_id: int
    collection: str
    text: str

    def source(self) -> dict[str, Any]:
        """What a reply's metadata keeps of it (``metadata.sources``)."""
        return {"path": self.path, "start": self.start, "end": self.end, "unit": self.unit, "score": self.score,
                "chunk_id": self.chunk_id, "collection": self.collection}

    def label(self) -> str:
        where = {"line": "lines", "cell": "cell", "page": "page"}.get(self.unit, self.unit)
        span = str(self.start) if self.start == self.end else f"{self.start}-{self.end}"
        return f"{self.path}, {where} {span}"


@dataclass
class LearnReport:
    collection: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks: int = 0  # chunks written by this run
    embedded: int = 0  # chunks given a vector by this run (a collection with an embedding model)
    failed: list[dict[str, str]] = field(default_factory=list)  # [{path, reason}]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{self.added} added", f"{self.updated} updated", f"{self.unchanged} unchanged",
                 f"{self.removed} removed"]
        written = f"{self.chunks} chunks written" + (f", {self.embedded} embedded" if self.embedded else "")
        text = f"Collection `{self.collection}`: {', '.join(parts)} ({written}, {self.seconds:.1f} s)."
        if self.failed:
            text += f" {len(self.failed)} could not be read: " + "; ".join(
                f"`{f['path']}`: {f['reason']}" for f in self.failed[:10]) + ("…" if len(self.failed) > 10 else "")
        return text




















# -- the library ----------------------------------------------------------------------------------
class Library:
    """The store's collections of learned files (``store.library``)."""

    def __init__(self, store: "Database"):
        self.store = store

    def learn(self, paths: list[str], collection: str = "default", *, root: str | os.PathLike | None = None,
              progress: Callable[..., Iterable] | None = None,
              embedding_model: str | os.PathLike | None = None, limits: Limits | None = None) -> LearnReport:
        """Learn *paths* (files, folders, globs) into *collection*; see the module docstring.
        *root*: refuse paths outside it (a server's root directory). *progress* wraps the file
        loop and the embedding batches (e.g. ``tqdm.auto.tqdm``; called with ``desc``).
        *embedding_model*: a GGUF whose vectors the collection's searches fuse with BM25 from now
        on (``embeddings.py``); without it, the model the collection already has, if any.
        *limits*: what one file and one learn may take (:class:`~offgrid_jupyter.chunking.Limits`).

        Each file is read in a reader process (``reader.py``): one that cannot be read, or is past a
        limit, is one entry of ``failed`` with its reason, and the learn goes on. A collection is
        made only once a file is learned into it."""
        check_name(collection)
        if not isinstance(paths, list) or not paths:
            raise InvalidRequestError("Give at least one path to learn (a file, a folder or a glob).")
        limits = limits or Limits()
        model_file = embeddings.model_path(embedding_model) if embedding_model else None
        model = embeddings.embedder(model_file) if model_file else None  # a bad model fails before any work
        started = time.monotonic()
        root_path = Path(root).resolve() if root is not None else None
        files, failed = expand(paths, root_path, limits)
        report = LearnReport(collection, failed=failed)
        conn = self.store.connection()
        known = {r["path"]: r for r in conn.execute("SELECT * FROM documents WHERE collection = ?", (collection,))}
        seen = set()
        with Reader(limits) as reader:
            for f in (progress(files, desc=f"learning {collection}", unit="file") if progress else files):
                shown = shown_path(f, root_path)
                seen.add(shown)
                try:
                    self._learn_file(reader, f, shown, collection, known.get(shown), report)
                except (OSError, Unreadable) as exc:
                    reason = str(exc) if isinstance(exc, Unreadable) else (exc.strerror or type(exc).__name__)
                    if known.get(shown) is not None:  # what it said before is no longer what it says
                        self._forget_document(known[shown]["id"])
                        reason += "; its earlier chunks were removed"
                    report.failed.append({"path": shown, "reason": reason})
        gone = [r["id"] for p, r in known.items() if p not in seen and not Path(r["abspath"]).exists()]
        for doc_id in gone:
            self._forget_document(doc_id)
        report.removed = len(gone)

        def finish(c: sqlite3.Connection) -> None:
            c.execute("UPDATE collections SET last_learned_at = ? WHERE name = ?", (self.store.clock(), collection))
            if report.added or report.updated or report.removed or any("removed" in f["reason"] for f in report.failed):
                _count_terms(c)

        self.store.transaction(finish)
        if not self._exists(collection):  # nothing was learned into a collection that did not exist
            reasons = "; ".join(f"`{f['path']}`: {f['reason']}" for f in report.failed[:10])
            raise NothingLearnedError(f"Nothing was learned, so there is no collection {collection!r}: "
                                      f"{reasons or 'no file was found'}{'…' if len(report.failed) > 10 else ''}.")
        if model_file:
            embeddings.use_model(self.store, collection, model_file)
        else:
            model_file = self._model_of(collection)
            model = embeddings.embedder(model_file) if model_file else None
        if model is not None:
            report.embedded = embeddings.embed_missing(
                self.store, collection, model,
                progress and (lambda batches: progress(batches, desc=f"embedding {collection}", unit="batch")))
        report.seconds = round(time.monotonic() - started, 3)
        return report

    def _exists(self, collection: str) -> bool:
        return self.store.connection().execute("SELECT 1 FROM collections WHERE name = ?",
                                               (collection,)).fetchone() is not None

    def _forget_document(self, doc_id: int) -> None:
        self.store.transaction(lambda c: c.execute("DELETE FROM documents WHERE id = ?", (doc_id,)))

    def _model_of(self, collection: str) -> str | None:
        row = self.store.connection().execute("SELECT embedding_model FROM collections WHERE name = ?",
                                              (collection,)).fetchone()
        return row[0] if row else None

    def _learn_file(self, reader: Reader, f: Path, shown: str, collection: str, row: sqlite3.Row | None,
                    report: LearnReport) -> None:
        st = f.stat()
        if row is not None and row["size"] == st.st_size and row["mtime"] == st.st_mtime:
            report.unchanged += 1
            return
        kind, pieces, digest, st = reader.read(f)
        if row is not None and row["sha256"] == digest:  # touched, not changed
            self.store.transaction(lambda c: c.execute("UPDATE documents SET size = ?, mtime = ? WHERE id = ?",
                                                       (st.st_size, st.st_mtime, row["id"])))
            report.unchanged += 1
            return
        now = self.store.clock()

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO collections (name, created_at) VALUES (?, ?) ON CONFLICT(name) DO NOTHING",
                         (collection, now))
            conn.execute("DELETE FROM documents WHERE collection = ? AND path = ?", (collection, shown))
            doc = conn.execute(
                "INSERT INTO documents (collection, path, abspath, kind, size, mtime, sha256, learned_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (collection, shown, str(f.resolve()), kind, st.st_size, st.st_mtime, digest, now)).lastrowid
            conn.executemany(
                "INSERT INTO chunks (document_id, collection, path, start, end, unit, heading, text) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(doc, collection, shown, p.start, p.end, p.unit, p.heading, p.text) for p in pieces])

        self.store.transaction(write)
        report.chunks += len(pieces)
        if row is None:
            report.added += 1
        else:
            report.updated += 1

    def collections(self) -> list[dict[str, Any]]:
        """Every collection: documents, chunks, bytes of text, when it was last learned."""
        rows = self.store.connection().execute(
            "SELECT c.name, c.created_at, c.last_learned_at, c.embedding_model, "
            "(SELECT count(*) FROM chunk_vectors v WHERE v.collection = c.name) AS vectors, "
            "(SELECT count(*) FROM documents d WHERE d.collection = c.name) AS documents, "
            "(SELECT count(*) FROM chunks k WHERE k.collection = c.name) AS chunks, "
            "(SELECT coalesce(sum(d.size), 0) FROM documents d WHERE d.collection = c.name) AS bytes "
            "FROM collections c ORDER BY c.name").fetchall()
        return [dict(r) for r in rows]

    def documents(self, collection: str) -> list[dict[str, Any]]:
        self._need(collection)
        return [dict(r) for r in self.store.connection().execute(
            "SELECT path, kind, size, learned_at, (SELECT count(*) FROM chunks k WHERE k.document_id = d.id) AS "
            "chunks FROM documents d WHERE collection = ? ORDER BY path", (collection,))]

    def delete(self, collection: str) -> None:
        self._need(collection)

        def drop(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM collections WHERE name = ?", (collection,))
            _count_terms(c)

        self.store.transaction(drop)

    def _need(self, collection: str) -> None:
        if not isinstance(collection, str) or self.store.connection().execute(
                "SELECT 1 FROM collections WHERE name = ?", (collection,)).fetchone() is None:
            names = ", ".join(c["name"] for c in self.collections()) or "none yet"
            raise CollectionNotFoundError(f"No collection {str(collection)[:80]!r} (known: {names}). "
                                          "`%offgrid learn PATH --collection NAME` makes one.")

    def search(self, query: str, collection: str | None = None, k: int = DEFAULT_K) -> list[Hit]:
        """The *k* chunks that best match *query*, in *collection* or in all of them: BM25, fused
        with the nearest vectors when the collection has an embedding model (``embeddings.py``;
        a hit's score is then its fused score). A search of every collection is BM25's."""
        check_text(query, "The query")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise InvalidRequestError(f"k must be an integer from 1 to {MAX_K}, got {k!r}.")
        if collection is not None:
            self._need(collection)
        started = time.perf_counter()
        match = self._query(query)
        model_file = self._model_of(collection) if collection is not None else None
        vector = embeddings.query_vector(model_file, query) if model_file else None
        if vector is not None:
            hits = self._fused(match, vector, collection, k)
        elif not match:
            return []
        else:
            hits = self._bm25(match, collection, k)
        with _latencies_lock:
            _latencies.append((time.perf_counter() - started) * 1000)
        return hits

    def _fused(self, match: str, vector: Any, collection: str, k: int) -> list[Hit]:
        by_words = self._bm25(match, collection, embeddings.CANDIDATES) if match else []
        by_meaning = embeddings.nearest(self.store, collection, vector)
        best = embeddings.fuse([h.chunk_id for h in by_words], by_meaning)[:k]
        known = {h.chunk_id: h for h in by_words}
        missing = [i for i, _ in best if i not in known]
        if missing:
            rows = self.store.connection().execute(
                f"SELECT id, collection, path, start, end, unit, heading, text FROM chunks WHERE id IN "
                f"({','.join('?' * len(missing))})", missing).fetchall()
            known.update({r["id"]: _hit(r, 0.0) for r in rows})
        return [replace(known[i], score=round(score, 5)) for i, score in best if i in known]

    def _bm25(self, match: str, collection: str | None, k: int) -> list[Hit]:
        conn = self.store.connection()
        top = ("SELECT c.id, c.collection, c.path, c.start, c.end, c.unit, c.heading, c.text, f.rank FROM "
               "(SELECT rowid, rank FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY rank LIMIT ?) f "
               "JOIN chunks c ON c.id = f.rowid ORDER BY f.rank")
        # the index's own top results (FTS5 ranks without joining every match), then the collection's;
        # when other collections crowd it out of them, every match of this one is ranked instead
        rows = conn.execute(top, (match, k if collection is None else k * 20)).fetchall()
        if collection is not None:
            mine = [r for r in rows if r["collection"] == collection]
            if len(mine) < k and len(rows) == k * 20:
                mine = conn.execute(
                    "SELECT c.id, c.collection, c.path, c.start, c.end, c.unit, c.heading, c.text, chunks_fts.rank "
                    "FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid WHERE chunks_fts MATCH ? "
                    "AND c.collection = ? ORDER BY chunks_fts.rank LIMIT ?", (match, collection, k)).fetchall()
            rows = mine[:k]
        return [_hit(r, round(-r["rank"], 4)) for r in rows]

    def _query(self, text: str) -> str:
        """The question's words as an FTS5 query, without the words most chunks have: BM25 gives
        them almost no weight, yet matching them means scoring most of the index (100,000 chunks:
        tens of ms). The index's own tokenizer stems each word (a temporary FTS5 table), so the
        counts are looked up for exactly the terms the index holds."""
        words = query_words(text)
        if len(words) <= 2:
            return " OR ".join(f'"{w}"' for w in words)
        conn = self.store.connection()
        conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.offgrid_q USING fts5(w, tokenize='porter unicode61')")
        conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.offgrid_qi USING fts5vocab(temp, offgrid_q, 'instance')")
        conn.executemany("INSERT INTO temp.offgrid_q(rowid, w) VALUES (?, ?)", list(enumerate(words)))
        stems = dict(conn.execute("SELECT doc, term FROM temp.offgrid_qi").fetchall())
        conn.execute("DELETE FROM temp.offgrid_q")
        terms = sorted(set(stems.values()))
        counts = dict(conn.execute(f"SELECT term, df FROM term_df WHERE term IN ({','.join('?' * len(terms))})",
                                   terms).fetchall()) if terms else {}
        total = conn.execute("SELECT coalesce(max(id), 0) FROM chunks").fetchone()[0]  # (an upper bound)
        rare = [w for i, w in enumerate(words) if 0 < counts.get(stems.get(i), 0) <= COMMON * total]
        if not rare:  # every word is common: the rarest few still rank
            present = [(counts.get(stems.get(i), 0), w) for i, w in enumerate(words) if counts.get(stems.get(i))]
            rare = [w for _, w in sorted(present)[:2]]
        return " OR ".join(f'"{w}"' for w in rare)

    def _index_bytes(self, cols: list[dict[str, Any]]) -> int:
        """The chunks' bytes, measured again only when something was learned or deleted since."""
        key = (str(self.store.path), tuple((c["name"], c["chunks"], c["last_learned_at"]) for c in cols))
        if key not in _INDEX_BYTES:
            if len(_INDEX_BYTES) > 64:
                _INDEX_BYTES.clear()
            _INDEX_BYTES[key] = int(_index_bytes_of(self.store.connection()))
        return _INDEX_BYTES[key]

    def stats(self) -> dict[str, Any]:
        """The stats document's ``rag`` section."""
        cols = self.collections()
        index_bytes = self._index_bytes(cols) if cols else 0
        with _latencies_lock:
            times = sorted(_latencies)
        last = max((c["last_learned_at"] or 0 for c in cols), default=0) or None
        return {"enabled": bool(cols), "collections": len(cols), "documents": sum(c["documents"] for c in cols),
                "chunks": sum(c["chunks"] for c in cols), "vectors": sum(c["vectors"] for c in cols),
                "embedding_models": sorted({Path(c["embedding_model"]).name for c in cols if c["embedding_model"]}),
                "index_bytes": int(index_bytes), "last_learned_at": last,
                "retrieval": {"searches": len(times),
                              "p50_ms": round(statistics.median(times), 3) if times else None,
                              "p95_ms": round(times[int(0.95 * (len(times) - 1))], 3) if times else None}}


_INDEX_BYTES: dict[tuple, int] = {}  # (database, what was learned) -> bytes of the chunks' tables


def _index_bytes_of(conn: sqlite3.Connection) -> int:
    """Bytes of the chunks' tables and indexes: each b-tree's pages, asked of dbstat one b-tree at
    a time (``name = ?`` and ``aggregate``), so the rest of the file is never walked. A scan with
    ``name LIKE 'chunks%'`` walked every page of the database: 21.7 ms of the stats document's
    23.4 with 100,000 request rows and no collection at all."""
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'chunks%'")]
    try:
        return sum(conn.execute("SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name = ? AND aggregate = 1",
                                (name,)).fetchone()[0] for name in names)
    except sqlite3.DatabaseError:  # a build without the dbstat table: the text's size instead
        return conn.execute("SELECT coalesce(sum(length(text)), 0) FROM chunks").fetchone()[0]


def _hit(row: sqlite3.Row, score: float) -> Hit:
    return Hit(row["path"], row["start"], row["end"], row["unit"], row["heading"], score, row["id"],
               row["collection"], row["text"])


def _count_terms(conn: sqlite3.Connection) -> None:
    """Refresh every term's chunk count (one scan of the index, after the index changed)."""
    conn.execute("DELETE FROM term_df")
    conn.execute("INSERT INTO term_df SELECT term, doc FROM chunks_vocab")


def query_words(text: str) -> list[str]:
    """A question's words that can match: lower case, English stop words and single letters left
    out (numbers kept), each once."""
    words, seen = [], set()
    for w in re.findall(r"\w+", text.lower()):
        if (w in STOP or len(w) < 2) and not w.isdigit() or w in seen:
            continue
        seen.add(w)
        words.append(w)
    return words[:64]


def fts_query(text: str) -> str:
    """A question as an FTS5 query: its words, each quoted (nothing in them is FTS syntax),
    joined by OR (BM25 ranks chunks that have more of them first)."""
    return " OR ".join(f'"{w}"' for w in query_words(text))


# -- into a prompt ----------------------------------------------------------------------------------
def with_sources(question: str, hits: list[Hit], budget_chars: int) -> tuple[str, list[Hit]]:
    """The question as the model reads it: the excerpts, numbered, within *budget_chars*, then the
    question. Returns the text and the hits that made it in."""
    used, parts, size = [], [], 0
    for hit in hits:
        block = f"[{len(used) + 1}] {hit.label()}\n{hit.text}"
        if used and size + len(block) > budget_chars:
            break
        block = block[:budget_chars]  # a single excerpt longer than the budget is cut
        parts.append(block)
        size += len(block)
        used.append(hit)
    if not used:
        return question, []
    text = ("Answer the question using these excerpts from the user's files. Cite them as [1], [2]... "
            "If they do not contain the answer, say so.\n\n" + "\n\n".join(parts) + f"\n\nQuestion: {question}")
    return text, used


def sources_markdown(sources: list[dict[str, Any]]) -> str:
    """A reply's sources as Markdown links (relative paths open in JupyterLab)."""
    if not sources:
        return ""
    lines = []
    for n, s in enumerate(sources, start=1):
        where = {"line": "lines", "cell": "cell", "page": "page"}.get(s.get("unit", "line"), "lines")
        span = str(s["start"]) if s["start"] == s["end"] else f"{s['start']}-{s['end']}"
        target = s["path"].replace(" ", "%20").replace("(", "%28").replace(")", "%29")
        lines.append(f"[{n}] [{s['path']}]({target}) {where} {span}")
    return "**Sources**\n\n" + "  \n".join(lines)

