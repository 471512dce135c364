"""Retrieval's optional embeddings: a GGUF embedding model's vectors, fused with BM25.

Why this shape:

- BM25 (``rag.py``) needs no model and finds the chunks that share the question's words; an
  embedding model also finds the ones that say the same thing in other words. A collection
  learned with an embedding model (``%offgrid learn PATH --embedding-model GGUF``, or
  ``c.OffgridApp.embedding_model`` for the server) remembers it, and its searches fuse the two
  rankings by reciprocal rank fusion (each chunk scores ``sum(1 / (RRF_K + rank))``): no weights
  to tune, and neither ranking's scale matters.
- Vectors are float32 blobs in the store's own SQLite (``chunk_vectors``, deleted with their
  chunk), the layout sqlite-vec reads too. sqlite-vec itself is not used: it is a loadable
  extension, and Python builds without ``enable_load_extension`` (pyenv's default, these
  machines') cannot load it. A search multiplies the question's vector with the collection's
  matrix (numpy, read once per change of the collection and kept): exact, and a few ms at
  100,000 chunks.
- Chunks are embedded after they are stored, in batches, each batch its own transaction: a
  crash or a Ctrl-C mid-way leaves chunks without vectors, which the next ``learn`` embeds
  (it embeds every chunk of the collection that has none). Changing a collection's model
  drops its vectors and embeds everything again.
"""

from __future__ import annotations

import atexit
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import ModelError
from ..inference.llamacpp import Embedder
from ..inference.models import check_gguf
from ..inference.threads import available_cores
from . import Database



log = logging.getLogger(__name__)

RRF_K = 60  # the constant of Cormack et al.'s reciprocal rank fusion
CANDIDATES = 50  # from each ranking, before fusing
BATCH = 16  # chunks embedded per call and per transaction




# -- models ------------------------------------------------------------------------------------
_models: dict[str, Embedder] = {}
_models_lock = threading.Lock()


@atexit.register
def _close_models() -> None:  # before the interpreter takes llama-cpp-python's modules apart
    with _models_lock:
        for model in _models.values():
            model.close()
        _models.clear()


def embedder(path: str | Path) -> Embedder:
    """The embedding model at *path*, loaded once per process (checked first: a missing or
    non-GGUF file is a clear error before anything is learned)."""
    info = check_gguf(Path(path).expanduser())
    key = str(info.path)
    with _models_lock:
        if key not in _models:
            _models[key] = Embedder(key, n_threads=available_cores())
        return _models[key]


def model_path(given: str | Path) -> str:
    """How a collection records its model: the file's resolved path, checked."""
    return str(check_gguf(Path(given).expanduser()).path)


# -- writing -----------------------------------------------------------------------------------
def use_model(store: Database, collection: str, path: str) -> None:
    """Make *path* the collection's model; its vectors from another model are dropped."""

    def write(c: sqlite3.Connection) -> None:
        old = c.execute("SELECT embedding_model FROM collections WHERE name = ?", (collection,)).fetchone()[0]
        if old != path:
            c.execute("DELETE FROM chunk_vectors WHERE collection = ?", (collection,))
            c.execute("UPDATE collections SET embedding_model = ? WHERE name = ?", (path, collection))

    store.transaction(write)


def embed_missing(store: Database, collection: str, model: Embedder,
                  progress: Callable[[Iterable], Iterable] | None = None) -> int:
    """Embed every chunk of *collection* that has no vector; returns how many."""
    conn = store.connection()
    todo = conn.execute("SELECT k.id, k.heading, k.text FROM chunks k LEFT JOIN chunk_vectors v ON v.chunk_id = k.id "
                        "WHERE k.collection = ? AND v.chunk_id IS NULL ORDER BY k.id", (collection,)).fetchall()
    batches = [todo[i:i + BATCH] for i in range(0, len(todo), BATCH)]
    done = 0
    for batch in (progress(batches) if progress else batches):
        vectors = model.embed([f"{r['heading']}\n{r['text']}" if r["heading"] else r["text"] for r in batch])
        rows = [(r["id"], collection, v.tobytes()) for r, v in zip(batch, vectors)]
        # a chunk replaced meanwhile (another learn) is skipped, not given a stale vector
        store.transaction(lambda c: c.executemany(
            "INSERT OR IGNORE INTO chunk_vectors (chunk_id, collection, vector) "
            "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM chunks WHERE id = ?)",
            [(i, col, blob, i) for i, col, blob in rows]))
        done += len(batch)
    return done


# -- searching ---------------------------------------------------------------------------------
_matrices: dict[tuple[str, str], tuple[tuple, np.ndarray, np.ndarray]] = {}
_matrices_lock = threading.Lock()


def _matrix(store: Database, collection: str) -> tuple[np.ndarray, np.ndarray]:
    """The collection's chunk ids and vectors, read again only when they changed."""
    conn = store.connection()
    # (another model for the same chunks writes the same ids: its path is part of the version)
    version = tuple(conn.execute(
        "SELECT count(*), coalesce(max(chunk_id), 0), coalesce(min(chunk_id), 0), "
        "(SELECT embedding_model FROM collections WHERE name = ?) FROM chunk_vectors WHERE collection = ?",
        (collection, collection)).fetchone())
    key = (str(store.path), collection)
    with _matrices_lock:
        cached = _matrices.get(key)
        if cached is not None and cached[0] == version:
            return cached[1], cached[2]
    rows = conn.execute("SELECT chunk_id, vector FROM chunk_vectors WHERE collection = ? ORDER BY chunk_id",
                        (collection,)).fetchall()
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1) if rows \
        else np.zeros((0, 0), dtype=np.float32)
    with _matrices_lock:
        _matrices[key] = (version, ids, matrix)
    return ids, matrix


def nearest(store: Database, collection: str, vector: np.ndarray, n: int = CANDIDATES) -> list[int]:
    """The ids of the *n* chunks of *collection* whose vectors are closest to *vector* (cosine)."""
    ids, matrix = _matrix(store, collection)
    if not len(ids) or matrix.shape[1] != vector.shape[0]:
        return []
    sims = matrix @ vector
    n = min(n, len(ids))
    top = np.argpartition(-sims, n - 1)[:n]
    return [int(i) for i in ids[top[np.argsort(-sims[top])]]]


def fuse(*rankings: list[int]) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of rankings of chunk ids: (id, score), best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking, 1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def query_vector(path: str, question: str) -> np.ndarray | None:
    """The question's vector from the collection's model, or None (and a warning in the log)
    when that model can no longer be loaded: the search falls back to BM25 alone."""
    try:
        return embedder(path).embed([question])[0]
    except ModelError as exc:
        log.warning("offgrid: searching with BM25 alone: the collection's embedding model is unusable: %s", exc)
        return None
