"""Tools: the user's own Python functions offered to the model, and the rounds of a turn that calls them.

Why it is built this way:

- A tool is a typed Python function. :func:`tool` reads its name, docstring and
  type hints; pydantic turns the hints into the JSON schema the model is shown and
  validates the arguments the model sends before the function runs (pydantic models
  are fine as parameters).
- The model is not trusted to *write* a call. The engine constrains decoding with a
  llama.cpp grammar built from the offered tools' schemas (:func:`call_schema`), so a
  reply is either plain text (the final answer) or one well-formed call of an offered
  tool; even the 135M default model then makes calls that parse and validate. An
  OpenAI-compatible engine gets the same tools in its own ``tools``/``tool_choice``.
- A turn that offers tools runs *rounds* (:class:`Rounds`): generate; if the reply is a
  call, run the function where the turn's consumer runs (in the kernel for a cell or
  the panel, on the server for a server tool), append the call and its result, and
  generate again, until a final answer or ``max_rounds``. A tool that raises hands its
  error to the model as the result, and the turn goes on. To the magic, the panel and
  the server's routes the rounds are one generation with the usual contract (events,
  batches, aevents, wait, cancel, listen) plus ``round_start``/``tool_start``/``tool_end``
  events, so none of them needs to know.

Messages use OpenAI's shapes throughout (an assistant message with ``tool_calls``, then
a ``tool`` message with ``tool_call_id``); :func:`for_template` renders them as text for a
local chat template, exactly as the local model wrote and read them.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import importlib
import inspect
import json
import re
import threading
import time
import typing
import uuid
from typing import Any, Callable, Iterator

from ..errors import InvalidRequestError, InvalidToolsError, UnknownToolError
from .structured import MAX_EXPANSION, check_bounds

MAX_TOOLS = 64
MAX_TOOL_BYTES = 16 * 1024  # one tool's parameter schema, as JSON: every tool goes into the prompt and one grammar
MAX_TOOLS_BYTES = 64 * 1024  # all of a request's tools (60 tools of 29 KB each took 11 s to check and convert)
MAX_SCHEMA_NODES = 20_000  # a schema with its references inlined (references can nest exponentially)
MAX_RESULT_CHARS = 4000  # a tool's result as the model sees it (the context is small)
MAX_ROUNDS_LIMIT = 32
CHOICES = ("auto", "none", "required")

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


NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # always fullmatch()


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidRequestError(f"Tool name {str(name)[:80]!r} must be an ASCII identifier of at most 64 characters "
                                  "(letters, digits, _).")
    return name


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


def inline_refs(schema: dict[str, Any], name: str = "the schema") -> dict[str, Any]:
    """*schema* with local ``$ref``s replaced by what they name and titles dropped (the
    grammar converter resolves references against the whole grammar's root, and titles
    only lengthen the prompt). A recursive type is refused."""
    defs = schema.get("$defs") or schema.get("definitions") or {}
    nodes = 0

    def visit(node: Any, seen: tuple[str, ...]) -> Any:
        nonlocal nodes
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise InvalidToolsError(f"{name}: with its references written out, the schema has more than "
                                    f"{MAX_SCHEMA_NODES:,} parts; simplify it.")
        if isinstance(node, list):
            return [visit(v, seen) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str):
            key = ref.rsplit("/", 1)[-1]
            if not ref.startswith("#/") or key not in defs:
                raise InvalidToolsError(f"{name}: the reference {ref[:80]!r} is not a local definition.")
            if key in seen:
                raise InvalidToolsError(f"{name}: the type {key!r} contains itself; recursive types cannot be "
                                        "offered to the model.")
            merged = {**defs[key], **{k: v for k, v in node.items() if k != "$ref"}}
            return visit(merged, seen + (key,))
        return {k: visit(v, seen) for k, v in node.items()
                if k not in ("$defs", "definitions", "title") or not isinstance(v, (dict, str))}

    return visit(copy.deepcopy(schema), ())


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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


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


# -- what the engine needs: checked specs, the call schema, prompts ----------------------------------
def check_tools(tools: Any, tool_choice: Any) -> tuple[list[dict] | None, Any]:
    """OpenAI's ``tools`` and ``tool_choice`` checked (a 400 naming what is wrong) and normalized:
    specs as ``{"type": "function", "function": {name, description, parameters}}``; the choice as
    "auto", "none", "required" or ``{"type": "function", "function": {"name": N}}``."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidToolsError("tool_choice needs tools to choose from.")
        return None, None
    if not isinstance(tools, list) or not tools:
        raise InvalidRequestError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}.")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequestError(f"At most {MAX_TOOLS} tools can be offered at once, got {len(tools)}.")
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    specs, names = [], set()
    size, budget = 0, MAX_EXPANSION
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict):
            raise InvalidRequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{name, "
                                      "description, parameters}}}.")
        name = check_name(fn.get("name"))
        if name in names:
            raise InvalidToolsError(f"tools[{i}]: the name {name!r} is offered twice; tool names must differ.")
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        description = fn.get("description") or ""
        if not isinstance(params, dict) or not isinstance(description, str):
            raise InvalidRequestError(f"tools[{i}] ({name}): parameters must be a JSON schema object and "
                                      "description a string.")
        one = len(json.dumps(params, ensure_ascii=False))
        size += one + len(description[:1000])
        if one > MAX_TOOL_BYTES:
            raise InvalidRequestError(f"tools[{i}] ({name}): its parameters are {one:,} characters of JSON schema; "
                                      f"the limit is {MAX_TOOL_BYTES:,} per tool. Describe fewer or simpler parameters.")
        if size > MAX_TOOLS_BYTES:
            raise InvalidRequestError(f"The tools' descriptions and parameters add up to more than {MAX_TOOLS_BYTES:,} "
                                      "characters; offer fewer tools (each one is in every prompt).")
        try:
            Draft202012Validator.check_schema(params)
        except SchemaError as exc:
            raise InvalidToolsError(f"tools[{i}] ({name}): parameters is not a valid JSON schema: "
                                    f"{exc.message[:200]}") from None
        inlined = inline_refs(params, f"tools[{i}] ({name})")
        budget -= check_bounds(inlined, f"tools[{i}] ({name})", budget)
        specs.append({"type": "function", "function": {"name": name, "description": description[:1000],
                                                       "parameters": inlined}})
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, str) and choice not in CHOICES:
        choice = {"type": "function", "function": {"name": choice}}  # offgrid's shorthand: a tool's name
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if name not in names:
            raise InvalidToolsError(f"tool_choice names {str(name)[:80]!r}, which is not among the tools "
                                    f"({', '.join(sorted(names))}).")
        choice = {"type": "function", "function": {"name": name}}
    elif choice not in CHOICES:
        raise InvalidRequestError('tool_choice must be "auto", "none", "required", a tool\'s name, or '
                                  '{"type": "function", "function": {"name": ...}}.')
    return specs, choice


