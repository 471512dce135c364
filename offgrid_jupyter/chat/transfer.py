"""Export and import: a session as the JSON document of the seed's first design.

One ``<session id>.json`` per session (ids, never names, become file names), the messages with
their tool calls, usage and metadata, plus what a round trip needs beyond that shape (name,
system prompt, model, ended, metadata). Importing is idempotent (messages already present are
skipped), checks everything before it writes, and happens in one transaction; a name held by
another session, a message id of another session, or a profile this store does not have is
refused naming it.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import DuplicateIdError, DuplicateNameError, InvalidRequestError
from .records import MESSAGE_ID_RE, SESSION_ID_RE, Session, check_times

if TYPE_CHECKING:
    from .store import Store


def export_doc(session: Session) -> dict[str, Any]:
    """A session (with its messages) as the export document :func:`import_doc` reads."""
    return {
        "id": session.id, "profile_name": session.profile, "created_at": session.created_at,
        "updated_at": session.updated_at, "title": session.title,
        "messages": [{"id": m.id, "role": m.role, "content": m.content, "timestamp": m.timestamp,
                      "tool_calls": m.tool_calls, "tool_results": m.tool_results, "usage": m.usage,
                      "finish_reason": m.finish_reason, "metadata": m.metadata} for m in session.messages or []],
        # beyond the original shape, so a round trip loses nothing:
        "name": session.name, "system_prompt": session.system_prompt, "model": session.model,
        "ended": session.ended, "metadata": session.metadata,
    }

def export(store: Store, directory: str | os.PathLike, refs: Iterable[str] | None = None) -> list[Path]:
    """Write one ``<session id>.json`` per session (all when *refs* is None) into *directory*."""
    target = Path(directory).expanduser().resolve()
    target.mkdir(parents=True, exist_ok=True)
    ids = [store._row(store.connection(), r)["id"] for r in refs] if refs is not None else \
        [r[0] for r in store.connection().execute("SELECT id FROM sessions ORDER BY created_at")]
    paths = []
    for sid in ids:
        assert SESSION_ID_RE.fullmatch(sid)  # ids, never names, become file names
        path = target / f"{sid}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(export_doc(store.get(sid)), ensure_ascii=False, indent=1))
        os.replace(tmp, path)
        paths.append(path)
    return paths

def import_path(store: Store, path: str | os.PathLike) -> list[Session]:
    """Import exported JSON (a file or a directory of them). Idempotent: messages
    already present are skipped. A name held by another session is an error."""
    src = Path(path).expanduser()
    if not src.exists():
        raise InvalidRequestError(f"Nothing to import at {src}: no such file or directory.")
    files = sorted(src.glob("*.json")) if src.is_dir() else [src]
    return [_import_one(store, f) for f in files]

def _import_one(store: Store, file: Path) -> Session:
    try:
        doc = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"Cannot import {file}: not readable JSON ({exc}).") from exc
    return import_doc(store, doc, file)

def import_doc(store: Store, doc: Any, file: str | os.PathLike = "the document") -> Session:
    """Import one export document (see :func:`export_doc`); *file* names it in errors."""
    if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
        raise InvalidRequestError(f"Cannot import {file}: expected an object with a 'messages' list.")
    sid = doc.get("id")
    if not isinstance(sid, str) or not SESSION_ID_RE.fullmatch(sid):
        raise InvalidRequestError(f"Cannot import {file}: 'id' must look like session-<12 hex>.")
    name = doc.get("name")
    if name is not None:
        store.check_name(name)
    try:
        store._check_fields(system_prompt=doc.get("system_prompt"), title=doc.get("title"),
                           model=doc.get("model"), profile=doc.get("profile_name"), metadata=doc.get("metadata"))
        check_times(doc, "created_at", "updated_at")
        for i, m in enumerate(doc["messages"]):
            if not isinstance(m, dict) or not MESSAGE_ID_RE.fullmatch(str(m.get("id", ""))):
                raise InvalidRequestError(f"messages[{i}] needs an id like msg-<12 hex>.")
            store._check_content(m.get("role"), m.get("content"))
            store._check_fields(tool_calls=m.get("tool_calls"), tool_results=m.get("tool_results"),
                               usage=m.get("usage"), metadata=m.get("metadata"),
                               finish_reason=m.get("finish_reason"))
            check_times(m, "timestamp")
        if doc.get("profile_name") is not None:
            store.profiles.get(doc["profile_name"])  # as POST /sessions: an unknown profile is refused
    except InvalidRequestError as exc:
        raise type(exc)(f"Cannot import {file}: {exc}") from None
    now = store.clock()

    def apply(conn: sqlite3.Connection) -> None:
        if name is not None:
            holder = conn.execute("SELECT id FROM sessions WHERE name = ?", (name,)).fetchone()
            if holder is not None and holder[0] != sid:
                raise DuplicateNameError(f"Cannot import {file}: the name {name!r} belongs to session "
                                         f"{holder[0]}. Rename one of them first.")
        if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (sid,)).fetchone() is None:
            conn.execute(
                "INSERT INTO sessions (id, name, title, system_prompt, profile, model, created_at, updated_at, "
                "last_access_at, ended, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sid, name, doc.get("title"), doc.get("system_prompt"), doc.get("profile_name"),
                 doc.get("model"), float(doc.get("created_at") or now), float(doc.get("updated_at") or now), now,
                 int(bool(doc.get("ended"))), json.dumps(doc.get("metadata") or {})))
        known = {r[0] for r in conn.execute("SELECT id FROM messages WHERE session_id = ?", (sid,))}
        fresh = []  # a message listed twice is imported once, where it first appears
        for m in doc["messages"]:
            if m["id"] not in known:
                known.add(m["id"])
                fresh.append(m)
        clash = [m["id"] for m in fresh
                 if conn.execute("SELECT 1 FROM messages WHERE id = ?", (m["id"],)).fetchone()]
        if clash:
            raise DuplicateIdError(f"Cannot import {file}: message {clash[0]} belongs to another session "
                                   "(import that session's export only once, or give the message a new id).")
        conn.executemany(
            "INSERT INTO messages (id, session_id, role, content, timestamp, tool_calls, tool_results, usage, "
            "finish_reason, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(m["id"], sid, m["role"], m["content"], float(m.get("timestamp") or now),
              json.dumps(m.get("tool_calls") or []), json.dumps(m.get("tool_results") or []),
              json.dumps(m["usage"]) if m.get("usage") is not None else None, m.get("finish_reason"),
              json.dumps(m.get("metadata") or {})) for m in fresh])
        conn.execute("UPDATE sessions SET message_count = message_count + ?, version = version + 1 WHERE id = ?",
                     (len(fresh), sid))

    store.transaction(apply)
    store._forget(sid)
    return store.get(sid)
