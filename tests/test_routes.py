"""The /offgrid/v1 routes through a real in-process Jupyter server (pytest-jupyter's jp_fetch)."""

import asyncio
import json
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import HTTPClientError

from offgrid_jupyter.stats import stats_document

API_KEY = "test-api-key-0123456789"
GREEDY = {"temperature": 0, "seed": 42}


@pytest.fixture
def jp_server_config(tmp_path):
    return {
        "ServerApp": {"jpserver_extensions": {"offgrid_jupyter": True}},
        # share_with_kernels=False: this server runs inside pytest; its environment must stay ours
        "OffgridApp": {"data_dir": str(tmp_path / "offgrid"), "n_ctx": 2048, "api_key": API_KEY,
                       "share_with_kernels": False, "max_body_bytes": 64 * 1024,
                       "profiles": {"terse": {"system_prompt": "Answer in at most five words.", "max_tokens": 12,
                                              "temperature": 0},
                                    "calc": {"tools": ["add"], "max_rounds": 3, "temperature": 0, "seed": 1},
                                    "lost": {"tools": ["missing_tool"]}},
                       "tools": ["tests.tool_functions:add", "tests.tool_functions:broken"]},
    }


@pytest.fixture
def state(jp_serverapp):
    return jp_serverapp.web_app.settings["offgrid_state"]


@pytest.fixture
def api(jp_fetch):
    """Call a route; returns (status, decoded body) for errors too."""

    async def call(method, route, body=None, headers=None, raw=None, expect_json=True, **params):
        kwargs = {"method": method, "headers": headers or {}, "params": params or None}
        if method in ("POST", "PUT", "PATCH"):
            kwargs["body"] = raw if raw is not None else json.dumps(body if body is not None else {})
        try:
            response = await jp_fetch("offgrid", *route.split("/"), **kwargs)
        except HTTPClientError as exc:
            response = exc.response
        text = response.body.decode() if response.body else ""
        return response.code, (json.loads(text) if text and expect_json else text), response.headers

    return call


def sse_events(text):
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields.get("event"), json.loads(fields["data"]) if fields["data"] != "[DONE]" else None))
    return events


async def test_health_models_and_openapi(api):
    code, body, _ = await api("GET", "v1/health")
    assert code == 200 and body["status"] == "ok" and body["model_loaded"] is False  # lazy
    code, body, _ = await api("GET", "v1/models")
    assert code == 200 and body["current"]["name"] == body["default"]["name"] == "SmolLM2-135M-Instruct.Q4_1"
    code, doc, _ = await api("GET", "v1/openapi.json")
    assert code == 200 and doc["openapi"].startswith("3.")
    assert {"/sessions", "/sessions/{ref}/chat", "/chat/completions", "/stats"} <= set(doc["paths"])


async def test_session_routes_and_their_errors(api):
    code, body, _ = await api("GET", "v1/sessions")
    assert (code, body["sessions"]) == (200, [])  # an empty list, never null
    code, created, _ = await api("POST", "v1/sessions", {"name": "alpha", "system_prompt": "Be brief."})
    assert code == 201 and created["name"] == "alpha" and created["messages"] == []
    code, body, _ = await api("POST", "v1/sessions", {"name": "alpha"})
    assert code == 409 and body["error"]["code"] == "duplicate_name"
    for bad, needle in (({"name": "has space"}, "$.name"), ({"name": "abc\n"}, "Invalid session name"),
                        ({"name": 5}, "$.name"), ([1, 2], "JSON object")):
        code, body, _ = await api("POST", "v1/sessions", bad)
        assert code == 400 and needle in body["error"]["message"], body
    code, body, _ = await api("POST", "v1/sessions", raw="{not json")
    assert code == 400 and "not valid JSON" in body["error"]["message"]
    code, body, _ = await api("POST", "v1/sessions", raw=json.dumps({"name": "x" * 70_000}))
    assert code == 413 and body["error"]["code"] == "content_too_large"
    code, body, _ = await api("GET", "v1/sessions", limit="many")
    assert code == 400
    code, body, _ = await api("GET", "v1/sessions", limt="5")  # misspelt: said, not ignored
    assert code == 400 and "'limt'" in body["error"]["message"] and "limit, offset" in body["error"]["message"]
    code, body, _ = await api("GET", "v1/health", x="1")
    assert code == 400 and "takes none" in body["error"]["message"]
    code, body, _ = await api("GET", "v1/health", **{"1796232356817": ""})  # JupyterLab's cache-buster
    assert code == 200
    code, msg, _ = await api("POST", "v1/sessions/alpha/messages", {"role": "user", "content": "hello"})
    assert code == 201 and msg["role"] == "user"
    code, body, _ = await api("POST", "v1/sessions/alpha/messages", {"role": "robot", "content": "x"})
    assert code == 400
    code, session, _ = await api("GET", "v1/sessions/alpha")
    assert code == 200 and [m["content"] for m in session["messages"]] == ["hello"]
    code, body, _ = await api("GET", "v1/sessions", limit="1", offset="0")
    assert [s["name"] for s in body["sessions"]] == ["alpha"] and "messages" not in body["sessions"][0]
    code, _, _ = await api("DELETE", f"v1/sessions/{created['id']}")
    assert code == 204
    code, body, _ = await api("GET", "v1/sessions/alpha")
    assert code == 404 and body["error"] == {"message": body["error"]["message"], "type": "SessionNotFoundError",
                                             "code": "session_not_found"}
    code, _, _ = await api("DELETE", "v1/sessions/alpha")
    assert code == 404


