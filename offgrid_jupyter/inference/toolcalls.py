"""The tool-call protocol: what the model is offered and how a call it makes is read.

A local model is not trusted to *write* a call: the engine constrains decoding with a llama.cpp
grammar made from :func:`call_schema` of the offered tools (see ``llamacpp.tool_grammar``), so a
reply is either plain text (an answer) or one well-formed call. This module is the protocol's one
place: checking OpenAI's ``tools``/``tool_choice`` and tool messages (:func:`check_tools`,
:func:`check_tool_messages`), which of them a reply may call (:func:`offered`), how the tools are
described in the system prompt (:func:`instructions`), how earlier calls read in a chat template
(:func:`for_template`), how a reply is read as a call (:func:`parse_call`) and the wire shape of a
call (:func:`openai_call`). The Python side (a function as a tool, running calls in rounds) is
``chat/tools.py`` and ``chat/rounds.py``.

Messages use OpenAI's shapes throughout (an assistant message with ``tool_calls``, then a ``tool``
message with ``tool_call_id``).
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from typing import Any

from ..errors import InvalidRequestError, InvalidToolsError
from .structured import MAX_EXPANSION, check_bounds

MAX_TOOLS = 64


MAX_TOOL_BYTES = 16 * 1024  # one tool's parameter schema, as JSON: every tool goes into the prompt and one grammar


MAX_TOOLS_BYTES = 64 * 1024  # all of a request's tools (60 tools of 29 KB each took 11 s to check and convert)


MAX_SCHEMA_NODES = 20_000  # a schema with its references inlined (references can nest exponentially)


CHOICES = ("auto", "none", "required")


NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # always fullmatch()


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidRequestError(f"Tool name {str(name)[:80]!r} must be an ASCII identifier of at most 64 characters "
                                  "(letters, digits, _).")
    return name


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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]
