"""What the store keeps, as Python values: a session, a message, their ids, and the checks on them.

Shared by the store, export/import and every surface that shows a conversation, so none of
them needs the store itself to read one.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InvalidRequestError
from ..validation import NAME_RE, SESSION_ID_RE
from .attachments import stored_context, with_context

MESSAGE_ID_RE = re.compile(r"msg-[0-9a-f]{12}")


ROLES = ("system", "user", "assistant", "tool")


TITLE_LEN = 50


def new_session_id() -> str:
    return "session-" + uuid.uuid4().hex[:12]


def new_message_id() -> str:
    return "msg-" + uuid.uuid4().hex[:12]


def check_times(doc: dict, *keys: str) -> None:
    for key in keys:
        value = doc.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value < 1e11):
            raise InvalidRequestError(f"{key} must be a time in epoch seconds, got {value!r}.")


_MARKUP = re.compile(r"`+|\*\*|__|^#+\s+|!?\[([^\]]*)\]\([^)]*\)")


def make_title(content: str) -> str:
    """A session's title: its first question on one line, without Markdown's marks (a list of
    sessions shows text, not backticks), cut at TITLE_LEN characters."""
    text = " ".join(_MARKUP.sub(lambda m: m.group(1) or "", content.strip()).split())
    return text if len(text) <= TITLE_LEN else text[:TITLE_LEN] + "…"


@dataclass
class Message:
    id: str
    session_id: str
    role: str
    content: str
    timestamp: float
    tool_calls: list = field(default_factory=list)
    tool_results: list = field(default_factory=list)
    usage: dict | None = None
    finish_reason: str | None = None
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def interrupted(self) -> bool:
        """A question left unanswered by a process that died (see ``Store.repair``)."""
        return self.role == "user" and bool(self.metadata.get("interrupted"))


@dataclass
class Session:
    id: str
    name: str | None
    title: str | None
    system_prompt: str | None
    profile: str | None
    model: str | None
    created_at: float
    updated_at: float
    last_access_at: float
    ended: bool
    metadata: dict
    message_count: int
    messages: list[Message] | None = None

    def to_dict(self, messages: bool = True) -> dict[str, Any]:
        out = asdict(self)
        out["messages"] = [m.to_dict() for m in self.messages] if (messages and self.messages is not None) else None
        if not messages:
            out.pop("messages")
        return out

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation for the engine, system prompt first, in OpenAI's shapes: a stored
        tool message (a call and its result, see rounds.py) is the assistant's call followed
        by the ``tool`` message the model read."""
        out: list[dict[str, Any]] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for m in self.messages or []:
            if m.interrupted:  # a question whose process died is not history
                continue
            call = m.metadata.get("tool_call") if m.role == "tool" else None
            if isinstance(call, dict) and isinstance(call.get("name"), str):
                call_id = str(call.get("id") or m.id)
                out.append({"role": "assistant", "content": "", "tool_calls": [{
                    "id": call_id, "type": "function",
                    "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments") or {})}}]})
                out.append({"role": "tool", "tool_call_id": call_id, "content": m.content})
            elif m.role == "user":  # with what was attached to it (chat/attachments.py)
                out.append({"role": "user", "content": with_context(m.content, stored_context(m.metadata))})
            else:
                out.append({"role": m.role, "content": m.content})
        return out