async def test_chat_is_one_atomic_turn_and_idempotent(api):
    await api("POST", "v1/sessions", {"name": "talk"})
    headers = {"Idempotency-Key": "key-1"}
    code, turn, _ = await api("POST", "v1/sessions/talk/chat", {"message": "Name a colour.", "max_tokens": 12,
                                                                **GREEDY}, headers=headers)
    assert code == 200
    assert turn["message"]["role"] == "user" and turn["response"]["role"] == "assistant"
    assert turn["response"]["content"] == turn["text"] and turn["usage"]["completion_tokens"] > 0
    assert set(turn["queue_stats"]) >= {"was_queued", "queue_wait_ms", "queue_position"}
    code, again, _ = await api("POST", "v1/sessions/talk/chat", {"message": "Name a colour.", "max_tokens": 12,
                                                                 **GREEDY}, headers=headers)
    assert code == 200 and again["response"]["id"] == turn["response"]["id"]  # replayed, not stored twice
    code, session, _ = await api("GET", "v1/sessions/talk")
    assert len(session["messages"]) == 2
    code, body, _ = await api("POST", "v1/sessions/talk/chat", {"message": "Hi", "temperature": "hot"})
    assert code == 400 and "temperature" in body["error"]["message"]
    code, body, _ = await api("POST", "v1/sessions/talk/chat", {"max_tokens": 5})
    assert code == 400 and "'message' is a required property" in body["error"]["message"]
    code, body, _ = await api("POST", "v1/sessions/nosuch/chat", {"message": "Hi"})
    assert code == 404
    code, session, _ = await api("GET", "v1/sessions/talk")
    assert len(session["messages"]) == 2  # failed requests stored nothing


async def test_streamed_chat_sends_events_in_order(api):
    await api("POST", "v1/sessions", {"name": "stream"})
    code, text, headers = await api("POST", "v1/sessions/stream/chat",
                                    {"message": "Count to five.", "max_tokens": 16, "stream": True, **GREEDY},
                                    expect_json=False)
    assert code == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(text)
    kinds = [k for k, _ in events]
    assert kinds[0] in ("queued", "start") and kinds[-1] == "complete" and "token" in kinds
    assert kinds.index("start") < kinds.index("token")
    deltas = "".join(d["delta"] for k, d in events if k == "token")
    complete = events[-1][1]
    assert complete["text"] == deltas == complete["response"]["content"]
    assert {"usage", "timings", "queue_stats", "request_id"} <= set(complete)


async def test_openai_compatible_route(api):
    body = {"model": "anything", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, **GREEDY}
    code, out, _ = await api("POST", "v1/chat/completions", body)
    assert code == 200 and out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant" and out["choices"][0]["message"]["content"]
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    code, text, _ = await api("POST", "v1/chat/completions", {**body, "stream": True}, expect_json=False)
    chunks = [d for _, d in sse_events(text)]
    assert chunks[-1] is None  # data: [DONE]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"])
    assert content and chunks[-2]["usage"]["completion_tokens"] > 0
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-2]][-1] in ("stop", "length")
    code, out, _ = await api("POST", "v1/chat/completions", {"messages": "hi"})
    assert code == 400


