"""The session store: sessions, their messages, and the marks of turns in flight.

One SQLite database (``db.py``) is shared by the server and every kernel. Each process also
keeps an in-memory cache of the sessions it uses, with a sliding idle TTL. A cached
conversation is revalidated against the database's per-session ``version`` counter (one
indexed read), so a turn written by another process is never missed, and a session that left
the cache (TTL, restart, crash) is read back transparently. Reads have no side effects beyond
``last_access_at`` (at most once a minute).

A turn's question is stored with a *busy mark* naming this process (``begin_turn``) and its
reply with the mark's removal (``end_turn``), each in one transaction, so a process that dies
mid-turn leaves a mark from which the next start repairs the session (``repair``): the
unanswered question is marked interrupted and kept out of later prompts.

Export/import is ``transfer.py``, the DataFrames ``frames.py``, profiles ``profiles.py``, the
learned files ``retrieval/``; the store hands them its database.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import psutil

from ..errors import (
    ContentTooLargeError,
    DuplicateNameError,
    InvalidRequestError,
    MessageNotFoundError,
    SessionNotFoundError,
)
from ..inference import kvdisk
from ..retrieval.rag import Library
from ..validation import NAME_RE, SESSION_ID_RE, check_json, check_name, check_text
from . import frames, transfer
from .db import DB_FILENAME, Database, data_dir, load_json
from .profiles import Profiles
from .records import ROLES, Message, Session, make_title, new_message_id, new_session_id

TOUCH_WRITE_INTERVAL_S = 60.0  # reads persist last_access_at at most this often
ROOT_ENV = "OFFGRID_ROOT"  # the Jupyter server's root directory, which it gives the kernels it starts
__all__ = ["DB_FILENAME", "SESSION_ID_RE", "Message", "Session", "Store", "data_dir", "get_store"]


def _started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


_PROCESS_STARTED = _started(os.getpid())


def _process_alive(pid: int, started: float | None) -> bool:
    """Is the process that wrote a mark still running (the same process, not a reuse of its pid)?"""
    now_started = _started(pid)
    if now_started is None:
        return False
    return started is None or abs(now_started - started) < 1.0


class _Cached:
    __slots__ = ("session", "version", "last_access", "persisted_access")

    def __init__(self, session: Session, version: int, now: float):
        self.session = session
        self.version = version
        self.last_access = now
        self.persisted_access = session.last_access_at



class Store:
    """Sessions and messages in one SQLite file, safe across threads and processes."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        ttl_hours: float = 10.0,
        retention_days: float | None = None,
        max_content_bytes: int = 1 << 20,
        prune_empty_after_s: float = 60.0,
        busy_timeout_s: float = 30.0,
        synchronous: str = "NORMAL",
        clock: Callable[[], float] = time.time,
        busy_sessions: Callable[[], Iterable[str]] | None = None,
        notebook_root: str | os.PathLike | None = None,
    ):
        self.path = Path(path) if path else data_dir() / DB_FILENAME
        self.kv_dir = self.path.parent / kvdisk.DIRNAME  # the engines' session snapshots (inference/kvdisk.py)
        self.on_delete: list[Callable[[str], None]] = []  # called with a deleted session's id (engines forget it)
        self.ttl_hours = float(ttl_hours)
        self.retention_days = retention_days
        self.max_content_bytes = int(max_content_bytes)
        self.prune_empty_after_s = prune_empty_after_s
        self.clock = clock
        self.busy_sessions = busy_sessions
        # a notebook is known by its path relative to the Jupyter server's root, whoever names it
        # (a kernel knows its notebook's absolute path, the sidebar the relative one)
        root = notebook_root or os.environ.get(ROOT_ENV)
        self.notebook_root = Path(root).expanduser().resolve() if root else None
        self.pending_writers: list[Callable[[], Any]] = []  # flushed before the request rows are read
        self._cache: dict[str, _Cached] = {}
        self._cache_lock = threading.Lock()
        self.db = Database(self.path, busy_timeout_s=busy_timeout_s, synchronous=synchronous, clock=clock)
        self.repair()  # what a crashed process left: its marks, its unanswered questions
        self._relink_notebooks()
        self.prune()

    # -- the database, for the modules that keep their own tables in it ----------------------
    def connection(self) -> sqlite3.Connection:
        """This thread's connection (for read queries of other modules, e.g. stats)."""
        return self.db.connection()

    def transaction(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run *fn(conn)* in one write transaction, retried while the database is locked."""
        return self.db.transaction(fn)

    def migrations(self) -> list[str]:
        return self.db.migrations()

    def close(self) -> None:
        self.db.close()

    @property
    def profiles(self) -> Profiles:
        """The named presets sessions are created with (see profiles.py)."""
        return Profiles(self)

    @property
    def library(self) -> Library:
        """The collections of learned files, for retrieval (see retrieval/rag.py)."""
        return Library(self)

    # -- validation ------------------------------------------------------------------
    check_name = staticmethod(check_name)  # a session's name: 1-64 letters, digits, '.', '_' or '-'

    @staticmethod
    def _check_fields(**fields: Any) -> None:
        """Optional text fields must be encodable strings; metadata-like fields plain, shallow JSON."""
        for name, value in fields.items():
            if value is None:
                continue
            if name in ("metadata", "context", "usage"):
                if not isinstance(value, dict):
                    raise InvalidRequestError(f"{name} must be a JSON object.")
                check_json(value, name)
            elif name in ("tool_calls", "tool_results"):
                if not isinstance(value, list):
                    raise InvalidRequestError(f"{name} must be a JSON array.")
                check_json(value, name)
            else:
                check_text(value, name)

    def _check_content(self, role: Any, content: Any) -> None:
        if role not in ROLES:
            raise InvalidRequestError(f"Invalid role {role!r}: use one of {', '.join(ROLES)}.")
        if not isinstance(content, str) or not content.strip():
            raise InvalidRequestError("Message content must be a non-empty string.")
        check_text(content, "Message content")
        size = len(content.encode("utf-8"))
        if size > self.max_content_bytes:
            raise ContentTooLargeError(
                f"Message content is {size} bytes; the limit is {self.max_content_bytes} bytes "
                "(max_content_bytes). Split it or raise the limit."
            )

    # -- row conversion -------------------------------------------------------------------
    @staticmethod
    def _session(row: sqlite3.Row) -> Session:
        return Session(
            id=row["id"], name=row["name"], title=row["title"], system_prompt=row["system_prompt"],
            profile=row["profile"], model=row["model"], created_at=row["created_at"],
            updated_at=row["updated_at"], last_access_at=row["last_access_at"], ended=bool(row["ended"]),
            metadata=load_json(row["metadata"], {}), message_count=row["message_count"],
        )

    @staticmethod
    def _message(row: sqlite3.Row) -> Message:
        usage = load_json(row["usage"], None)
        return Message(
            id=row["id"], session_id=row["session_id"], role=row["role"], content=row["content"],
            timestamp=row["timestamp"], tool_calls=load_json(row["tool_calls"], []),
            tool_results=load_json(row["tool_results"], []), usage=usage if isinstance(usage, dict) else None,
            finish_reason=row["finish_reason"], metadata=load_json(row["metadata"], {}),
        )

    def _row(self, conn: sqlite3.Connection, ref: str) -> sqlite3.Row:
        if not isinstance(ref, str) or not ref:
            raise SessionNotFoundError(f"No session {ref!r}: give a session id or name.")
        if not (SESSION_ID_RE.fullmatch(ref) or NAME_RE.fullmatch(ref)):  # no such name can exist
            raise SessionNotFoundError(f"No session {ascii(ref)[:80]}: that is not a valid session id or name. "
                                       "`%offgrid sessions` lists them.")
        col = "id" if SESSION_ID_RE.fullmatch(ref) else "name"
        row = conn.execute(f"SELECT * FROM sessions WHERE {col} = ?", (ref,)).fetchone()
        if row is None:
            raise SessionNotFoundError(f"No session with {col} {ref!r}. `%offgrid sessions` lists them.")
        return row

    def _bump(self, conn: sqlite3.Connection, sid: str, now: float, delta_messages: int = 0) -> None:
        conn.execute(
            "UPDATE sessions SET updated_at = ?, last_access_at = ?, version = version + 1, "
            "message_count = message_count + ? WHERE id = ?", (now, now, delta_messages, sid))

    # -- sessions ---------------------------------------------------------------------------
    def create(self, name: str | None = None, *, system_prompt: str | None = None, profile: str | None = None,
               model: str | None = None, metadata: dict | None = None, title: str | None = None) -> Session:
        if name is not None:
            self.check_name(name)
        self._check_fields(system_prompt=system_prompt, profile=profile, model=model, metadata=metadata, title=title)
        if profile is not None:
            self.profiles.get(profile)  # an unknown profile is the caller's 400, before anything is stored
        self.prune()  # sessions left empty go before new ones arrive (reads never prune)
        sid, now = new_session_id(), self.clock()

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO sessions (id, name, title, system_prompt, profile, model, created_at, updated_at, "
                    "last_access_at, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (sid, name, title, system_prompt, profile, model, now, now, now, json.dumps(metadata or {})))
            except sqlite3.IntegrityError as exc:
                raise DuplicateNameError(f"A session named {name!r} already exists; pick another name.") from exc

        self.transaction(insert)
        return self.get(sid)

    def get(self, ref: str, *, messages: bool = True) -> Session:
        """A session by id or name, with its messages (from cache when current)."""
        conn = self.connection()
        row = self._row(conn, ref)
        session = self._session(row)
        now = self.clock()
        self._sweep(now)
        if messages:
            with self._cache_lock:
                cached = self._cache.get(session.id)
            if cached is not None and cached.version == row["version"]:
                session.messages = list(cached.session.messages)
            else:
                session.messages = [self._message(r) for r in conn.execute(
                    "SELECT * FROM messages WHERE session_id = ? ORDER BY seq", (session.id,))]
                cached = _Cached(session, row["version"], now)
                with self._cache_lock:
                    self._cache[session.id] = cached
            cached.last_access = now
            if now - cached.persisted_access > TOUCH_WRITE_INTERVAL_S:
                self._persist_access(session.id, now)
                cached.persisted_access = now
        return session

    def _persist_access(self, sid: str, now: float) -> None:
        self.transaction(lambda c: c.execute("UPDATE sessions SET last_access_at = ? WHERE id = ?", (now, sid)))

    def exists(self, ref: str) -> bool:
        try:
            self._row(self.connection(), ref)
            return True
        except SessionNotFoundError:
            return False

    def list(self, limit: int = 50, offset: int = 0) -> list[Session]:
        """Summaries, newest activity first; never the messages."""
        if not isinstance(limit, int) or not 0 < limit <= 10_000:
            raise InvalidRequestError("limit must be an integer between 1 and 10000.")
        if not isinstance(offset, int) or offset < 0:
            raise InvalidRequestError("offset must be a non-negative integer.")
        rows = self.connection().execute(
            "SELECT * FROM sessions ORDER BY updated_at DESC, rowid DESC LIMIT ? OFFSET ?", (limit, offset))
        return [self._session(r) for r in rows]

    def count(self) -> int:
        return self.connection().execute("SELECT count(*) FROM sessions").fetchone()[0]

    def delete(self, ref: str) -> None:
        def remove(conn: sqlite3.Connection) -> str:
            sid = self._row(conn, ref)["id"]
            conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))
            return sid

        sid = self.transaction(remove)
        self._forget(sid)
        kvdisk.forget(self.kv_dir, sid)  # its KV snapshot, whichever process wrote it
        for hook in list(self.on_delete):
            hook(sid)

    def rename(self, ref: str, new_name: str | None) -> Session:
        if new_name is not None:
            self.check_name(new_name)

        def update(conn: sqlite3.Connection) -> str:
            sid = self._row(conn, ref)["id"]
            try:
                conn.execute("UPDATE sessions SET name = ?, version = version + 1 WHERE id = ?", (new_name, sid))
            except sqlite3.IntegrityError as exc:
                raise DuplicateNameError(f"A session named {new_name!r} already exists; pick another name.") from exc
            return sid

        return self.get(self.transaction(update))

    def update(self, ref: str, *, system_prompt: str | None = None, model: str | None = None,
               profile: str | None = None, title: str | None = None, metadata: dict | None = None) -> Session:
        """Set the given fields (None leaves a field as it is)."""
        self._check_fields(system_prompt=system_prompt, model=model, profile=profile, title=title, metadata=metadata)
        fields = {k: v for k, v in (("system_prompt", system_prompt), ("model", model), ("profile", profile),
                                    ("title", title)) if v is not None}
        if metadata is not None:
            fields["metadata"] = json.dumps(metadata)

        def apply(conn: sqlite3.Connection) -> str:
            sid = self._row(conn, ref)["id"]
            if fields:
                sets = ", ".join(f"{k} = ?" for k in fields)
                conn.execute(f"UPDATE sessions SET {sets}, version = version + 1 WHERE id = ?", (*fields.values(), sid))
            return sid

        return self.get(self.transaction(apply))

    def end(self, ref: str) -> Session:
        def apply(conn: sqlite3.Connection) -> str:
            sid = self._row(conn, ref)["id"]
            conn.execute("UPDATE sessions SET ended = 1, version = version + 1 WHERE id = ?", (sid,))
            return sid

        return self.get(self.transaction(apply))

    def fork(self, ref: str, upto_message_id: str | None = None, *, name: str | None = None) -> Session:
        """A new session holding a copy of the messages up to (and including) one message."""
        if name is not None:
            self.check_name(name)
        new_id, now = new_session_id(), self.clock()

        def copy(conn: sqlite3.Connection) -> None:
            src = self._row(conn, ref)
            rows = conn.execute("SELECT * FROM messages WHERE session_id = ? ORDER BY seq", (src["id"],)).fetchall()
            if upto_message_id is not None:
                ids = [r["id"] for r in rows]
                if upto_message_id not in ids:
                    raise MessageNotFoundError(f"Session {ref!r} has no message {upto_message_id!r}.")
                rows = rows[: ids.index(upto_message_id) + 1]
            meta = {**json.loads(src["metadata"]), "forked_from": src["id"]}
            try:
                conn.execute(
                    "INSERT INTO sessions (id, name, title, system_prompt, profile, model, created_at, updated_at, "
                    "last_access_at, metadata, message_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (new_id, name, src["title"], src["system_prompt"], src["profile"], src["model"], now, now, now,
                     json.dumps(meta), len(rows)))
            except sqlite3.IntegrityError as exc:
                raise DuplicateNameError(f"A session named {name!r} already exists; pick another name.") from exc
            conn.executemany(
                "INSERT INTO messages (id, session_id, role, content, timestamp, tool_calls, tool_results, usage, "
                "finish_reason, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(new_message_id(), new_id, r["role"], r["content"], r["timestamp"], r["tool_calls"],
                  r["tool_results"], r["usage"], r["finish_reason"], r["metadata"]) for r in rows])

        self.transaction(copy)
        return self.get(new_id)

    # -- messages ---------------------------------------------------------------------------
    def _insert_message(self, conn: sqlite3.Connection, sid: str, role: str, content: str, now: float,
                        fields: dict) -> Message:
        msg = Message(id=fields.get("id") or new_message_id(), session_id=sid, role=role, content=content,
                      timestamp=fields.get("timestamp") or now, tool_calls=fields.get("tool_calls") or [],
                      tool_results=fields.get("tool_results") or [], usage=fields.get("usage"),
                      finish_reason=fields.get("finish_reason"), metadata=fields.get("metadata") or {})
        conn.execute(
            "INSERT INTO messages (id, session_id, role, content, timestamp, tool_calls, tool_results, usage, "
            "finish_reason, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (msg.id, sid, role, content, msg.timestamp, json.dumps(msg.tool_calls), json.dumps(msg.tool_results),
             json.dumps(msg.usage) if msg.usage is not None else None, msg.finish_reason, json.dumps(msg.metadata)))
        if role == "user":
            conn.execute("UPDATE sessions SET title = ? WHERE id = ? AND title IS NULL", (make_title(content), sid))
        self._bump(conn, sid, now, 1)
        return msg

    def add_message(self, ref: str, role: str, content: str, *, tool_calls: list | None = None,
                    tool_results: list | None = None, usage: dict | None = None, finish_reason: str | None = None,
                    metadata: dict | None = None) -> Message:
        """Append one message atomically (it is durable when this returns)."""
        self._check_content(role, content)
        self._check_fields(tool_calls=tool_calls, tool_results=tool_results, usage=usage, metadata=metadata,
                           finish_reason=finish_reason)
        fields = dict(tool_calls=tool_calls, tool_results=tool_results, usage=usage, finish_reason=finish_reason,
                      metadata=metadata)
        now = self.clock()

        def insert(conn: sqlite3.Connection) -> Message:
            sid = self._row(conn, ref)["id"]
            return self._insert_message(conn, sid, role, content, now, fields)

        msg = self.transaction(insert)
        self._forget(msg.session_id)
        return msg

    def _last_turn(self, conn: sqlite3.Connection, sid: str, message_id: str | None) -> list[sqlite3.Row]:
        """The messages of one turn: a user message and everything up to the next user message."""
        rows = conn.execute("SELECT seq, id, role FROM messages WHERE session_id = ? ORDER BY seq", (sid,)).fetchall()
        users = [i for i, r in enumerate(rows) if r["role"] == "user"]
        if message_id is None:
            if not users:
                return []
            start = users[-1]
        else:
            idx = [i for i, r in enumerate(rows) if r["id"] == message_id]
            if not idx:
                raise MessageNotFoundError(f"Session {sid!r} has no message {message_id!r}.")
            start = idx[0]
        end = next((i for i in users if i > start), len(rows))
        return rows[start:end]

    def _drop_turn(self, conn: sqlite3.Connection, sid: str, message_id: str | None, now: float) -> int:
        turn = self._last_turn(conn, sid, message_id)
        conn.executemany("DELETE FROM messages WHERE seq = ?", [(r["seq"],) for r in turn])
        if turn:
            self._bump(conn, sid, now, -len(turn))
        return len(turn)

    def delete_turn(self, ref: str, message_id: str | None = None) -> int:
        """Delete one turn (the last by default): its user message and the replies after it."""
        now = self.clock()

        def remove(conn: sqlite3.Connection) -> tuple[str, int]:
            sid = self._row(conn, ref)["id"]
            return sid, self._drop_turn(conn, sid, message_id, now)

        sid, n = self.transaction(remove)
        self._forget(sid)
        return n

    def replace_last_turn(self, ref: str, content: str, *, message_id: str | None = None, **fields: Any) -> Message:
        """Atomically drop a turn (the last, or the one *message_id* starts) and
        append a new user message; the conversation keeps execution order."""
        self._check_content("user", content)
        now = self.clock()

        def replace(conn: sqlite3.Connection) -> Message:
            sid = self._row(conn, ref)["id"]
            self._drop_turn(conn, sid, message_id, now)
            return self._insert_message(conn, sid, "user", content, now, fields)

        msg = self.transaction(replace)
        self._forget(msg.session_id)
        return msg

    def messages(self, ref: str) -> list[Message]:
        return self.get(ref).messages or []

    def cell_turn(self, ref: str, cell_id: str) -> str | None:
        """Id of the newest user message a notebook cell stored in this session."""
        conn = self.connection()
        sid = self._row(conn, ref)["id"]
        row = conn.execute(
            "SELECT id FROM messages WHERE session_id = ? AND role = 'user' "
            "AND json_extract(metadata, '$.cell_id') = ? ORDER BY seq DESC LIMIT 1", (sid, cell_id)).fetchone()
        return row[0] if row else None

    # -- notebooks -------------------------------------------------------------------------
    def notebook_key(self, notebook: str) -> str:
        """How a notebook's path is kept: relative to the server's root (``notebook_root``), in
        POSIX form, when it is under it; else as given."""
        path = Path(notebook)
        if self.notebook_root is not None and path.is_absolute():
            try:
                return path.resolve().relative_to(self.notebook_root).as_posix()
            except ValueError:
                return notebook
        return path.as_posix() if not path.is_absolute() else notebook

    def bind_notebook(self, notebook: str, ref: str) -> None:
        """Remember that *notebook* (its path, relative to the root or absolute) uses this session."""
        now, key = self.clock(), self.notebook_key(notebook)

        def apply(conn: sqlite3.Connection) -> None:
            sid = self._row(conn, ref)["id"]
            conn.execute("INSERT INTO notebook_sessions VALUES (?, ?, ?) ON CONFLICT(notebook) DO UPDATE "
                         "SET session_id = excluded.session_id, updated_at = excluded.updated_at",
                         (key, sid, now))

        self.transaction(apply)

    def notebook_session(self, notebook: str) -> Session | None:
        """The session *notebook* (relative to the root or absolute) used last, if it still exists."""
        forms = [self.notebook_key(notebook), notebook]
        if self.notebook_root is not None and not Path(notebook).is_absolute():
            forms.append(str(self.notebook_root / notebook))  # a link written before paths were relative
        for form in dict.fromkeys(forms):
            row = self.connection().execute("SELECT session_id FROM notebook_sessions WHERE notebook = ?",
                                            (form,)).fetchone()
            if row is None:
                continue
            try:
                return self.get(row[0], messages=False)
            except SessionNotFoundError:
                return None
        return None

    def _relink_notebooks(self) -> None:
        """Links kept under a notebook's absolute path (before they were relative to the root) are
        moved to the relative form, unless that form is already taken (it is newer)."""
        if self.notebook_root is None:
            return
        prefix = str(self.notebook_root).rstrip("/") + "/"
        rows = self.connection().execute("SELECT notebook FROM notebook_sessions WHERE substr(notebook, 1, ?) = ?",
                                         (len(prefix), prefix)).fetchall()
        if not rows:
            return

        def apply(conn: sqlite3.Connection) -> None:
            for (old,) in rows:
                conn.execute("UPDATE OR IGNORE notebook_sessions SET notebook = ? WHERE notebook = ?",
                             (self.notebook_key(old), old))

        self.transaction(apply)

    # -- lifetime (sliding idle TTL) -------------------------------------------------------------
    @property
    def ttl_seconds(self) -> float:
        return self.ttl_hours * 3600.0

    def _forget(self, sid: str) -> None:
        with self._cache_lock:
            self._cache.pop(sid, None)

    def _sweep(self, now: float) -> None:
        with self._cache_lock:
            for sid in [s for s, c in self._cache.items() if now - c.last_access > self.ttl_seconds]:
                del self._cache[sid]

    def cached_ids(self) -> list[str]:
        self._sweep(self.clock())
        with self._cache_lock:
            return list(self._cache)

    def _last_access(self, row: sqlite3.Row) -> float:
        with self._cache_lock:
            cached = self._cache.get(row["id"])
        return max(row["last_access_at"], cached.last_access if cached else 0.0)

    def touch(self, ref: str) -> Session:
        now = self.clock()

        def apply(conn: sqlite3.Connection) -> str:
            sid = self._row(conn, ref)["id"]
            conn.execute("UPDATE sessions SET last_access_at = ? WHERE id = ?", (now, sid))
            return sid

        sid = self.transaction(apply)
        with self._cache_lock:
            cached = self._cache.get(sid)
            if cached is not None:
                cached.last_access = cached.persisted_access = now
        return self.get(sid, messages=False)

    def is_active(self, ref: str) -> bool:
        """Accessed within the idle TTL and not ended (does not itself count as an access)."""
        row = self._row(self.connection(), ref)
        return not row["ended"] and self.clock() - self._last_access(row) < self.ttl_seconds

    def ttl_remaining(self, ref: str) -> float:
        """Seconds left before the session counts as idle-expired (0 when it already does)."""
        row = self._row(self.connection(), ref)
        return max(0.0, self.ttl_seconds - (self.clock() - self._last_access(row)))

    def resume(self, ref: str, context: dict | None = None) -> Session:
        """Store *context* on the session (``metadata["context"]``), un-end it and mark it active."""
        self._check_fields(context=context)
        now = self.clock()

        def apply(conn: sqlite3.Connection) -> str:
            row = self._row(conn, ref)
            meta = json.loads(row["metadata"])
            if context is not None:
                meta["context"] = context
            conn.execute("UPDATE sessions SET metadata = ?, ended = 0, last_access_at = ?, version = version + 1 "
                         "WHERE id = ?", (json.dumps(meta), now, row["id"]))
            return row["id"]

        return self.get(self.transaction(apply))

    def session_stats(self) -> dict[str, Any]:
        now, cut = self.clock(), self.clock() - self.ttl_seconds
        row = self.connection().execute(
            """SELECT count(*) AS total,
                      coalesce(sum(ended), 0) AS ended,
                      coalesce(sum(CASE WHEN ended = 0 AND last_access_at >= :cut THEN 1 ELSE 0 END), 0) AS active,
                      coalesce(sum(CASE WHEN ended = 0 AND last_access_at < :cut THEN 1 ELSE 0 END), 0) AS expired,
                      avg(CASE WHEN ended = 0 THEN :now - last_access_at END) AS avg_idle,
                      max(CASE WHEN ended = 0 THEN :now - last_access_at END) AS max_idle,
                      min(CASE WHEN ended = 0 THEN :now - last_access_at END) AS min_idle
               FROM sessions""", {"cut": cut, "now": now}).fetchone()

        def hours(v: float | None) -> float:
            return round(max(0.0, v) / 3600.0, 4) if v is not None else 0.0

        return {
            "total_sessions": row["total"],
            "cached_sessions": len(self.cached_ids()),
            "active_sessions": row["active"],
            "ended_sessions": row["ended"],
            "idle_expired_sessions": row["expired"],
            "avg_idle_time_hours": hours(row["avg_idle"]),
            "longest_idle_time_hours": hours(row["max_idle"]),
            "shortest_idle_time_hours": hours(row["min_idle"]),
            "ttl_hours": self.ttl_hours,
            "sliding_ttl_enabled": True,
            "retention_days": self.retention_days,
        }

    # -- busy marks, turns in flight, repair after a crash ---------------------------------------
    def _mark(self, conn: sqlite3.Connection, sid: str, message_id: str | None = None) -> str:
        token = uuid.uuid4().hex
        conn.execute("INSERT INTO busy (token, session_id, pid, since, message_id, pid_started) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (token, sid, os.getpid(), self.clock(), message_id, _PROCESS_STARTED))
        return token

    @contextmanager
    def busy(self, ref: str) -> Iterator[str]:
        """Mark a session as having a generation queued or running (pruning skips it)."""
        sid = self._row(self.connection(), ref)["id"]
        token = self.transaction(lambda c: self._mark(c, sid))
        try:
            yield sid
        finally:
            self.transaction(lambda c: c.execute("DELETE FROM busy WHERE token = ?", (token,)))

    def begin_turn(self, ref: str, content: str, *, metadata: dict | None = None,
                   replace: str | None = None) -> tuple[Message, str]:
        """Store a turn's question and mark the turn in flight, in one transaction.

        The mark names this process and the question, so if the process dies before
        :meth:`end_turn`, :meth:`repair` finds the unanswered question and keeps it
        out of later prompts. *replace* drops the turn that message started first (a
        re-run cell). Returns the message and the mark's token."""
        self._check_content("user", content)
        self._check_fields(metadata=metadata)
        now = self.clock()

        def apply(conn: sqlite3.Connection) -> tuple[Message, str]:
            sid = self._row(conn, ref)["id"]
            self._repair(conn, self._dead_marks(conn, sid))
            if replace is not None:
                self._drop_turn(conn, sid, replace, now)
            msg = self._insert_message(conn, sid, "user", content, now, {"metadata": metadata})
            return msg, self._mark(conn, sid, msg.id)

        msg, token = self.transaction(apply)
        self._forget(msg.session_id)
        return msg, token

    def end_turn(self, token: str, session_id: str, reply: str | None = None, *,
                 steps: list[dict[str, Any]] | None = None, **fields: Any) -> Message | None:
        """Store a turn's reply (when there is one) and clear its mark, in one transaction.
        *steps* are the tool calls the turn made (``{id, name, arguments, result, ...}``,
        see tools.Rounds): each is stored before the reply as a ``tool`` message holding
        the result the model read, the call in its metadata.
        Raises SessionNotFoundError (after clearing the mark) if the session was deleted meanwhile."""
        tool_messages = [self._tool_message(step) for step in steps or []]
        if reply is not None:
            self._check_content("assistant", reply)
            self._check_fields(**fields)
        now = self.clock()

        def apply(conn: sqlite3.Connection) -> Message | bool | None:
            conn.execute("DELETE FROM busy WHERE token = ?", (token,))
            if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is None:
                return False
            for content, meta in tool_messages:
                self._insert_message(conn, session_id, "tool", content, now, {"metadata": meta})
            return self._insert_message(conn, session_id, "assistant", reply, now, fields) if reply else None

        out = self.transaction(apply)
        self._forget(session_id)
        if out is False:
            raise SessionNotFoundError(f"Session {session_id} was deleted while the reply was being generated; "
                                       "the reply was not stored.")
        return out

    def _tool_message(self, step: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        content = step.get("result") or "(the tool returned nothing)"
        self._check_content("tool", content)
        meta = {"tool_call": {"id": step.get("id"), "name": step.get("name"), "arguments": step.get("arguments")},
                "round": step.get("round"), "duration_ms": step.get("duration_ms"), "error": step.get("error")}
        self._check_fields(metadata=meta)
        return content, meta

    def abandon_turn(self, token: str, session_id: str, message_id: str) -> None:
        """Take a turn's question back out and clear its mark (its generation failed or
        was stopped before any text), in one transaction."""
        now = self.clock()

        def apply(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM busy WHERE token = ?", (token,))
            if conn.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,)).fetchone() is not None:
                self._drop_turn(conn, session_id, message_id, now)  # unless deleted meanwhile

        self.transaction(apply)
        self._forget(session_id)

    def _dead_marks(self, conn: sqlite3.Connection, sid: str | None = None) -> list[sqlite3.Row]:
        sql = "SELECT token, session_id, pid, pid_started, message_id FROM busy"
        rows = conn.execute(sql + " WHERE session_id = ?", (sid,)) if sid else conn.execute(sql)
        return [r for r in rows if not _process_alive(r["pid"], r["pid_started"])]

    def _repair(self, conn: sqlite3.Connection, marks: list[sqlite3.Row]) -> int:
        """Mark the questions of turns whose process died as interrupted, and clear
        those marks. An interrupted question stays visible but out of prompts."""
        repaired = 0
        for mark in marks:
            conn.execute("DELETE FROM busy WHERE token = ?", (mark["token"],))
            if not mark["message_id"]:
                continue
            row = conn.execute("SELECT metadata FROM messages WHERE id = ? AND session_id = ? AND role = 'user'",
                               (mark["message_id"], mark["session_id"])).fetchone()
            if row is None:
                continue
            meta = load_json(row["metadata"], {})
            meta["interrupted"] = "the process answering it stopped before replying"
            conn.execute("UPDATE messages SET metadata = ? WHERE id = ?", (json.dumps(meta), mark["message_id"]))
            conn.execute("UPDATE sessions SET version = version + 1 WHERE id = ?", (mark["session_id"],))
            repaired += 1
        return repaired

    def repair(self, ref: str | None = None) -> int:
        """Repair what dead processes left (all sessions, or one): their busy marks go,
        and the questions they never answered are marked interrupted. Runs when a store
        opens and before every turn; returns how many questions it marked."""
        conn = self.connection()
        sid = self._row(conn, ref)["id"] if ref is not None else None
        if not self._dead_marks(conn, sid):  # the usual case: a read, no write lock taken
            return 0

        def apply(c: sqlite3.Connection) -> tuple[int, set[str]]:
            marks = self._dead_marks(c, sid)  # again, inside the write transaction
            return self._repair(c, marks), {m["session_id"] for m in marks}

        marked, touched = self.transaction(apply)
        for s in touched:
            self._forget(s)
        return marked

    def _busy_ids(self, conn: sqlite3.Connection) -> set[str]:
        ids: set[str] = set(self.busy_sessions() if self.busy_sessions else ())
        self._repair(conn, self._dead_marks(conn))
        ids.update(r[0] for r in conn.execute("SELECT session_id FROM busy"))
        return ids

    def prune(self) -> int:
        """Delete sessions that stayed empty for ``prune_empty_after_s`` (never busy ones),
        and, only when a retention period is configured, sessions idle longer than it."""
        now = self.clock()

        def candidates(conn: sqlite3.Connection) -> list[str]:
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM sessions WHERE message_count = 0 AND created_at < ?",
                (now - self.prune_empty_after_s,))]
            if self.retention_days is not None:
                ids += [r[0] for r in conn.execute(
                    "SELECT id FROM sessions WHERE updated_at < ?", (now - self.retention_days * 86400,))]
            return ids

        if not candidates(self.connection()):  # the usual case: a read, no write lock taken
            return 0

        def apply(conn: sqlite3.Connection) -> list[str]:
            found = candidates(conn)  # again, inside the write transaction
            if not found:
                return []
            busy = self._busy_ids(conn)
            doomed = sorted(set(found) - busy)
            conn.executemany("DELETE FROM sessions WHERE id = ?", [(s,) for s in doomed])
            return doomed

        doomed = self.transaction(apply)
        for sid in doomed:
            self._forget(sid)
        return len(doomed)

    # -- export / import (chat/transfer.py) ----------------------------------------------------
    export_doc = staticmethod(transfer.export_doc)

    def export(self, directory: str | os.PathLike, refs: Iterable[str] | None = None) -> list[Path]:
        """Write one ``<session id>.json`` per session (all when *refs* is None) into *directory*."""
        return transfer.export(self, directory, refs)

    def import_(self, path: str | os.PathLike) -> list[Session]:
        """Import exported JSON (a file or a directory of them); see chat/transfer.py."""
        return transfer.import_path(self, path)

    def import_doc(self, doc: Any, file: str | os.PathLike = "the document") -> Session:
        """Import one export document; *file* names it in errors."""
        return transfer.import_doc(self, doc, file)

    # -- DataFrames (chat/frames.py) ----------------------------------------------------------------
    def sessions_frame(self):
        return frames.sessions_frame(self)

    def messages_frame(self, ref: str | None = None):
        return frames.messages_frame(self, ref)

    def stats_frame(self, **filters: Any):
        """The per-request statistics recorded in this store (``offgrid_jupyter.stats_frame``): what
        this process recorded so far is written first."""
        for flush in list(self.pending_writers):
            flush()
        return frames.requests_frame(self, **filters)


_store: Store | None = None
_store_lock = threading.Lock()


def get_store(**kwargs: Any) -> Store:
    """The process-wide store on the data directory (created on first call)."""
    global _store
    with _store_lock:
        if _store is None:
            _store = Store(**kwargs)
        return _store
