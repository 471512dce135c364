"""``openapi.json`` is the contract, and the server enforces it.

Request bodies are validated against the very schemas the document publishes
(JSON Schema 2020-12, which OpenAPI 3.1 uses, checked by the ``jsonschema``
library), so the document cannot allow what the server rejects or the reverse;
``tests/test_reliability.py`` runs schemathesis against the live document to keep
the responses honest too.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib.resources import files
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from ..errors import InvalidRequestError

MESSAGE_LIMIT = 300  # characters of a validation message (they may quote the offending value)


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    return json.loads(files(__package__).joinpath("openapi.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _validator(path: str, method: str) -> Draft202012Validator:
    doc = document()
    schema = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return Draft202012Validator({**schema, "components": doc["components"]})


@lru_cache(maxsize=None)
def _integer_fields(path: str, method: str) -> frozenset[str]:
    doc = document()
    schema = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return frozenset(name for name, prop in schema.get("properties", {}).items()
                     if "integer" in (prop.get("type") if isinstance(prop.get("type"), list) else [prop.get("type")]))


# what each pattern of the document asks for, in words (a raw regular expression is no error message)
PATTERN_RULES = {
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$": "a name may contain 1-64 letters, digits, '.', '_' or '-', and starts "
                                         "with a letter or digit",
    r"^session-[0-9a-f]{12}$": "a session id looks like session- and 12 hexadecimal digits",
    r"^msg-[0-9a-f]{12}$": "a message id looks like msg- and 12 hexadecimal digits",
    r"^[A-Za-z_][A-Za-z0-9_]{0,63}$": "a tool's name is an identifier: letters, digits and '_', at most 64",
    r"^[^\u0000]*\S[^\u0000]*$": "it must hold something other than spaces, and no NUL character",
    r"\S": "it must hold something other than spaces",
    r"^[\x21-\x7e]+$": "it may hold printable ASCII characters only",
}


def _message(error: Any) -> str:
    if error.validator == "pattern" and error.validator_value in PATTERN_RULES:
        shown = repr(error.instance) if len(repr(error.instance)) <= 80 else repr(error.instance)[:77] + "…"
        return f"{shown} is not allowed: {PATTERN_RULES[error.validator_value]}"
    return error.message


def check_body(path: str, method: str, data: Any) -> dict[str, Any]:
    """*data* as the document's request body schema for (*path*, *method*) allows, else a 400
    naming where and what. Then ``null`` fields are dropped (they mean "the default") and
    integers written as ``5.0`` (JSON Schema's integers include them) become ``5``."""
    error = best_match(_validator(path, method).iter_errors(data))
    if error is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        message = _message(error)
        message = message if len(message) <= MESSAGE_LIMIT else message[:MESSAGE_LIMIT] + "…"
        raise InvalidRequestError(f"Invalid request body at ${where}: {message}.")
    integers = _integer_fields(path, method)
    return {k: int(v) if k in integers and isinstance(v, float) else v for k, v in data.items() if v is not None}


def body_required(path: str, method: str) -> bool:
    """Whether the document says (*path*, *method*) must be sent a body."""
    return bool(document()["paths"][path][method].get("requestBody", {}).get("required"))


@lru_cache(maxsize=None)
def query_names(path: str, method: str) -> frozenset[str]:
    """The query parameters the document gives (*path*, *method*)."""
    op = document()["paths"].get(path, {}).get(method, {})
    return frozenset(p["name"] for p in op.get("parameters", []) if p.get("in") == "query")


def paths() -> list[str]:
    """Every path the document gives (``/sessions/{ref}``...), longest first, so a URL table
    built from them matches a specific route before a general one."""
    return sorted(document()["paths"], key=lambda p: (-p.count("/"), p))


def url_pattern(path: str) -> str:
    """*path*'s ``{name}`` parameters as tornado's URL groups (one path segment each)."""
    return re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)


def methods(path: str) -> list[str]:
    """The HTTP methods the document gives *path* (for 405's Allow header)."""
    ops = document()["paths"].get(path, {})
    return sorted(m.upper() for m in ops if m != "parameters")


def served(base_url: str) -> dict[str, Any]:
    """The document as served: with this server's base URL."""
    doc = json.loads(json.dumps(document()))  # a copy
    doc["servers"] = [{"url": base_url.rstrip("/") + "/offgrid/v1"}]
    return doc