async def test_stats_route_agrees_with_the_in_process_document(api, state):
    await api("POST", "v1/sessions", {"name": "s"})
    await api("POST", "v1/sessions/s/chat", {"message": "Hi.", "max_tokens": 6, **GREEDY})
    code, doc, _ = await api("GET", "v1/stats")
    local = stats_document(state.engine, state.store)
    assert code == 200 and doc["inference"] == local["inference"] and doc["sessions"]["total_sessions"] == 1
    assert set(doc) == set(local) and doc["rag"]["enabled"] is False and doc["rag"]["collections"] == 0
    code, rows, _ = await api("GET", "v1/stats/requests")
    assert code == 200 and len(rows["data"]) == doc["inference"]["aggregate"]["total_requests"] == 1
    code, text, headers = await api("GET", "metrics", expect_json=False)
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert sum(s.value for s in families["offgrid_requests"].samples if s.name.endswith("_total")) == 1
    code, status, _ = await api("GET", "v1/generation/status")
    assert status == {"generating_session_id": None, "generating_request_id": None, "generating": [], "queued_session_ids": [],
                      "waiting_for_session": {}}


async def test_other_routes_answer_while_a_turn_generates(api, state):
    created = (await api("POST", "v1/sessions", {"name": "busy"}))[1]
    long_turn = asyncio.ensure_future(api("POST", "v1/sessions/busy/chat",
                                          {"message": "Write a long story about the sea.", "max_tokens": 200}))
    seen = None
    while not long_turn.done():  # answers arrive while the engine thread generates
        code, status, _ = await api("GET", "v1/generation/status")
        assert code == 200
        if status["generating_session_id"] == created["id"]:
            seen = status
            code, _, _ = await api("GET", "v1/sessions")
            assert code == 200
            break
    assert seen is not None, "the turn finished before any other route answered"
    code, turn, _ = await long_turn
    assert code == 200


async def test_a_full_queue_is_503_with_retry_after_and_stores_nothing(api, state):
    await api("POST", "v1/sessions", {"name": "q"})
    state.engine.max_queue = 0  # nothing may wait: every request is refused
    code, body, headers = await api("POST", "v1/sessions/q/chat", {"message": "Hi."})
    assert code == 503 and body["error"]["code"] == "queue_full" and headers["Retry-After"]
    code, session, _ = await api("GET", "v1/sessions/q")
    assert session["messages"] == []


ROUTES = [("GET", "v1/sessions"), ("POST", "v1/sessions"), ("GET", "v1/sessions/x"), ("DELETE", "v1/sessions/x"),
          ("POST", "v1/sessions/x/messages"), ("POST", "v1/sessions/x/chat"), ("GET", "v1/generation/status"),
          ("POST", "v1/generation/cancel"), ("GET", "v1/stats"), ("GET", "v1/stats/requests"), ("GET", "v1/models"),
          ("GET", "v1/health"), ("POST", "v1/chat/completions"), ("GET", "v1/openapi.json"), ("GET", "metrics")]


@pytest.mark.parametrize("method, path", ROUTES)
async def test_every_route_requires_authentication(jp_fetch, method, path):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "token nope"}):
        with pytest.raises(HTTPClientError) as info:
            await jp_fetch("offgrid", *path.split("/"), method=method, headers=headers,
                           body="{}" if method == "POST" else None)
        assert info.value.code == 403
        assert json.loads(info.value.response.body)["error"]["code"] == "forbidden"
    try:  # the API key is accepted (whatever the route then says about the request itself)
        response = await jp_fetch("offgrid", *path.split("/"), method=method,
                                  headers={"Authorization": f"Bearer {API_KEY}"},
                                  body="{}" if method == "POST" else None)
        code = response.code
    except HTTPClientError as exc:
        code = exc.code
    assert code not in (401, 403)


def test_the_route_table_and_openapi_json_name_the_same_routes_and_methods():
    from tornado.web import RequestHandler

    from offgrid_jupyter.server import spec
    from offgrid_jupyter.server.handlers import handlers

    served = {}
    for pattern, cls in handlers():
        if not pattern.startswith("/offgrid/v1"):
            continue
        path = re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", pattern.removeprefix("/offgrid/v1"))
        assert cls.spec_path == path, (cls, path)
        served[path] = sorted(m for m in ("GET", "POST", "PUT", "PATCH", "DELETE")
                              if getattr(cls, m.lower()) is not getattr(RequestHandler, m.lower()))
    documented = {path: spec.methods(path) for path in spec.document()["paths"]}
    assert served == documented


