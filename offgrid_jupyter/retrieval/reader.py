"""Reading and chunking learned files in a process of their own.

A file to learn comes from outside, and the parsers it goes through (pandas, pyarrow, pypdf,
``ast``, ``json``) are not ours: a file can be made to take gigabytes (a deflate bomb, a Parquet
file of a hundred million zeros), minutes, or the process (a parser's recursion). Learning runs
beside a Jupyter server that holds the one model every notebook shares, so every file is read
here instead, in a child process with a memory limit (``RLIMIT_AS``, ``Limits.memory_mb``) and a
time limit per file (``Limits.seconds_per_file``): a file that exceeds either fails alone, as
one entry of the learn's ``failed`` list, and the child is started again for the next file. The
parent also never holds the GIL for a parse, so the server's other routes answer throughout.

Only regular files are opened, without blocking (a FIFO named ``notes.md`` would block a
reader forever), and only their first ``max_file_mb`` bytes are read.

The protocol is JSON lines: ``{"path", "limits"}`` in; out, ``{"error": reason}``, or ``{"kind",
"sha256", "size", "mtime", "batches": n}`` followed by *n* lines of ``[[start, end, unit, heading,
text], ...]`` of at most :data:`BATCH_CHARS` characters each (so the parent never decodes a
15 MB line in one call, which would hold the GIL, and the server's event loop, for 100 ms). The
child keeps stdout for it (what a library prints goes to stderr).
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .chunking import Chunk, Limits, Unreadable, chunk

BATCH_CHARS = 256 * 1024  # chunk text per answer line
IDLE_CHILDREN = 2  # readers kept for the next learn (each costs a Python process)
START_TIMEOUT = 30.0  # seconds a new reader may take to say it is ready


def open_regular(path: Path, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The first *max_bytes* (+1, to tell a larger file) of *path*, if it is a regular file;
    :class:`Unreadable` otherwise. Never blocks on a FIFO or a device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Unreadable("no such file (it was removed)") from None
    if not stat.S_ISREG(st.st_mode):
        raise Unreadable("not a regular file (a pipe, socket or device)")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # (replaced since the stat above)
            raise Unreadable("not a regular file (a pipe, socket or device)")
        if st.st_size > max_bytes:
            raise Unreadable(f"larger than {max_bytes / (1 << 20):g} MB (learn_limits max_file_mb)")
        parts, size = [], 0
        while size <= max_bytes:
            block = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not block:
                break
            parts.append(block)
            size += len(block)
    finally:
        os.close(fd)
    if size > max_bytes:
        raise Unreadable(f"larger than {max_bytes / (1 << 20):g} MB (learn_limits max_file_mb)")
    return b"".join(parts), st


def read(path: Path, limits: Limits) -> tuple[dict[str, Any], list[list]]:
    """One file read and chunked (what the child answers): its header and its chunks in batches."""
    data, st = open_regular(path, int(limits.max_file_mb * (1 << 20)))
    kind, pieces = chunk(path, data, limits)
    batches: list[list] = []
    size = BATCH_CHARS
    for c in pieces:
        if size >= BATCH_CHARS:
            batches.append([])
            size = 0
        batches[-1].append([c.start, c.end, c.unit, _text(c.heading), _text(c.text)])
        size += len(c.text) + len(c.heading)
    header = {"kind": kind, "sha256": hashlib.sha256(data).hexdigest(), "size": st.st_size, "mtime": st.st_mtime,
              "batches": len(batches)}
    return header, batches


def _text(s: str) -> str:
    """*s* as valid UTF-8 (a PDF's text can hold lone surrogates, which no store can keep)."""
    return s if s.isascii() else s.encode("utf-8", "replace").decode("utf-8")


def _serve() -> None:
    """The child: answer requests until stdin closes (the parent went away)."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the answers
    limited = False
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        limits = Limits(**request["limits"])
        if not limited:
            _limit_memory(limits.memory_mb)
            limited = True
        batches: list[list] = []
        try:
            answer, batches = read(Path(request["path"]), limits)
        except Unreadable as exc:
            answer = {"error": str(exc)}
        except MemoryError:
            answer = {"error": f"reading it needs more than {limits.memory_mb} MB (learn_limits memory_mb)"}
        except RecursionError:
            answer = {"error": "it is nested too deeply to read"}
        except OSError as exc:
            answer = {"error": exc.strerror or type(exc).__name__}
        except Exception as exc:  # noqa: BLE001 - whatever a parser raises: this file fails, the next goes on
            answer = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
        out.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in [answer, *batches]))
        out.flush()


def _limit_memory(mb: int) -> None:
    try:
        import resource

        limit = int(mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # not on this platform: the time limit still holds
        pass


class _Child:
    """One reader process and its pipes."""

    def __init__(self, memory_mb: int) -> None:
        self.memory_mb = memory_mb
        self.proc = subprocess.Popen([sys.executable, "-m", "offgrid_jupyter.retrieval.reader"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ.copy())
        self.buffer = b""
        if self._line(time.monotonic() + START_TIMEOUT) is None:
            self.kill()
            raise OSError("the file reader process did not start")

    def ask(self, path: Path, limits: Limits) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"path": str(path), "limits": limits.to_dict()}).encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + limits.seconds_per_file
        line = self._line(deadline)
        answer = json.loads(line) if line is not None else None
        chunks: list[list] = []
        for _ in range(answer.get("batches", 0) if answer else 0):
            line = self._line(deadline + 30)  # (read already: only passing it over is left)
            if line is None:
                answer = None
                break
            chunks += json.loads(line)
        if answer is None:
            alive = self.proc.poll() is None
            self.kill()
            if alive:
                return {"error": f"reading it took longer than {limits.seconds_per_file:g} s "
                                 "(learn_limits seconds_per_file)"}
            return {"error": f"reading it stopped the reader process (out of memory past "
                             f"{limits.memory_mb} MB, or a crash in a parser)"}
        answer["chunks"] = chunks
        return answer

    def _line(self, deadline: float) -> bytes | None:
        """The next line the child writes, or None if it ends or the deadline passes first."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            block = os.read(fd, 1 << 18)
            if not block:
                return None
            self.buffer += block
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


_idle: list[_Child] = []
_idle_lock = threading.Lock()


class Reader:
    """Reads the files of one learn, each in a child process (reused; replaced when one fails)."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._child: _Child | None = None

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        child, self._child = self._child, None
        if child is None or not child.alive:
            return
        with _idle_lock:
            if len(_idle) < IDLE_CHILDREN:
                _idle.append(child)
                return
        child.kill()

    def read(self, path: Path) -> tuple[str, list[Chunk], str, os.stat_result | Any]:
        """``(kind, chunks, sha256, stat)`` of *path*; :class:`Unreadable` with the reason."""
        if self._child is None or not self._child.alive:
            self._child = self._take(self.limits.memory_mb)
        answer = self._child.ask(path, self.limits)
        if not self._child.alive:
            self._child = None
        if "error" in answer:
            raise Unreadable(answer["error"])
        chunks = [Chunk(*c) for c in answer["chunks"]]
        return answer["kind"], chunks, answer["sha256"], _Stat(answer["size"], answer["mtime"])

    @staticmethod
    def _take(memory_mb: int) -> _Child:
        with _idle_lock:
            for child in [c for c in _idle if not c.alive]:
                _idle.remove(child)
            for child in _idle:
                if child.memory_mb == memory_mb:  # (its memory limit is set once, by its first file)
                    _idle.remove(child)
                    return child
        return _Child(memory_mb)


class _Stat:
    __slots__ = ("st_size", "st_mtime")

    def __init__(self, size: int, mtime: float):
        self.st_size, self.st_mtime = size, mtime


def _close_idle() -> None:
    with _idle_lock:
        for child in _idle:
            child.kill()
        _idle.clear()


import atexit  # noqa: E402 - registered once the module is set up

atexit.register(_close_idle)

if __name__ == "__main__":
    _serve()