def offered(specs: list[dict], choice: Any) -> list[dict]:
    """The specs a reply may call under *choice*."""
    if choice == "none":
        return []
    if isinstance(choice, dict):
        return [s for s in specs if s["function"]["name"] == choice["function"]["name"]]
    return specs


def call_schema(specs: list[dict]) -> dict[str, Any]:
    """The JSON schema of one call of one of *specs*: ``{"name": N, "arguments": {...}}``."""
    alternatives = [{"type": "object", "properties": {"name": {"const": s["function"]["name"]},
                                                      "arguments": s["function"]["parameters"]},
                     "required": ["name", "arguments"], "additionalProperties": False} for s in specs]
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def instructions(specs: list[dict], choice: Any) -> str:
    """What a local model is told about the tools (in its system prompt)."""
    lines = ["You can call tools. To call one, reply with only a JSON object "
             '{"name": TOOL, "arguments": {...}}. Otherwise answer in plain text.', "Tools:"]
    for s in specs:
        f = s["function"]
        lines.append(f"- {f['name']}: {f['description'] or '(no description)'} "
                     f"Parameters: {json.dumps(f['parameters'], ensure_ascii=False)}")
    return "\n".join(lines)


def for_template(messages: list[dict], tool_prompt: str | None = None) -> list[dict]:
    """OpenAI-shaped messages as plain ``{role, content}`` for a local chat template: a call is
    the JSON the model wrote, a result is a ``tool`` message with the text the model read;
    *tool_prompt* joins the system prompt (or becomes one)."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)}, ensure_ascii=False)
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [m.get("content") or "", *calls]))})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tool_prompt:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + tool_prompt}
        else:
            out.insert(0, {"role": "system", "content": tool_prompt})
    return out


def _arguments(call: dict) -> Any:
    raw = call["function"].get("arguments")
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def parse_call(text: str, specs: list[dict]) -> dict[str, Any] | None:
    """The call a reply makes (``{"id", "name", "arguments"}``), or None for a plain answer."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    names = {s["function"]["name"] for s in specs}
    if (isinstance(value, dict) and set(value) == {"name", "arguments"} and value["name"] in names
            and isinstance(value["arguments"], dict)):
        return {"id": new_call_id(), "name": value["name"], "arguments": value["arguments"]}
    return None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:16]