async def test_saving_a_notebook_snapshots_its_chat_panels(jp_fetch, state):
    session = state.store.create("nb-session")
    state.store.add_message(session.id, "user", "What is **rain**?")
    state.store.add_message(session.id, "assistant", "Water that falls.", metadata={"model": "tiny"})
    panel = {"output_type": "display_data", "metadata": {"offgrid_panel": {"session_id": session.id}},
             "data": {"text/plain": "panel", "application/vnd.jupyter.widget-view+json": {"model_id": "abc"}}}
    other = {"output_type": "display_data", "metadata": {},
             "data": {"text/plain": "slider", "application/vnd.jupyter.widget-view+json": {"model_id": "def"}}}
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "code", "id": "c1", "metadata": {}, "source": "%offgrid chat", "execution_count": 1,
         "outputs": [panel, other]}]}
    response = await jp_fetch("api", "contents", "chat.ipynb", method="PUT",
                              body=json.dumps({"type": "notebook", "content": nb}))
    assert response.code in (200, 201)
    saved = json.loads((await jp_fetch("api", "contents", "chat.ipynb")).body)["content"]
    first, second = saved["cells"][0]["outputs"]
    text = first["data"]["text/markdown"]
    assert "application/vnd.jupyter.widget-view+json" not in first["data"]
    # the question as typed (its ** escaped: a person's text is text), the reply as Markdown
    assert "`nb-session`" in text and "> What is \\*\\*rain\\*\\*?" in text and "Water that falls." in text
    assert "run this cell to reopen" in text
    assert second["data"]["application/vnd.jupyter.widget-view+json"] == {"model_id": "def"}  # not ours: kept


async def test_rename_fork_end_export_import_and_the_notebook_binding(api, state):
    await api("POST", "v1/sessions", {"name": "orig", "system_prompt": "Be brief."})
    state.store.add_message("orig", "user", "Hello there.")
    state.store.add_message("orig", "assistant", "Hi.")
    code, body, _ = await api("PATCH", "v1/sessions/orig", {"name": "renamed", "system_prompt": "Be kind."})
    assert code == 200 and body["name"] == "renamed" and body["system_prompt"] == "Be kind." and "messages" not in body
    await api("POST", "v1/sessions", {"name": "other"})
    code, body, _ = await api("PATCH", "v1/sessions/renamed", {"name": "other"})
    assert code == 409 and body["error"]["code"] == "duplicate_name"
    for bad, needle in (({"name": "has space"}, "$.name"), ({"ended": False}, "$.ended"),
                        ({"system_prompt": 3}, "$.system_prompt")):
        code, body, _ = await api("PATCH", "v1/sessions/renamed", bad)
        assert code == 400 and needle in body["error"]["message"], body
    code, body, _ = await api("PATCH", "v1/sessions/nope", {"name": "x"})
    assert code == 404
    code, fork, _ = await api("POST", "v1/sessions/renamed/fork", {"name": "copy"})
    assert code == 201 and fork["name"] == "copy" and fork["message_count"] == 2
    code, body, _ = await api("POST", "v1/sessions/renamed/fork", {"upto_message_id": "msg-zz"})
    assert code == 400 and "upto_message_id" in body["error"]["message"]
    code, body, _ = await api("PATCH", "v1/sessions/copy", {"ended": True})
    assert code == 200 and body["ended"] is True
    code, doc, _ = await api("GET", "v1/sessions/copy/export")
    assert code == 200 and doc["id"] == fork["id"] and [m["role"] for m in doc["messages"]] == ["user", "assistant"]
    await api("DELETE", "v1/sessions/copy")
    code, back, _ = await api("POST", "v1/import", doc)
    assert code == 201 and back["id"] == fork["id"] and back["message_count"] == 2 and back["ended"] is True
    code, again, _ = await api("POST", "v1/import", doc)  # idempotent
    assert code == 201 and again["message_count"] == 2
    code, body, _ = await api("POST", "v1/import", {**doc, "id": "../../etc/passwd"})
    assert code == 400 and "$.id" in body["error"]["message"]
    code, body, _ = await api("POST", "v1/import", {**doc, "name": "renamed", "id": "session-0123456789ab",
                                                     "messages": []})
    assert code == 409 and "belongs to session" in body["error"]["message"]
    twice = {**doc, "id": "session-0123456789ab", "name": None, "messages": doc["messages"][:1] * 2}
    code, body, _ = await api("POST", "v1/import", twice)  # a message listed twice, and one of another session
    assert code == 409 and body["error"]["code"] == "duplicate_id" and "another session" in body["error"]["message"]
    fresh = [{**m, "id": f"msg-00000000000{i}"} for i, m in enumerate(doc["messages"][:1] * 2)]
    code, body, _ = await api("POST", "v1/import", {**twice, "messages": fresh + fresh[:1]})
    assert code == 201 and body["message_count"] == 2
    code, body, _ = await api("PATCH", "v1/sessions/renamed", raw="")
    assert code == 400 and "needs a JSON object" in body["error"]["message"]
    code, body, _ = await api("GET", "v1/notebooks/session", path="work/a.ipynb")
    assert code == 200 and body == {"path": "work/a.ipynb", "session": None}  # none yet: not an error
    code, body, _ = await api("PUT", "v1/notebooks/session", {"path": "work/a.ipynb", "session": "renamed"})
    assert code == 204
    code, body, _ = await api("GET", "v1/notebooks/session", path="work/a.ipynb")
    assert code == 200 and body["session"]["name"] == "renamed"
    code, body, _ = await api("PUT", "v1/notebooks/session", {"path": "work/a.ipynb", "session": "gone"})
    assert code == 404
    code, body, _ = await api("GET", "v1/notebooks/session")
    assert code == 400 and "path" in body["error"]["message"]


