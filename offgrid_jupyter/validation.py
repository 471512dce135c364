"""Checks on values that come from outside: request bodies, names, texts, metadata.

Every surface (REST routes, magics, the panel, the SDK's server) ends in the
store or the engine, and both must refuse what they cannot keep or read back:

- a string with a lone surrogate (``"\\ud800"``) cannot be encoded as UTF-8, so
  SQLite and llama.cpp would fail on it later, far from the cause;
- JSON nested hundreds of levels deep can be stored but not read back or
  listed (Python's JSON codec recurses), so nesting is bounded on the way in;
- NaN and Infinity are not JSON (Python's ``json`` accepts them by default).

Each check raises :class:`~offgrid_jupyter.errors.InvalidRequestError` naming the
field and the rule, so the caller gets a 400 / one line, and nothing is stored.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import InvalidNameError, InvalidRequestError

MAX_JSON_DEPTH = 32  # objects/arrays inside each other, counting the outermost
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# names of sessions, collections and profiles; always used with fullmatch() ("$" alone would also
# match before a trailing newline)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SESSION_ID_RE = re.compile(r"session-[0-9a-f]{12}")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def check_name(name: Any, what: str = "session name") -> str:
    """A session's (collection's, profile's) name: ``NAME_RULE``, and not one that looks like a
    session id; else a 400 saying what a name may contain."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = ascii(name) if isinstance(name, str) else repr(name)
        raise InvalidNameError(f"Invalid {what} {shown[:80]}: use {NAME_RULE}.")
    if SESSION_ID_RE.fullmatch(name):
        raise InvalidNameError(f"Invalid {what} {name!r}: names may not look like session ids.")
    return name


def check_text(value: Any, field: str) -> str:
    """*value* must be a string that UTF-8 can encode (no lone surrogates)."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{field} must be a string, got {type(value).__name__}.")
    match = _SURROGATE.search(value)
    if match:
        raise InvalidRequestError(
            f"{field} contains a lone surrogate (U+{ord(match.group()):04X}) at character {match.start()}, "
            "which is not valid Unicode text. Send UTF-8 text.")
    return value


def check_json(value: Any, field: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """*value* must be plain JSON (dict/list/str/int/float/bool/None), at most *max_depth*
    containers deep, with finite numbers and encodable strings (keys included).

    Iterative, so a hostile value cannot exhaust the stack while being checked."""
    todo: list[tuple[Any, int, str]] = [(value, 1, field)]
    while todo:
        item, depth, where = todo.pop()
        if isinstance(item, str):
            check_text(item, where)
        elif isinstance(item, bool) or item is None or isinstance(item, int):
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidRequestError(f"{where} is {item}, which is not a JSON number.")
        elif isinstance(item, (dict, list)):
            if depth > max_depth:
                raise InvalidRequestError(
                    f"{field} is nested more than {max_depth} levels deep (at {where}); "
                    f"the limit is {max_depth}. Flatten it.")
            if isinstance(item, dict):
                for key, sub in item.items():
                    if not isinstance(key, str):
                        raise InvalidRequestError(f"{where} has a non-string key {key!r}.")
                    check_text(key, f"a key of {where}")
                    todo.append((sub, depth + 1, f"{where}.{key}" if len(where) < 200 else where))
            else:
                todo.extend((sub, depth + 1, f"{where}[{i}]" if len(where) < 200 else where)
                            for i, sub in enumerate(item))
        else:
            raise InvalidRequestError(f"{where} must be JSON (object, array, string, number, true/false or "
                                      f"null), got {type(item).__name__}.")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes | str, what: str = "The request body") -> Any:
    """Strict JSON: no NaN/Infinity, bounded nesting, encodable strings; errors are 400s."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequestError(f"{what} is nested too deeply; the limit is {MAX_JSON_DEPTH} levels.") from None
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}.") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers with too many digits
        raise InvalidRequestError(f"{what} is not valid JSON: {exc}.") from None
    return check_json(value, "body" if what == "The request body" else what)