def openai_call(call: dict[str, Any]) -> dict[str, Any]:
    """``{"id", "name", "arguments"}`` in OpenAI's message form."""
    return {"id": call["id"], "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def check_tool_messages(i: int, m: dict) -> dict[str, Any]:
    """One message of a request with its tool fields checked (OpenAI's shapes)."""
    role = m["role"]
    content = m.get("content")
    if role == "assistant" and m.get("tool_calls") is not None:
        calls = m["tool_calls"]
        if not isinstance(calls, list) or not calls:
            raise InvalidRequestError(f"messages[{i}].tool_calls must be a non-empty list.")
        checked = []
        for j, c in enumerate(calls):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("arguments", "{}"), (str, dict)):
                raise InvalidRequestError(f"messages[{i}].tool_calls[{j}] must be {{id, type: \"function\", "
                                          "function: {name, arguments}}.")
            check_name(fn.get("name"))
            args = fn.get("arguments", "{}")
            checked.append({"id": str(c.get("id") or new_call_id())[:80], "type": "function",
                            "function": {"name": fn["name"],
                                         "arguments": args if isinstance(args, str) else json.dumps(args)}})
        if content is not None and not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string or null.")
        return {"role": "assistant", "content": content or "", "tool_calls": checked}
    if content is not None and not isinstance(content, str):
        raise InvalidRequestError(f"messages[{i}].content must be a string (or null).")
    out = {"role": role, "content": content or ""}
    if role == "tool" and m.get("tool_call_id") is not None:
        if not isinstance(m["tool_call_id"], str):
            raise InvalidRequestError(f"messages[{i}].tool_call_id must be a string.")
        out["tool_call_id"] = m["tool_call_id"][:80]
    return out


# -- the rounds of a turn -----------------------------------------------------------------------------
def call_label(name: str, arguments: Any) -> str:
    """``add(a=2, b=3)``, for a status line or a collapsed call line."""
    if isinstance(arguments, dict):
        inner = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())
    else:
        inner = json.dumps(arguments, ensure_ascii=False)
    label = f"{name}({inner})"
    return label if len(label) <= 120 else label[:117] + "…)"