async def test_profiles_from_config_are_listed_and_sessions_made_with_them_use_them(api):
    code, body, _ = await api("GET", "v1/profiles")
    assert code == 200 and [p["name"] for p in body["profiles"]] == ["calc", "lost", "terse"]
    terse = body["profiles"][2]
    assert terse["source"] == "config" and terse["params"]["max_tokens"] == 12
    code, body, _ = await api("POST", "v1/sessions", {"name": "short", "profile_name": "terse"})
    assert code == 201 and body["profile"] == "terse"
    code, turn, _ = await api("POST", "v1/sessions/short/chat", {"message": "Describe the sea."})
    assert code == 200 and turn["usage"]["completion_tokens"] <= 12  # the profile's max_tokens
    code, turn, _ = await api("POST", "v1/sessions/short/chat", {"message": "More.", "max_tokens": 3})
    assert code == 200 and turn["usage"]["completion_tokens"] <= 3  # the request's own value wins
    code, body, _ = await api("POST", "v1/sessions", {"name": "lost", "profile_name": "nope"})
    assert code == 400 and body["error"]["code"] == "unknown_profile" and "terse" in body["error"]["message"]
    code, _, _ = await api("GET", "v1/sessions/lost")
    assert code == 404  # nothing stored


ADD = "What is 2 + 3? Use the add tool."


async def test_a_session_whose_profile_offers_server_tools_runs_them_on_the_server(api):
    from .tool_functions import CALLS

    code, body, _ = await api("GET", "v1/tools")
    assert code == 200 and sorted(t["function"]["name"] for t in body["tools"]) == ["add", "broken"]
    await api("POST", "v1/sessions", {"name": "sums", "profile_name": "calc"})
    before = len(CALLS)
    code, text, _ = await api("POST", "v1/sessions/sums/chat", {"message": ADD, "tool_choice": "required",
                                                               "stream": True}, expect_json=False)
    assert code == 200
    events = sse_events(text)
    kinds = [k for k, _ in events]
    assert kinds.index("round_start") < kinds.index("start") < kinds.index("tool_start") < kinds.index("tool_end")
    assert kinds[-1] == "complete" and kinds.count("round_start") >= 2
    start, end = events[kinds.index("tool_start")][1], events[kinds.index("tool_end")][1]
    assert start["tool_name"] == "add" and set(start["arguments"]) == {"a", "b"}
    assert end["result"] == str(start["arguments"]["a"] + start["arguments"]["b"]) and end["duration_ms"] >= 0
    assert len(CALLS) > before  # the call ran here, in the server's process
    complete = events[-1][1]
    assert complete["tool_calls"][0] == {"name": "add", "arguments": start["arguments"]}
    assert complete["tool_results"][0] == {"tool_name": "add", "result": end["result"]}
    code, session, _ = await api("GET", "v1/sessions/sums")
    roles = [m["role"] for m in session["messages"]]
    assert roles[:2] == ["user", "tool"] and roles[-1] == "assistant"
    assert session["messages"][-1]["tool_calls"] == complete["tool_calls"]
    # a profile offering a tool this server does not have: a 400 naming it, nothing stored
    await api("POST", "v1/sessions", {"name": "nothing", "profile_name": "lost"})
    code, body, _ = await api("POST", "v1/sessions/nothing/chat", {"message": "Hi."})
    assert code == 400 and body["error"]["code"] == "unknown_tool" and "missing_tool" in body["error"]["message"]
    code, session, _ = await api("GET", "v1/sessions/nothing")
    assert session["messages"] == []


