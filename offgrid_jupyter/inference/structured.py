"""Structured output: a reply constrained to JSON (any, or a JSON schema), parsed and checked.

Why a constraint and not a request in the prompt: a 135M model asked for JSON writes
almost-JSON; llama.cpp's grammars (built from the schema by llama-cpp-python's chat
handler) make every sampled token keep the reply valid, so even the default model's
replies parse. This module is the part that does not need llama.cpp:

- :func:`normalize` turns OpenAI's ``response_format`` forms (``json_object``,
  ``json_schema`` with ``{"name", "schema"}``) and llama-cpp-python's
  (``{"type": "json_object", "schema": S}``) into one form, ``{"type": "json_object"}``
  with an optional ``"schema"``, which every backend maps to what its engine takes.
- :class:`Shape` is what a notebook asks for (``--schema SPEC``): a pydantic model, a
  dataclass or ``TypedDict`` (through pydantic's ``TypeAdapter``), or a JSON-schema dict;
  it gives the schema to constrain with and turns the reply into the object (or a
  DataFrame of a list).
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..errors import InvalidRequestError, ReplyCutError, ReplyInvalidError, UnsupportedSchemaError

MAX_SCHEMA_BYTES = 64 * 1024
# llama-cpp-python's converter writes ``maxLength: N`` (and maxItems, minItems, minLength, a pattern's
# ``{m,n}``) as N nested grammar rules, and llama.cpp's grammar parser recurses once per level: a
# schema with maxLength 20,000 crashed the whole process (stack overflow), 12,000 made llama.cpp
# refuse the grammar. 1,000 levels parse in 4 ms even on a 512 KB thread stack (measured), so a
# count is bounded by MAX_REPEAT, and their sum over one schema by MAX_EXPANSION (the grammar's size).
MAX_REPEAT = 1000
MAX_EXPANSION = 4000
_COUNTS = ("maxLength", "minLength", "maxItems", "minItems")


def normalize(response_format: Any) -> dict[str, Any] | None:
    """``None`` (plain text) or ``{"type": "json_object"[, "schema": {...}]}``; else a 400 naming
    what was wrong."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise InvalidRequestError('response_format must be an object with a "type": "text", "json_object" '
                                  'or "json_schema".')
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidRequestError('response_format "json_schema" needs "json_schema": {"name": ..., '
                                      '"schema": {...}} (OpenAI\'s form).')
        schema = spec["schema"]
    else:
        raise InvalidRequestError(f'response_format type {kind[:40]!r} is not supported: use "text", '
                                  '"json_object" or "json_schema".')
    if schema is None:
        return {"type": "json_object"}
    if not isinstance(schema, dict):
        raise InvalidRequestError("response_format's schema must be a JSON object (a JSON schema).")
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise InvalidRequestError(f"response_format's schema is larger than {MAX_SCHEMA_BYTES // 1024} KB.")
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequestError(f"response_format's schema is not a valid JSON schema: {exc.message}") from None
    check_expressible(schema, "response_format's schema")
    check_bounds(schema, "response_format's schema")
    return {"type": "json_object", "schema": schema}


_NAMED = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")  # {name: schema}
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
        "unevaluatedItems", "unevaluatedProperties", "additionalItems")  # a schema
_MANY = ("anyOf", "oneOf", "allOf", "prefixItems")  # [schema, ...]


def check_expressible(schema: Any, what: str) -> None:
    """Refuse, naming it and where it is, what a grammar cannot enforce and llama-cpp-python's
    converter would ignore or fail on in its own words: a ``not`` (beside other keywords it was
    silently dropped), a ``$ref`` to a remote schema (offgrid works offline)."""
    todo: list[tuple[Any, str]] = [(schema, "")]
    while todo:
        node, where = todo.pop()
        if not isinstance(node, dict):
            continue
        if "not" in node:
            raise UnsupportedSchemaError(f"{what}: a \"not\" (at {_at(where)}) cannot be enforced while the reply is "
                                         "written (a grammar only says what may come next); drop it.")
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            raise UnsupportedSchemaError(f"{what}: the $ref {ref[:100]!r} (at {_at(where)}) points outside the schema, "
                                         "and offgrid fetches nothing: copy that schema under \"$defs\" and refer "
                                         "to it as \"#/$defs/NAME\".")
        for key, value in node.items():
            if key in _NAMED and isinstance(value, dict):
                todo.extend((v, f"{where}.{key}.{k}") for k, v in value.items())
            elif key in _ONE:
                todo.append((value, f"{where}.{key}"))
            elif key in _MANY and isinstance(value, list):
                todo.extend((v, f"{where}.{key}[{i}]") for i, v in enumerate(value))