class Rounds:
    """A turn's rounds as one generation (see the module docstring).

    Construct it with the first round's messages; it queues round 1 at once. Its consumer
    (events, batches, aevents, wait or wait_async) drives it: when a round ends with a call,
    the consumer's thread runs the tool (the async consumer runs it on *executor*), then
    the next round is queued. ``calls`` lists what ran; ``steps`` the assistant/tool
    message pairs the model saw, for the store."""

    def __init__(self, backend: Any, messages: list[dict], tools: list[Tool], *, tool_choice: Any = "auto",
                 max_rounds: int = 4, session_id: str | None = None, source: str = "api",
                 model: str | None = None, params: dict[str, Any] | None = None, executor: Any = None):
        if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or not 1 <= max_rounds <= MAX_ROUNDS_LIMIT:
            raise InvalidRequestError(f"max_rounds must be an integer from 1 to {MAX_ROUNDS_LIMIT}, got {max_rounds!r}.")
        self.backend = backend
        self.tools = {t.name: t for t in tools}
        self.specs, self.choice = check_tools([t.spec() for t in tools], tool_choice)
        self.max_rounds = max_rounds
        self.messages = list(messages)
        self.session_id, self.source, self.model_name = session_id, source, model
        self.params = {k: v for k, v in (params or {}).items() if k not in ("tools", "tool_choice")}
        self.executor = executor
        self.calls: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.results: list[Any] = []
        self.result: Any = None
        self.note: str | None = None
        self.round = 0
        self.started_mono = time.monotonic()
        self._cancel = threading.Event()
        from .backend import Listeners

        self._listeners = Listeners()
        self._announced = 0  # rounds whose round_start was emitted
        self.gen = self._queue_round()
        self.request_id = self.gen.request_id
        self.model = self.gen.model

    # -- what consumers read -----------------------------------------------------------------
    @property
    def state(self) -> str:
        return "done" if self.result is not None else self.gen.state

    @property
    def position(self) -> int:
        return self.gen.position

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop: the round generating stops within a token, no further round starts."""
        self._cancel.set()
        self.gen.cancel()

    def listen(self, callback: Callable[[str, Any], None]) -> Callable[[], None]:
        return self._listeners.add(callback)

    # -- the rounds ------------------------------------------------------------------------------
    def _queue_round(self):
        self.round += 1
        choice = self.choice if self.round == 1 or self.choice in ("auto", "none") else "auto"
        gen = self.backend.generate(self.messages, session_id=self.session_id, source=self.source,
                                    model=self.model_name, tools=self.specs, tool_choice=choice, **self.params)

        def forward(kind: str, payload: Any) -> None:
            if kind not in ("complete", "error"):  # the rounds' own end is announced by the driver
                self._listeners(kind, payload)

        gen.listen(forward)
        return gen

    def _round_start(self) -> tuple[str, Any] | None:
        if self._announced >= self.round:
            return None
        self._announced = self.round
        return self._announce(("round_start", {"round": self.round, "max_rounds": self.max_rounds}))

    def _announce(self, event: tuple[str, Any]) -> tuple[str, Any]:
        self._listeners(*event)
        return event

    def _after(self, result: Any) -> Iterator[tuple[str, Any]]:
        """After a round: ``("event", e)`` items to show and ``("call", fn)`` items for the
        driver to run (the driver sends the outcome back), ending with the complete event."""
        if not self.results or self.results[-1] is not result:  # (again after an interrupt mid-call)
            self.results.append(result)
        calls = list(getattr(result, "tool_calls", None) or [])
        if not calls or self.cancelled or result.finish_reason in ("cancelled", "error"):
            yield "event", self._complete(result)
            return
        for call in calls:
            tool = self.tools.get(call["name"])
            yield "event", self._announce(("tool_start", {"tool_name": call["name"], "arguments": call["arguments"],
                                                          "round": self.round}))
            if tool is None:  # an engine may answer with a tool we did not offer
                outcome = {"result": f"Error: no tool named {call['name']!r}", "error": "unknown tool",
                           "value": None, "duration_ms": 0.0}
            else:
                outcome = yield "call", functools.partial(tool.run, call["arguments"])
            record = {"id": call["id"], "name": call["name"], "arguments": call["arguments"],
                      "result": outcome["result"], "error": outcome["error"],
                      "duration_ms": outcome["duration_ms"], "round": self.round}
            self.calls.append(record)
            self.steps.append(record)
            self.messages += [{"role": "assistant", "content": "", "tool_calls": [openai_call(call)]},
                              {"role": "tool", "tool_call_id": call["id"], "content": outcome["result"]}]
            end = {"tool_name": call["name"], "duration_ms": outcome["duration_ms"], "round": self.round}
            end.update({"error": outcome["error"]} if outcome["error"] else {"result": outcome["result"]})
            yield "event", self._announce(("tool_end", end))
        if self.round >= self.max_rounds:
            self.note = (f"Stopped after {self.max_rounds} round{'s' * (self.max_rounds != 1)}: the model was still "
                         "calling tools. Raise --max-rounds (or the profile's max_rounds) to let it go on.")
            yield "event", self._complete(result)
            return
        if self.cancelled:
            yield "event", self._complete(result)
            return
        self.gen = self._queue_round()
        yield "event", self._round_start()

    def _complete(self, last: Any) -> tuple[str, Any]:
        rs = self.results
        usage = {k: sum(r.usage[k] for r in rs) for k in ("prompt_tokens", "cached_tokens", "completion_tokens",
                                                           "total_tokens")}
        finish = "cancelled" if self.cancelled and last.finish_reason != "error" else last.finish_reason
        text = last.text if not getattr(last, "tool_calls", None) else ""
        if finish == "cancelled" and self.calls and not text:
            self.note = self.note or f"Stopped after {len(self.calls)} tool call{'s' * (len(self.calls) != 1)}."
        self.result = dataclasses.replace(
            last, text=text, finish_reason=finish, usage=usage, queue_stats=rs[0].queue_stats,
            timings={"ttft_ms": rs[0].timings["ttft_ms"],
                     "total_ms": round((time.monotonic() - self.started_mono) * 1000, 3),
                     "tokens_per_second": last.timings["tokens_per_second"]},
            tool_calls=[{"name": c["name"], "arguments": c["arguments"]} for c in self.calls],
            tool_results=[{"tool_name": c["name"], "result": c["result"]} for c in self.calls],
            rounds=len(rs), note=self.note)
        return self._announce(("complete", self.result))

    # -- drivers -------------------------------------------------------------------------------------
    def _drive(self, result: Any) -> Iterator[tuple[str, Any]]:
        """Follow :meth:`_after`, running each call on this thread; yields its events."""
        steps = self._after(result)
        outcome = None
        while True:
            try:
                kind, item = steps.send(outcome)
            except StopIteration:
                return
            outcome = None
            if kind == "call":
                try:
                    outcome = item()
                except KeyboardInterrupt:  # the kernel's Stop while a tool runs: the turn stops there
                    self.cancel()
                    outcome = {"result": "Error: stopped by the user while running", "error": "KeyboardInterrupt",
                               "value": None, "duration_ms": 0.0}
            elif item is not None:
                yield item

    async def _adrive(self, result: Any):
        loop = asyncio.get_running_loop()
        steps = self._after(result)
        outcome = None
        while True:
            try:
                kind, item = steps.send(outcome)
            except StopIteration:
                return
            outcome = None
            if kind == "call":
                outcome = await loop.run_in_executor(self.executor, item)
            elif item is not None:
                yield item

    def events(self, poll_interval: float = 0.5, *, repeat_queued: bool = False) -> Iterator[tuple[str, Any]]:
        finished = False
        try:
            while self.result is None:
                start = self._round_start()
                if start:
                    yield start
                for kind, payload in self.gen.events(poll_interval, repeat_queued=repeat_queued):
                    if kind == "complete":
                        for event in self._drive(payload):
                            yield event
                        break
                    yield kind, payload
            finished = True
        finally:
            if not finished:
                self.cancel()

    def __iter__(self) -> Iterator[str]:
        for kind, payload in self.events():
            if kind == "token":
                yield payload

    def batches(self, interval: float = 0.1, *, heartbeat: bool = False) -> Iterator[list[tuple[str, Any]]]:
        finished = False
        try:
            while self.result is None:
                start = self._round_start()
                if start:
                    yield [start]
                for batch in self.gen.batches(interval, heartbeat=heartbeat):
                    if batch and batch[-1][0] == "complete":
                        if batch[:-1]:
                            yield batch[:-1]
                        for event in self._drive(batch[-1][1]):
                            yield [event]
                        break
                    yield batch
            finished = True
        finally:
            if not finished:
                self.cancel()

    async def aevents(self, poll_interval: float = 0.5, *, repeat_queued: bool = False):
        finished = False
        try:
            while self.result is None:
                start = self._round_start()
                if start:
                    yield start
                async for kind, payload in self.gen.aevents(poll_interval, repeat_queued=repeat_queued):
                    if kind == "complete":
                        async for event in self._adrive(payload):
                            yield event
                        break
                    yield kind, payload
            finished = True
        finally:
            if not finished:
                self.cancel()

    def wait(self) -> Any:
        """Every round to its end (tools run on this thread); the combined result."""
        while self.result is None:
            self._round_start()
            for _ in self._drive(self.gen.wait()):
                pass
        return self.result

    async def wait_async(self) -> Any:
        while self.result is None:
            self._round_start()
            async for _ in self._adrive(await self.gen.wait_async()):
                pass
        return self.result