async def test_the_openai_route_returns_tool_calls_for_the_client_to_run(api):
    from .tool_functions import add

    body = {"messages": [{"role": "user", "content": ADD}], "tools": [add.spec()], "tool_choice": "required",
            "max_tokens": 60, **GREEDY}
    code, out, _ = await api("POST", "v1/chat/completions", body)
    assert code == 200, out
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "add"
    assert add.run(json.loads(call["function"]["arguments"]))["error"] is None
    code, text, _ = await api("POST", "v1/chat/completions", {**body, "stream": True}, expect_json=False)
    chunks = [d for _, d in sse_events(text)][:-1]
    streamed = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert streamed and streamed[0]["function"]["name"] == "add"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    # the client runs the call and sends its result back, in OpenAI's shapes
    result = str(add.run(json.loads(call["function"]["arguments"]))["result"])
    follow = {"messages": [body["messages"][0], {"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": call["id"], "content": result}],
              "tools": [add.spec()], "max_tokens": 40, **GREEDY}
    code, out, _ = await api("POST", "v1/chat/completions", follow)
    assert code == 200 and out["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    code, out, _ = await api("POST", "v1/chat/completions", {**body, "tool_choice": "subtract"})
    assert code == 422 and out["error"]["code"] == "invalid_tools"


async def test_collections_are_learned_under_the_root_searched_and_used_by_chats(api, jp_root_dir):
    from .test_rag import PROJECTS, corpus

    corpus(jp_root_dir)
    code, report, _ = await api("POST", "v1/collections", {"name": "projects", "paths": ["notes", "missing.md"]})
    assert code == 200 and report["added"] == len(PROJECTS) and report["failed"][0]["path"] == "missing.md"
    for bad in ("../elsewhere", "/etc/passwd", "notes/../../x"):
        code, body, _ = await api("POST", "v1/collections", {"name": "projects", "paths": [bad]})
        assert code == 403 and body["error"]["code"] == "path_refused", body
    code, body, _ = await api("GET", "v1/collections")
    assert code == 200 and body["collections"][0]["documents"] == len(PROJECTS)
    code, body, _ = await api("GET", "v1/collections/projects")
    assert code == 200 and {d["path"] for d in body["documents"]} == {f"notes/{n}.md" for n in PROJECTS}
    code, body, _ = await api("GET", "v1/collections/projects/search", q="refracting telescope aperture", k="2")
    assert code == 200 and body["hits"][0]["path"] == "notes/vesper.md" and len(body["hits"]) <= 2
    code, body, _ = await api("GET", "v1/collections/nope/search", q="x")
    assert code == 404 and body["error"]["code"] == "collection_not_found"
    for params, needle in (({}, "query argument q"), ({"q": "x" * 2001}, "at most 2000"),
                           ({"q": "x", "limit": "3"}, "'limit'")):
        code, body, _ = await api("GET", "v1/collections/projects/search", **params)
        assert code == 400 and needle in body["error"]["message"], body
    await api("POST", "v1/sessions", {"name": "asker"})
    code, turn, _ = await api("POST", "v1/sessions/asker/chat", {"message": "What is Brindle's pilot budget?",
                                                                 "collection": "projects", "max_tokens": 30, **GREEDY})
    assert code == 200 and turn["sources"][0]["path"] == "notes/brindle.md"
    assert turn["response"]["metadata"]["sources"] == turn["sources"]
    code, doc, _ = await api("GET", "v1/stats")
    assert doc["rag"]["enabled"] and doc["rag"]["documents"] == len(PROJECTS) and doc["rag"]["chunks"] > 0
    assert doc["rag"]["retrieval"]["searches"] >= 2
    code, _, _ = await api("DELETE", "v1/collections/projects")
    assert code == 204
    code, body, _ = await api("GET", "v1/collections")
    assert body["collections"] == []


async def test_a_server_with_an_embedding_model_embeds_what_it_learns(api, state, jp_root_dir):
    from offgrid_jupyter.inference.models import resolve_model

    from .test_rag import corpus

    corpus(jp_root_dir)
    state.embedding_model = str(resolve_model().path)  # what c.OffgridApp.embedding_model resolves to
    code, report, _ = await api("POST", "v1/collections", {"name": "vec", "paths": ["notes"]})
    assert code == 200 and report["embedded"] == report["chunks"] > 0
    code, body, _ = await api("GET", "v1/collections")
    listed = body["collections"][0]
    assert listed["vectors"] == listed["chunks"] and listed["embedding_model"] == state.embedding_model
    code, body, _ = await api("GET", "v1/collections/vec/search", q="qwzx vvyk", k="3")  # no word matches
    assert code == 200 and len(body["hits"]) == 3  # the vectors still rank


# -- what a client is told ------------------------------------------------------------------------
async def test_a_name_that_is_not_allowed_is_refused_in_words_not_a_regular_expression(api):
    await api("POST", "v1/sessions", {"name": "wordy"})
    code, out, _ = await api("PATCH", "v1/sessions/wordy", {"name": "has spaces!"})
    message = out["error"]["message"]
    assert code == 400 and "letters, digits, '.', '_' or '-'" in message and "[A-Za-z" not in message


async def test_a_constrained_reply_cut_by_max_tokens_is_not_kept(api):
    await api("POST", "v1/sessions", {"name": "typed-cut"})
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": {
        "type": "object", "properties": {"name": {"type": "string"}, "description": {"type": "string"}},
        "required": ["name", "description"]}}}
    code, out, _ = await api("POST", "v1/sessions/typed-cut/chat",
                             {"message": "Describe pandas.", "max_tokens": 12, "response_format": rf, **GREEDY})
    assert code == 422 and out["error"]["code"] == "reply_cut" and "Nothing was stored" in out["error"]["message"]
    code, text, _ = await api("POST", "v1/sessions/typed-cut/chat", {"message": "Describe pandas.", "max_tokens": 12,
                                                                     "response_format": rf, "stream": True, **GREEDY},
                              expect_json=False)
    events = sse_events(text)
    assert code == 200 and events[-1][0] == "error" and events[-1][1]["code"] == "reply_cut"
    _, session, _ = await api("GET", "v1/sessions/typed-cut")
    assert session["messages"] == []  # nothing half-done stays, in either form


