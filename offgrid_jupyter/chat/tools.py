"""Tools: the user's own Python functions offered to the model.

A tool is a typed Python function. :func:`tool` reads its name, docstring and type hints;
pydantic turns the hints into the JSON schema the model is shown and validates the arguments
the model sends before the function runs (pydantic models are fine as parameters). A function
that raises hands its error to the model as the result, and the turn goes on.
:func:`resolve` finds tools by name (a notebook's functions, then every ``@tool`` of the process),
:func:`load` the server's configured ones. How calls are offered and read is the protocol's
(``inference/toolcalls.py``); how a turn runs them, the rounds' (``chat/rounds.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import threading
import time
import typing
from typing import Any, Callable

from ..errors import InvalidRequestError, UnknownToolError
from ..inference.toolcalls import MAX_TOOLS, _one_line, check_name, inline_refs

MAX_RESULT_CHARS = 4000  # a tool's result as the model sees it (the context is small)


REGISTRY: dict[str, "Tool"] = {}  # every @tool of this process, by name


_registry_lock = threading.Lock()


# -- a Python function as a tool --------------------------------------------------------------
class Tool:
    """A typed function the model may call. Calling the Tool calls the function."""

    def __init__(self, fn: Callable, *, name: str | None = None, description: str | None = None):
        if not callable(fn):
            raise InvalidRequestError(f"A tool must be a function, got {type(fn).__name__}.")
        self.fn = fn
        self.name = check_name(name or getattr(fn, "__name__", ""))
        self.description = " ".join((description or inspect.getdoc(fn) or "").split())[:1000]
        self._positional, self._model = _arguments_model(fn, self.name)
        self.parameters = _schema_of(self._model, self.name)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<offgrid tool {self.name}{inspect.signature(self.fn)}>"

    def spec(self) -> dict[str, Any]:
        """The tool in OpenAI's ``tools`` form."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def run(self, arguments: Any) -> dict[str, Any]:
        """Validate *arguments* and call the function: ``{result, error, value, duration_ms}``
        (``result`` is the text the model sees; an error is returned, not raised)."""
        start = time.monotonic()
        value, error = None, None
        try:
            checked = self._model.model_validate(arguments if isinstance(arguments, dict) else {})
        except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError names each field
            error = f"invalid arguments for {self.name}: {_one_line(exc)}"
        else:
            values = {k: getattr(checked, k) for k in type(checked).model_fields}
            args = [values.pop(k) for k in self._positional]
            try:
                value = self.fn(*args, **values)
            except Exception as exc:  # noqa: BLE001 - the model is told, the turn goes on
                error = f"{type(exc).__name__}: {exc}"
        text = f"Error: {error}" if error else result_text(value)
        return {"result": text, "error": error, "value": value,
                "duration_ms": round((time.monotonic() - start) * 1000, 3)}


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None):
    """Make a typed function a tool the model may call, and register it by name.

    ``@tool`` or ``@tool(name="...", description="...")``; the description defaults to
    the docstring. ``%%offgrid --tools NAME`` (or a profile) offers it."""
    def make(f: Callable) -> Tool:
        t = f if isinstance(f, Tool) and name is None and description is None else Tool(
            getattr(f, "fn", f), name=name, description=description)
        with _registry_lock:
            REGISTRY[t.name] = t
        return t

    return make(fn) if fn is not None else make


def _arguments_model(fn: Callable, name: str):
    """The pydantic model of *fn*'s parameters (and the names passed positionally)."""
    from pydantic import ConfigDict, create_model

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"Cannot read the parameters of {name}: {exc}.") from None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - a hint naming something undefined: use the raw annotations
        hints = {}
    fields: dict[str, Any] = {}
    positional = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue  # *args/**kwargs cannot be described to the model
        if p.name.startswith("_") or p.name.startswith("model_"):
            raise InvalidRequestError(f"Tool {name}: parameter {p.name!r} cannot be offered (names starting with "
                                      "'_' or 'model_' are reserved by pydantic); rename it.")
        annotation = hints.get(p.name, p.annotation if p.annotation is not p.empty else Any)
        fields[p.name] = (annotation, ... if p.default is p.empty else p.default)
        if p.kind is p.POSITIONAL_ONLY:
            positional.append(p.name)
    try:
        model = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    except Exception as exc:  # noqa: BLE001 - pydantic names the field and the type
        raise InvalidRequestError(f"Tool {name}: its type hints cannot be checked: {_one_line(exc)}") from None
    return positional, model


def _schema_of(model: Any, name: str) -> dict[str, Any]:
    try:
        schema = model.model_json_schema()
    except Exception as exc:  # noqa: BLE001 - e.g. a parameter typed as a DataFrame
        raise InvalidRequestError(f"Tool {name}: no JSON schema for its parameters ({_one_line(exc)}); use JSON-like "
                                  "types (str, int, float, bool, list, dict, Literal, pydantic models).") from None
    return inline_refs(schema, name)


def result_text(value: Any) -> str:
    """A tool's return value as the text the model reads (bounded)."""
    if isinstance(value, str):
        text = value
    elif hasattr(value, "model_dump_json"):
        text = value.model_dump_json()
    elif hasattr(value, "to_string") and callable(value.to_string):  # pandas
        text = value.to_string(max_rows=20, max_cols=12)
    else:
        try:
            text = json.dumps(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value,
                              ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = repr(value)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"… ({len(text) - MAX_RESULT_CHARS} more characters cut)"
    return text


# -- finding tools by name ------------------------------------------------------------------------
def resolve(names: list[str], namespace: dict[str, Any] | None = None,
            registry: dict[str, Tool] | None = None) -> list[Tool]:
    """The tools *names* name: from *namespace* (a notebook's variables: Tools or plain typed
    functions), else from *registry* (default: every ``@tool`` of this process)."""
    registry = REGISTRY if registry is None else registry
    out = []
    for name in names:
        found = (namespace or {}).get(name)
        if isinstance(found, Tool) or (callable(found) and inspect.isroutine(found)):
            out.append(found if isinstance(found, Tool) and found.name == name else Tool(found, name=name))
        elif name in registry:
            out.append(registry[name])
        else:
            known = sorted(set(registry) | {k for k, v in (namespace or {}).items() if isinstance(v, Tool)})
            raise UnknownToolError(f"No tool {str(name)[:80]!r}: define a function of that name (or decorate it "
                                   f"with @offgrid_jupyter.tool). Known tools: {', '.join(known) or 'none'}.")
    if len(out) > MAX_TOOLS:
        raise InvalidRequestError(f"At most {MAX_TOOLS} tools can be offered at once.")
    return out


def load(paths: list[str]) -> dict[str, Tool]:
    """``["package.module:function", ...]`` (server configuration) as tools by name."""
    out: dict[str, Tool] = {}
    for path in paths:
        module, _, attr = str(path).partition(":")
        if not module or not attr:
            raise InvalidRequestError(f"Tool {path!r} must be written 'package.module:function'.")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise InvalidRequestError(f"Tool {path!r} cannot be imported: {exc}.") from None
        t = obj if isinstance(obj, Tool) else Tool(obj)
        out[t.name] = t
    return out