def check_bounds(schema: Any, what: str, budget: int = MAX_EXPANSION) -> int:
    """Refuse a schema whose grammar would be too deep or too large for llama.cpp (see MAX_REPEAT):
    a 400 naming the keyword, where it is and the limit. Returns the schema's expansion (the sum of
    its counts), so several schemas that go into one grammar (tools) can share a budget.

    Iterative (a hostile schema cannot exhaust the stack here) and linear in the schema's size."""
    total = 0
    todo: list[tuple[Any, str]] = [(schema, "")]
    while todo:
        node, where = todo.pop()
        if isinstance(node, list):
            todo.extend((v, f"{where}[{i}]") for i, v in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            at = f"{where}.{key}" if len(where) < 200 else where
            if key in _COUNTS and isinstance(value, int) and not isinstance(value, bool):
                if value > MAX_REPEAT:
                    raise InvalidRequestError(
                        f"{what}: {key} {value} (at {_at(where)}) is above {MAX_REPEAT}, the limit a grammar can "
                        f"enforce (each one is a level of llama.cpp's grammar). Lower it, or drop {key}.")
                total += max(value, 0)
            elif key == "pattern" and isinstance(value, str):
                total += pattern_weight(value, f"{what}: the pattern at {_at(where)}")
            elif isinstance(value, (dict, list)) and key not in ("enum", "const", "examples", "default"):
                todo.append((value, at))
        if total > budget:
            raise InvalidRequestError(
                f"{what}: its lengths, item counts and pattern repetitions add up to {total} grammar levels; the "
                f"limit is {budget}. Lower maxLength/maxItems/minItems or the patterns' {{m,n}} counts.")
    return total


def _at(where: str) -> str:
    return "$" + where if where else "its top level"


_QUANTIFIER = re.compile(r"\{(\d{1,9})(?:,(\d{0,9}))?\}")


def pattern_weight(pattern: str, what: str) -> int:
    """How many grammar symbols llama-cpp-python's converter writes for *pattern*: each item once,
    an item repeated ``{m,n}`` max(m, n) times (a group's repetitions multiply its content). A count
    above MAX_REPEAT or a total above MAX_EXPANSION is a 400 (``(a{0,999}){0,999}`` would be a
    million nested rules). One pass over the pattern, never a regex engine run on it."""
    stack: list[list[int]] = [[0, 0]]  # per open group: [sum of its items, weight of its last item]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        frame = stack[-1]
        if c == "\\":
            frame[0] += 1
            frame[1] = 1
            i += 2
            continue
        if c == "[":  # a character class is one symbol
            j = i + 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            frame[0] += 1
            frame[1] = 1
            i = j + 1
            continue
        if c == "(":
            stack.append([0, 0])
        elif c == ")" and len(stack) > 1:
            inner = stack.pop()[0]
            stack[-1][0] += inner
            stack[-1][1] = inner
        elif c == "{":
            m = _QUANTIFIER.match(pattern, i)
            if m:
                count = max(int(m.group(1)), int(m.group(2) or 0))
                if count > MAX_REPEAT:
                    raise InvalidRequestError(f"{what} repeats something {count} times; the limit is {MAX_REPEAT}.")
                frame[0] += frame[1] * (count - 1)
                frame[1] *= count
                i = m.end()
                if frame[0] > MAX_EXPANSION:
                    break
                continue
            frame[0] += 1
            frame[1] = 1
        elif c in "|^$*+?":
            pass
        else:
            frame[0] += 1
            frame[1] = 1
        if frame[0] > MAX_EXPANSION:
            break
        i += 1
    total = sum(f[0] for f in stack)
    if total > MAX_EXPANSION:
        raise InvalidRequestError(f"{what} expands to more than {MAX_EXPANSION} grammar symbols (its repetitions "
                                  f"multiply); the limit is {MAX_EXPANSION}. Simplify it.")
    return total


def check_reply(text: str, finish_reason: str, response_format: dict[str, Any]) -> Any:
    """A constrained reply's JSON value, checked: cut by the token limit (ReplyCutError), not JSON
    or not matching the schema (ReplyInvalidError: numeric bounds and formats, which the grammar
    does not enforce, are checked here). A turn whose reply fails this is not kept."""
    if finish_reason == "length":
        raise ReplyCutError("The reply reached the token limit before its JSON was complete: raise -n (max tokens; "
                            "max_tokens over REST) and ask again. Nothing was stored.")
    try:  # strict=False: llama.cpp's JSON grammar lets a raw control character (a tab) into a string
        value = json.loads(text, strict=False)
    except ValueError as exc:
        raise ReplyInvalidError(f"The reply is not JSON ({exc}). Nothing was stored.") from None
    schema = (response_format or {}).get("schema")
    if schema is not None:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import best_match

        error = best_match(Draft202012Validator(schema).iter_errors(value))
        if error is not None:
            raise ReplyInvalidError(f"The reply does not match the schema: {error.message}. Nothing was stored.")
    return value


def openai_form(response_format: dict[str, Any] | None, style: str = "json_schema") -> dict[str, Any] | None:
    """The normalized form as an OpenAI-compatible engine takes it: OpenAI's ``json_schema``
    (OpenAI, vLLM, llama.cpp's server, Ollama), or with *style* ``"json_object"`` the
    ``{"type": "json_object", "schema"}`` form of llama-cpp-python's server."""
    if response_format is None:
        return None
    if "schema" not in response_format:
        return {"type": "json_object"}
    if style == "json_object":
        return {"type": "json_object", "schema": response_format["schema"]}
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": response_format["schema"]}}


class Shape:
    """What a cell asked the reply to be (``--schema SPEC``), and how to read the reply as it."""

    def __init__(self, spec: Any):
        self.spec = spec
        self.adapter = None  # a pydantic TypeAdapter, for classes
        if isinstance(spec, dict):
            self.schema = normalize({"type": "json_object", "schema": spec})["schema"]
        elif isinstance(spec, type) or getattr(spec, "__origin__", None) is not None:
            try:
                from pydantic import TypeAdapter
            except ImportError:  # pragma: no cover - pydantic ships with the test tools and most stacks
                raise InvalidRequestError("A class as --schema needs pydantic: pip install pydantic.") from None
            try:
                self.adapter = TypeAdapter(spec)
                self.schema = self.adapter.json_schema()
            except Exception as exc:  # noqa: BLE001 - pydantic's errors name the field
                raise InvalidRequestError(f"Cannot make a JSON schema of {_name(spec)}: {exc}") from None
        else:
            raise InvalidRequestError(f"--schema names {type(spec).__name__}, not a pydantic model, dataclass, "
                                      "TypedDict or JSON-schema dict.")

    @property
    def response_format(self) -> dict[str, Any]:
        return {"type": "json_object", "schema": self.schema}

    @property
    def is_list(self) -> bool:
        return self.schema.get("type") == "array"

    def parse(self, text: str, finish_reason: str) -> Any:
        """The reply as the object asked for: a pydantic instance (or list of them) for a class,
        plain JSON values for a dict schema, checked against the schema either way."""
        if self.adapter is None:
            return check_reply(text, finish_reason, self.response_format)
        value = check_reply(text, finish_reason, {"type": "json_object"})
        try:
            return self.adapter.validate_python(value)
        except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError names the fields
            raise ReplyInvalidError(f"The reply does not match {_name(self.spec)}: {exc}") from None

    def frame(self, value: Any):
        """A list reply as a DataFrame (one row per item, typed columns)."""
        import pandas as pd

        if not isinstance(value, list):
            raise InvalidRequestError("-f frame needs a list schema (e.g. list[Model] or {\"type\": \"array\"}).")
        rows = [v.model_dump() if hasattr(v, "model_dump") else _as_dict(v) for v in value]
        return pd.DataFrame.from_records(rows).convert_dtypes()


def _as_dict(value: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _name(spec: Any) -> str:
    return getattr(spec, "__name__", None) or repr(spec)[:80]