async def test_a_turn_waiting_for_its_session_says_why_and_the_running_turn_can_be_followed(api, state):
    await api("POST", "v1/sessions", {"name": "busy-one"})
    code, text, _ = await api("GET", "v1/sessions/busy-one/turn", expect_json=False)
    assert code == 204  # nothing runs on it
    first = asyncio.ensure_future(api("POST", "v1/sessions/busy-one/chat", {
        "message": "Write a long story about a lighthouse.", "max_tokens": 300, "stream": True, **GREEDY},
        expect_json=False))
    while "busy-one" not in {t.turn.session_name for t in state.session_turns.values()}:
        await asyncio.sleep(0.05)  # (until the first turn holds the session: state, not time)
    follow = asyncio.ensure_future(api("GET", "v1/sessions/busy-one/turn", expect_json=False))
    second = await api("POST", "v1/sessions/busy-one/chat", {"message": "And a short one?", "max_tokens": 8,
                                                             "stream": True, **GREEDY}, expect_json=False)
    (code1, text1, _), (code_f, text_f, _) = await first, await follow
    events1, followed, events2 = sse_events(text1), sse_events(text_f), sse_events(second[1])
    assert events2[0][0] == "waiting" and "still running" in events2[0][1]["reason"]
    assert events2[-1][0] == "complete" and events1[-1][0] == "complete"
    assert code_f == 200 and followed[-1][0] == "complete"
    assert followed[-1][1]["response"]["id"] == events1[-1][1]["response"]["id"]  # the same turn, followed
    assert "".join(d["delta"] for k, d in followed if k == "token") == events1[-1][1]["text"]


