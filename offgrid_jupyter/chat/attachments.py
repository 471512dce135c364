"""What a message carries besides its text: attached variables, cells and selections.

A user message keeps exactly what the person typed as its ``content``; what was attached to it
(``@df``, ``--context 3``, the sidebar's chips) is kept in its metadata as ``metadata.context``,
a list of ``{"kind", "name", "type", "text", "tokens"}``. The prompt is the two together
(``with_context``), for that turn and every later turn of the session, rendered the same way
each time so a session's KV cache stays reusable. The record of what the model was shown is
therefore exact: it is the metadata.

The attachments of one turn together fit a share of the model's context window (``fit``): kept
in priority order (variables and the selection first, then cells from the newest), each
possibly shortened, and a note (``metadata.context_note``) says what was cut or left out.

Token counts here are estimates (``estimate_tokens``): the kernel that describes a variable
may have no tokenizer (its model is on a server), so every surface counts the same way.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import InvalidRequestError
from ..validation import check_text

KINDS = ("variable", "cell", "selection")
MAX_ITEMS = 32
MAX_NAME = 200
MAX_TYPE = 100
SHARE = 0.5  # of the context window, for one turn's attachments together
ONE_SHOT_TOKENS = 2048  # where the model's window is not known (a one-shot turn sent to a server): half of 4,096
MIN_ITEM = 40  # tokens: an item shorter than this after cutting is left out instead
_TOKENS = re.compile(r"\d|[^\W\d_]{1,8}|[^\w\s]|_")


def estimate_tokens(text: str) -> int:
    """About how many tokens *text* is, on the high side for small models' tokenizers: a digit
    or a punctuation mark is one token, a word one per 8 letters, plus 10% (SmolLM2's tokenizer
    gave 181 tokens for a small DataFrame's description this counts as 180, 365 for a wide one's
    398)."""
    return math.ceil(len(_TOKENS.findall(text)) * 1.1)


def clip(text: str, max_tokens: int, *, keep: str = "head") -> str:
    """*text* cut to *max_tokens* (by estimate_tokens) at a line break where there is one,
    saying so; ``keep="tail"`` keeps the end (a traceback's last lines say the most)."""
    if estimate_tokens(text) <= max_tokens:
        return text
    note = f"… (cut to fit {max_tokens} tokens)"
    room = max_tokens - estimate_tokens(note) - 1
    lines = text.split("\n") if keep == "head" else text.split("\n")[::-1]
    kept: list[str] = []
    used = 0
    for line in lines:
        cost = estimate_tokens(line) + 1
        if used + cost > room:
            if not kept or room - used >= 15:  # room for a useful part of the line: cut inside it
                part = room - used - 1
                kept.append(_cut_line(line, part) + "…" if keep == "head" else "…" + _cut_line(line[::-1], part)[::-1])
            break
        kept.append(line)
        used += cost
    return "\n".join([*kept, note]) if keep == "head" else "\n".join([note, *kept[::-1]])


def _cut_line(line: str, room: int) -> str:
    lo, hi = 0, len(line)
    while lo < hi:  # the longest prefix within *room*
        mid = (lo + hi + 1) // 2
        if estimate_tokens(line[:mid]) <= room:
            lo = mid
        else:
            hi = mid - 1
    return line[:lo]


def check(items: Any, field: str = "context") -> list[dict[str, Any]]:
    """*items* as attachments, each checked (a 400 naming the field and the rule otherwise);
    ``tokens`` is recounted, never taken from the caller."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise InvalidRequestError(f"{field} must be a list of attachments ({{kind, name, text, type?}}).")
    if len(items) > MAX_ITEMS:
        raise InvalidRequestError(f"{field} has {len(items)} attachments; at most {MAX_ITEMS} go with one message.")
    out = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{where} must be an object {{kind, name, text, type?}}.")
        kind = item.get("kind")
        if kind not in KINDS:
            raise InvalidRequestError(f"{where}.kind must be one of {', '.join(KINDS)} (got {str(kind)[:40]!r}).")
        name, text, typ = item.get("name"), item.get("text"), item.get("type")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or "\n" in name:
            raise InvalidRequestError(f"{where}.name must be one line of 1-{MAX_NAME} characters (the variable's "
                                      "name, or the cell's label).")
        check_text(name, f"{where}.name")
        check_text(text, f"{where}.text")
        if not text.strip():
            raise InvalidRequestError(f"{where}.text is empty: attach what the model should read.")
        if typ is not None and (not isinstance(typ, str) or len(typ) > MAX_TYPE):
            raise InvalidRequestError(f"{where}.type must be text of at most {MAX_TYPE} characters.")
        if typ is not None:
            check_text(typ, f"{where}.type")
        out.append({"kind": kind, "name": name, "type": typ or kind, "text": text, "tokens": estimate_tokens(text)})
    return out


def fit(items: list[dict[str, Any]], budget: int) -> tuple[list[dict[str, Any]], str | None]:
    """The attachments within *budget* tokens together, in their own order, and a note saying
    what was cut or left out (None when all fit). Variables and selections are kept first, then
    cells from the newest; the item at the boundary is shortened if a useful part fits."""
    def priority(i: int) -> tuple[int, int]:
        return (1, -i) if items[i]["kind"] == "cell" else (0, i)

    left = budget
    kept: dict[int, dict[str, Any]] = {}
    cut, dropped = [], []
    for i in sorted(range(len(items)), key=priority):
        item = items[i]
        if item["tokens"] <= left:
            kept[i] = item
            left -= item["tokens"]
        elif left >= MIN_ITEM:
            text = clip(item["text"], left, keep="tail" if item["kind"] == "cell" else "head")
            kept[i] = {**item, "text": text, "tokens": estimate_tokens(text)}
            left -= kept[i]["tokens"]
            cut.append(label(item))
        else:
            dropped.append(label(item))
    note = None
    if cut or dropped:
        parts = ([f"cut: {', '.join(cut)}"] if cut else []) + ([f"left out: {', '.join(dropped)}"] if dropped else [])
        note = f"attachments fitted to {budget:,} tokens ({'; '.join(parts)})"
    return [kept[i] for i in sorted(kept)], note


def label(item: dict[str, Any]) -> str:
    """How an attachment is named to a person: ``@df``, ``cell In[3]``, ``selection``."""
    if item["kind"] == "variable":
        return f"@{item['name']}"
    return f"cell {item['name']}" if item["kind"] == "cell" else f"selection {item['name']}"


def chip(item: dict[str, Any]) -> str:
    """One line for a collapsed attachment: ``@df · DataFrame · 312 tokens``."""
    return f"{label(item)} · {item.get('type') or item['kind']} · {item.get('tokens', 0):,} tokens"


def with_context(content: str, items: list[dict[str, Any]] | None) -> str:
    """The user message as the model reads it: the attachments, then what the person wrote."""
    if not items:
        return content
    blocks = []
    for item in items:
        blocks.append(f"### {label(item)} ({item.get('type') or item['kind']})\n{item['text']}")
    return "Attached context:\n\n" + "\n\n".join(blocks) + "\n\n---\n\n" + content


def stored_context(metadata: Any) -> list[dict[str, Any]]:
    """A stored message's attachments, as far as they are well-formed (an imported or old
    message's metadata is whatever was written: a malformed item is not shown to the model)."""
    items = metadata.get("context") if isinstance(metadata, dict) else None
    if not isinstance(items, list):
        return []
    return [i for i in items if isinstance(i, dict) and i.get("kind") in KINDS and isinstance(i.get("name"), str)
            and isinstance(i.get("text"), str)]


def inline(content: str, items: Any, budget: int = ONE_SHOT_TOKENS) -> str:
    """A one-shot message (nothing stored) with its attachments checked, fitted and put in it."""
    return with_context(content, fit(check(items), budget)[0])
