"""Session KV snapshots on disk, so a long conversation survives a restart of the server or kernel.

Why: a session's KV cells live in the engine's memory (in its sequence, or in the snapshot LRU of
``batching.py``), so after a restart the first turn of a long conversation re-reads all of it:
2,000 tokens of history are ~6 s on 2 cores before the first token. Loading its cells back from
a file takes milliseconds (``bench/engine.py``: ``restart_followup_speedup``).

What is kept, under ``<data dir>/kv/``, one file per session (``<digest of the session id>.kv``):
the session id, the model's fingerprint, the tokens the cells hold and the cells
(``llama_state_seq_get_data``), then a digest of all of it. Files are written by one writer thread
(the engine thread only copies the cells out, when it is idle), to a temporary name and renamed,
so a file is whole or absent; a reader still checks everything, and a file that is cut, corrupt,
of another model or another session is ignored and removed, never an error in a turn. The
directory is bounded (``kv_disk_bytes``, 2 GB by default): past it, the least recently used files
go. A deleted session's file goes with it (:func:`forget`).

The model's fingerprint is a digest of its size and its first and last 16 MB, not of the whole
file: hashing an 8 GB GGUF would take seconds at every start, and two different models never share
both their header (architecture, tokenizer, tensor layout) and their last tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DIRNAME = "kv"  # under the data directory
MAGIC = b"OGKV\x01"
SUFFIX = ".kv"
DIGEST = 16  # bytes of blake2b at the end of a file
FINGERPRINT_SPAN = 16 << 20  # bytes hashed at each end of a model file
STALE_TEMP = 600.0  # seconds after which a temporary file nobody renamed is a crash's leftover


def fingerprint(path: str | os.PathLike) -> str:
    """The model file's identity (size, first and last 16 MB)."""
    h = hashlib.blake2b(digest_size=16)
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_SPAN))
        if size > FINGERPRINT_SPAN:
            f.seek(max(FINGERPRINT_SPAN, size - FINGERPRINT_SPAN))
            h.update(f.read(FINGERPRINT_SPAN))
    return h.hexdigest()


def file_name(session: str) -> str:
    """A session's file (a digest: session ids are the caller's, names must not escape the directory)."""
    return hashlib.blake2b(session.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest() + SUFFIX


def forget(root: str | os.PathLike, session: str) -> None:
    """Remove *session*'s snapshot from *root*, if there is one (a session was deleted)."""
    try:
        os.unlink(Path(root) / file_name(session))
    except OSError:
        pass


class KVDisk:
    """The snapshot directory of one engine: writes on a thread of its own, reads on the caller's."""

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.model = ""  # the loaded model's fingerprint (set by the engine when it loads one)
        self.writes = self.loads = self.rejected = 0
        self._queue: queue.Queue = queue.Queue()
        self._forgotten: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep()

    # -- writing (any thread hands over; the writer thread writes) ---------------------------------
    def save(self, session: str, tokens: np.ndarray, data: Any) -> None:
        """Write *session*'s snapshot soon (*data* is not changed afterwards by the caller)."""
        with self._lock:  # (a forgotten session stays forgotten: its id is never used again)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._write_loop, name="offgrid-kvdisk", daemon=True)
                self._thread.start()
        self._queue.put((session, self.model, np.asarray(tokens, dtype=np.int32), data))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until what was handed over is written (at close)."""
        done = threading.Event()
        self._queue.put(done)
        if self._thread is not None and self._thread.is_alive():
            done.wait(timeout)

    def forget(self, session: str) -> None:
        with self._lock:
            self._forgotten.add(session)
        forget(self.root, session)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            session, model, tokens, data = item
            with self._lock:
                if session in self._forgotten:
                    continue
            try:
                self._write(session, model, tokens, data)
                self._trim()
            except OSError as exc:  # a full or read-only disk: the snapshot stays in memory only
                log.warning("offgrid: could not write a KV snapshot to %s: %s", self.root, exc)

    def _write(self, session: str, model: str, tokens: np.ndarray, data: Any) -> None:
        body = memoryview(data).cast("B")
        header = json.dumps({"session": session, "model": model, "tokens": int(len(tokens)),
                             "bytes": len(body)}).encode()
        h = hashlib.blake2b(digest_size=DIGEST)
        target = self.root / file_name(session)
        temp = target.with_name(f".{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(temp, "wb") as f:
            for part in (MAGIC, struct.pack("<I", len(header)), header, tokens.tobytes(), body):
                f.write(part)
                h.update(part)
            f.write(h.digest())
        os.replace(temp, target)
        self.writes += 1

    def _files(self) -> list[os.DirEntry]:
        try:
            return [e for e in os.scandir(self.root) if e.name.endswith(SUFFIX) and e.is_file()]
        except OSError:
            return []

    def _trim(self) -> None:
        """Least recently used files out until the directory is within its bound."""
        entries = []
        for e in self._files():
            try:
                st = e.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, e.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                os.unlink(path)
            except OSError:
                pass
            total -= size

    def _sweep(self) -> None:
        """Temporary files a crashed writer left (another process's recent ones may be in progress)."""
        now = time.time()
        try:
            for e in os.scandir(self.root):
                if e.name.endswith(".tmp"):
                    try:
                        if now - e.stat().st_mtime > STALE_TEMP:
                            os.unlink(e.path)
                    except OSError:
                        pass
        except OSError:
            pass

    # -- reading (the engine thread) ------------------------------------------------------------------
    def load(self, session: str) -> tuple[np.ndarray, Any] | None:
        """*session*'s tokens and cells for the loaded model, or None; a file that does not check out
        (cut, corrupt, another model or session) is removed."""
        path = self.root / file_name(session)
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        found = self._parse(raw, session)
        if found is None:
            self.rejected += 1
            try:
                os.unlink(path)
            except OSError:
                pass
            return None
        try:
            os.utime(path)  # recently used
        except OSError:
            pass
        self.loads += 1
        return found

    def _parse(self, raw: bytes, session: str) -> tuple[np.ndarray, Any] | None:
        if len(raw) < len(MAGIC) + 4 + DIGEST or not raw.startswith(MAGIC):
            return None
        if hashlib.blake2b(raw[:-DIGEST], digest_size=DIGEST).digest() != raw[-DIGEST:]:
            return None
        (n,) = struct.unpack_from("<I", raw, len(MAGIC))
        start = len(MAGIC) + 4
        try:
            header = json.loads(raw[start:start + n])
            count, size = int(header["tokens"]), int(header["bytes"])
        except (ValueError, KeyError, TypeError):
            return None
        if header.get("session") != session or header.get("model") != self.model or not self.model:
            return None
        at = start + n
        if at + 4 * count + size + DIGEST != len(raw) or count <= 0:
            return None
        tokens = np.frombuffer(raw, dtype=np.int32, count=count, offset=at).astype(np.intc)
        data = (ctypes.c_uint8 * size).from_buffer(bytearray(raw[at + 4 * count:at + 4 * count + size]))
        return tokens, data

    def stats(self) -> dict[str, Any]:
        files = self._files()
        size = 0
        for e in files:
            try:
                size += e.stat().st_size
            except OSError:
                pass
        return {"files": len(files), "bytes": size, "max_bytes": self.max_bytes, "writes": self.writes,
                "loads": self.loads, "rejected": self.rejected}