async def test_a_chat_takes_attachments_stores_them_and_shows_them_to_the_model(api, state):
    from offgrid_jupyter.chat.attachments import estimate_tokens

    await api("POST", "v1/sessions", {"name": "attached"})
    items = [{"kind": "variable", "name": "df", "type": "DataFrame", "text": "`df`: pandas DataFrame, 3 rows",
              "tokens": 999999},
             {"kind": "cell", "name": "In[4]", "text": "word " * 3000}]  # over half of the 2,048-token window
    code, out, _ = await api("POST", "v1/sessions/attached/chat",
                             {"message": "What is in @df?", "max_tokens": 3, **GREEDY, "context": items})
    assert code == 200, out
    meta = out["message"]["metadata"]
    assert out["message"]["content"] == "What is in @df?"
    first, cut = meta["context"]
    assert first["tokens"] == estimate_tokens(first["text"])  # counted here, never taken from the caller
    assert cut["text"].startswith("… (cut to fit") and sum(i["tokens"] for i in meta["context"]) <= 1024
    assert meta["context_note"] == "attachments fitted to 1,024 tokens (cut: cell In[4])"
    prompt = state.store.get("attached").chat_messages()[0]["content"]
    assert prompt.startswith("Attached context:\n\n### @df (DataFrame)\n`df`: pandas DataFrame, 3 rows\n\n### cell In[4]")
    assert prompt.endswith("---\n\nWhat is in @df?")
    code, exported, _ = await api("GET", "v1/sessions/attached/export")
    assert exported["messages"][0]["metadata"]["context"] == meta["context"]  # export keeps them


@pytest.mark.parametrize("context, needle", [
    ([{"kind": "file", "name": "a", "text": "x"}], "kind"),
    ([{"kind": "variable", "text": "x"}], "name"),
    ([{"kind": "variable", "name": "a\nb", "text": "x"}], "name"),
    ([{"kind": "variable", "name": "a", "text": ""}], "text"),
    ([{"kind": "variable", "name": "a", "text": "x"}] * 33, "context"),
    ({"kind": "variable"}, "context"),
])
async def test_bad_attachments_are_a_400_naming_the_field_and_store_nothing(api, state, context, needle):
    await api("POST", "v1/sessions", {"name": "strict"})
    code, body, _ = await api("POST", "v1/sessions/strict/chat", {"message": "hi", "max_tokens": 2,
                                                                  "context": context})
    assert code == 400 and needle in body["error"]["message"], body
    assert state.store.get("strict").messages == []


async def test_a_proposal_is_a_stored_turn_whose_reply_is_parsed_and_compiled(api, state):
    await api("POST", "v1/sessions", {"name": "nb-fixes"})
    body = {"task": "fix", "source": "total = sum(values) + offset", "cell_label": "In[4]", "cell_id": "c-4",
            "error": "\u001b[31mNameError\u001b[0m: name 'offset' is not defined", "max_tokens": 200,
            "context": [{"kind": "variable", "name": "values", "type": "list", "text": "`values`: list of 3 items"}]}
    code, out, _ = await api("POST", "v1/sessions/nb-fixes/proposals", body)
    assert code == 200, out
    proposal = out["proposal"]
    assert set(proposal) >= {"code", "explanation", "checked", "compile_error"} and proposal["checked"] is True
    question = out["message"]
    assert question["metadata"]["task"] == "fix" and question["metadata"]["cell_id"] == "c-4"
    assert question["metadata"]["target_source"] == body["source"]
    assert [(c["kind"], c["name"]) for c in question["metadata"]["context"]] == [("cell", "In[4]"),
                                                                                  ("variable", "values")]
    assert "\x1b" not in question["metadata"]["context"][0]["text"]  # the traceback as plain text
    assert json.loads(out["text"])["code"] is not None  # the reply itself: JSON, whole
    assert state.request_log.flush()  # the rows are written by a background thread
    stats = state.store.connection().execute("SELECT source FROM requests ORDER BY started_at DESC").fetchone()
    assert stats[0] == "fix"
    code, out, _ = await api("POST", "v1/sessions/nb-fixes/proposals",
                             {"task": "generate", "instruction": "Print hello.", "language": "R", "max_tokens": 200})
    assert code == 200 and out["proposal"]["cells"] and out["proposal"]["checked"] is False  # only Python compiled
