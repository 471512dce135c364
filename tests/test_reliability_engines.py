"""The reliability suite, round two: no single request may kill, freeze or leak through the server.

Grammars that crashed llama.cpp's parser, tool schemas converted on the event loop, engines that
hang (before their model list, mid-reply, or with keep-alive comments only) or echo our key back,
and model files that cannot be used. Each against a real `jupyter server` on loopback where the
harm was to the server; an engine that misbehaves on demand is tests/fake_engine.py.
"""

import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from offgrid_jupyter.errors import InvalidRequestError, UnsupportedSchemaError, UnusableModelError
from offgrid_jupyter.inference.llamacpp import MAX_GRAMMAR_DEPTH, check_grammar, grammar
from offgrid_jupyter.inference.openai_engine import OpenAIEngine
from offgrid_jupyter.inference.structured import MAX_EXPANSION, MAX_REPEAT, normalize
from offgrid_jupyter.inference.toolcalls import check_tools

from .conftest import GREEDY, one_line_error, user
from .fake_engine import FakeEngine
from .kernels import AUTH, free_port, jupyter_server


def string(**bounds):
    return {"type": "object", "properties": {"text": {"type": "string", **bounds}}, "required": ["text"]}


GRAMMAR_BOMBS = [  # (schema, words the 400 must say)
    (string(maxLength=30000), "maxLength 30000"),
    (string(maxLength=20000), "maxLength 20000"),
    (string(maxLength=12000), "maxLength 12000"),
    (string(minLength=5000), "minLength 5000"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 30000}, "maxItems 30000"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2000}, "minItems 2000"),
    (string(pattern="^a{0,30000}$"), "30000 times"),
    (string(pattern="^(a{0,999}){0,999}$"), "grammar symbols"),
    (string(pattern="^((ab){0,90}c){0,90}$"), "grammar symbols"),
    ({"type": "object", "properties": {f"f{i}": {"type": "string", "maxLength": 999} for i in range(6)}}, "add up"),
    ({"type": "object", "properties": {"deep": {"type": "array", "items": string(maxLength=40000)}}},
     "$.properties.deep.items.properties.text"),
]


# -- grammars -------------------------------------------------------------------------------------
@pytest.mark.parametrize("schema, needle", GRAMMAR_BOMBS, ids=[n[:20] for _, n in GRAMMAR_BOMBS])
def test_a_schema_whose_grammar_would_crash_llama_cpp_is_a_400_naming_the_limit(schema, needle):
    for form in ({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
                 {"type": "json_object", "schema": schema}):
        with pytest.raises(InvalidRequestError) as caught:
            normalize(form)
        assert needle in str(caught.value) and caught.value.status == 400
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": schema}}}}]
    with pytest.raises(InvalidRequestError, match="limit"):
        check_tools(tools, "auto")


def test_bounds_leave_ordinary_schemas_alone_and_a_grammar_llama_cpp_refuses_is_refused():
    ordinary = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 200},
                                                 "tags": {"type": "array", "items": {"type": "string"},
                                                          "maxItems": 20},
                                                 "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}}
    assert normalize({"type": "json_object", "schema": ordinary})["schema"] == ordinary
    at_the_limit = string(maxLength=MAX_REPEAT)
    assert normalize({"type": "json_object", "schema": at_the_limit})
    with pytest.raises(UnsupportedSchemaError, match="refuses to build"):
        check_grammar("root ::= undefined-rule\n")  # llama.cpp's parser says no: never unconstrained
    deep = "root ::= " + "(" * (MAX_GRAMMAR_DEPTH + 1) + '"a"' + ")" * (MAX_GRAMMAR_DEPTH + 1) + "\n"
    with pytest.raises(InvalidRequestError, match=f"nested {MAX_GRAMMAR_DEPTH + 1} levels"):
        check_grammar(deep)
    with pytest.raises(InvalidRequestError, match="characters"):
        check_grammar("root ::= " + " | ".join(f'"{i}"' for i in range(60_000)) + "\n")
    assert MAX_EXPANSION >= 4 * MAX_REPEAT


def test_a_grammar_llama_cpp_cannot_build_fails_the_request_instead_of_sampling_freely(engine):
    engine.complete(user("Hi."), max_tokens=1)  # loaded
    with pytest.raises(UnsupportedSchemaError, match="nothing was generated"):
        engine._llm.sampler({"grammar": grammar("root ::= missing\n"), "temperature": 0})
    assert engine.complete(user("Say yes."), max_tokens=2, **GREEDY).finish_reason in ("stop", "length")


def test_the_magic_refuses_a_grammar_bomb_in_one_line(sh):
    result, cap = sh.run("%%offgrid --schema '{\"type\": \"string\", \"maxLength\": 30000}'\nA long text.")
    one_line_error(result, cap, "maxLength 30000", str(MAX_REPEAT))


def test_a_remote_engine_is_never_sent_a_grammar_bomb():
    with FakeEngine() as fake:
        eng = OpenAIEngine(fake.url, model="fake")
        with pytest.raises(InvalidRequestError, match="maxItems 30000"):
            eng.generate(user("List numbers."), response_format={
                "type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "array", "maxItems": 30000}}})
        assert fake.posts == 0
        eng.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bombs")
    with jupyter_server(root, "--OffgridApp.n_ctx=1024", "--OffgridApp.max_body_bytes=4194304") as srv:
        yield srv


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server["url"] + "offgrid/v1/", headers=AUTH, timeout=120) as client:
        yield client


def test_grammar_bombs_on_every_route_are_400s_and_the_server_lives(api):
    name = f"bombs-{uuid.uuid4().hex[:6]}"
    assert api.post("sessions", json={"name": name}).status_code == 201
    for schema, needle in GRAMMAR_BOMBS[:8]:
        rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        for path, body in (("chat/completions", {"messages": user("Write."), "response_format": rf}),
                           (f"sessions/{name}/chat", {"message": "Write.", "response_format": rf}),
                           (f"sessions/{name}/chat", {"message": "Write.", "response_format": rf, "stream": True}),
                           ("chat/completions", {"messages": user("Write."), "tools": [
                               {"type": "function", "function": {"name": "w", "parameters": {
                                   "type": "object", "properties": {"x": schema}}}}]})):
            r = api.post(path, json={**body, "max_tokens": 8})
            assert r.status_code == 400, (path, r.status_code, r.text[:300])
            assert r.json()["error"]["code"] == "invalid_request"
        assert api.get("health").status_code == 200
    assert api.get(f"sessions/{name}").json()["messages"] == []  # nothing stored
    fine = {"type": "json_schema", "json_schema": {"name": "p", "schema": string(maxLength=40)}}
    ok = api.post("chat/completions", json={"messages": user("Name a colour."), "response_format": fine,
                                            "max_tokens": 40, **GREEDY})
    assert ok.status_code == 200, ok.text[:300]
    assert "text" in json.loads(ok.json()["choices"][0]["message"]["content"], strict=False)  # (a raw tab may pass)


def test_huge_tool_schemas_are_refused_without_freezing_the_server(server):
    """60 tools of ~29 KB each (a 1.7 MB body) took 11 s on the event loop: now a 400 naming the limit, checked
    off the loop, while /health keeps answering."""
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "d" * 200}
                                            for i in range(120)}}
    body = {"messages": user("Hi."), "max_tokens": 4,
            "tools": [{"type": "function", "function": {"name": f"t{i}", "parameters": big}} for i in range(60)]}
    assert len(json.dumps(body)) > 1_500_000
    base = server["url"] + "offgrid/v1/"
    with ThreadPoolExecutor(4) as pool:
        bombs = [pool.submit(httpx.post, base + "chat/completions", json=body, headers=AUTH, timeout=60)
                 for _ in range(3)]
        answered = 0
        with httpx.Client(base_url=base, headers=AUTH, timeout=60) as api:
            while not all(b.done() for b in bombs):
                assert api.get("health").status_code == 200
                answered += 1
        for b in bombs:
            r = b.result()
            assert r.status_code == 400 and "16,384 per tool" in r.json()["error"]["message"]
    assert answered >= 1  # /health answered while the bombs were being refused
    several = {"messages": user("Hi."), "max_tokens": 4, "tools": [
        {"type": "function", "function": {"name": f"t{i}", "parameters": {"type": "object", "properties": {
            f"p{j}": {"type": "string", "description": "d" * 300} for j in range(40)}}}} for i in range(6)]}
    r = httpx.post(base + "chat/completions", json=several, headers=AUTH, timeout=60)
    assert r.status_code == 400 and "65,536 characters" in r.json()["error"]["message"]


# -- engines that hang ------------------------------------------------------------------------------
def pending_while(futures, poll):
    """Call *poll* until every future is done; return how many calls answered while some were pending."""
    calls = 0
    while not all(f.done() for f in futures):
        poll()
        calls += 1
    return calls


def test_an_engine_whose_model_list_hangs_or_that_is_down_never_freezes_the_server(tmp_path):
    (tmp_path / "hang").mkdir()
    (tmp_path / "down").mkdir()
    with FakeEngine(hang_models=True) as fake:  # and no engine_model set: the name comes from its list
        with jupyter_server(tmp_path / "hang", f"--OffgridApp.engine_url={fake.url}") as srv:
            base = srv["url"] + "offgrid/v1/"
            with ThreadPoolExecutor(4) as pool, httpx.Client(base_url=base, headers=AUTH, timeout=30) as api:
                chats = [pool.submit(httpx.post, base + "chat/completions", json={"messages": user("Hi.")},
                                     headers=AUTH, timeout=120) for _ in range(2)]

                def poll():
                    assert api.get("health").status_code == 200
                    assert api.get("sessions").status_code == 200
                    assert api.get("models").status_code == 200
                    if sum(c.done() for c in chats) == 0 and polls["n"] >= 5:
                        fake.released.set()  # the engine answers at last (its hanging handlers return)
                    polls["n"] += 1

                polls = {"n": 0}
                assert pending_while(chats, poll) >= 5
                assert all(c.result().status_code in (200, 502) for c in chats)
    port = free_port()  # nothing listens there: connecting is retried, never on the event loop
    with jupyter_server(tmp_path / "down", f"--OffgridApp.engine_url=http://127.0.0.1:{port}/v1",
                        "--OffgridApp.engine_model=m") as srv:
        base = srv["url"] + "offgrid/v1/"
        with ThreadPoolExecutor(8) as pool, httpx.Client(base_url=base, headers=AUTH, timeout=30) as api:
            chats = [pool.submit(httpx.post, base + "chat/completions", json={"messages": user("Hi.")},
                                 headers=AUTH, timeout=120) for _ in range(6)]
            assert pending_while(chats, lambda: api.get("health").raise_for_status()) >= 1
            for c in chats:
                r = c.result()
                assert r.status_code == 502 and "not reachable" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def hung(tmp_path_factory):
    """A server on an engine that streams a few words, then nothing (its read timeout: 120 s)."""
    with FakeEngine([("hang_after", "Half an")]) as fake:
        with jupyter_server(tmp_path_factory.mktemp("hung"), f"--OffgridApp.engine_url={fake.url}",
                            "--OffgridApp.engine_model=fake", "--OffgridApp.engine_read_timeout=120") as srv:
            yield srv, fake


def test_cancel_ends_a_hung_engine_stream_at_once_and_frees_its_session(hung):
    srv, fake = hung
    base = srv["url"] + "offgrid/v1/"
    name = f"hung-{uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=base, headers=AUTH, timeout=30) as api:  # 30 s: far below the 120 s timeout
        assert api.post("sessions", json={"name": name}).status_code == 201
        started = threading.Event()
        events = []

        def chat():
            with api.stream("POST", f"sessions/{name}/chat", json={"message": "Go.", "stream": True}) as r:
                for line in r.iter_lines():
                    events.append(line)
                    if line == "event: token":
                        started.set()

        t = threading.Thread(target=chat)
        t.start()
        assert started.wait(30)
        status = api.get("generation/status").json()
        request_id = status["generating_request_id"]
        assert api.post("generation/cancel", json={"request_id": request_id}).status_code == 200
        t.join(30)
        assert not t.is_alive() and "event: complete" in events
        done = json.loads(events[events.index("event: complete") + 1].removeprefix("data: "))
        assert done["finish_reason"] == "cancelled" and done["text"].startswith("Half")
        fake.script = [("reply", "Fine thanks.")]  # the next turn of the session is not held behind it
        again = api.post(f"sessions/{name}/chat", json={"message": "And now?"})
        assert again.status_code == 200 and again.json()["text"].strip() == "Fine thanks."
        fake.script = [("hang_after", "Half an")]


def test_a_client_that_goes_away_from_a_hung_stream_frees_its_session(hung):
    srv, fake = hung
    base = srv["url"] + "offgrid/v1/"
    name = f"gone-{uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=base, headers=AUTH, timeout=30) as api:
        assert api.post("sessions", json={"name": name}).status_code == 201
        with api.stream("POST", f"sessions/{name}/chat", json={"message": "Go.", "stream": True}) as r:
            for line in r.iter_lines():
                if line == "event: token":
                    break  # and the client leaves
        fake.script = [("reply", "Still here.")]
        again = api.post(f"sessions/{name}/chat", json={"message": "Hello?"})
        assert again.status_code == 200 and again.json()["text"].strip() == "Still here."
        messages = api.get(f"sessions/{name}").json()["messages"]
        assert [m["role"] for m in messages][-2:] == ["user", "assistant"]
        fake.script = [("hang_after", "Half an")]


@pytest.mark.parametrize("step", [("hang_after", "Half an"), ("keepalive_after", "Half an")],
                         ids=["silent", "keep-alive-comments-only"])
def test_an_engine_silent_past_its_read_timeout_ends_the_turn_naming_it_and_stores_nothing(tmp_path, step):
    with FakeEngine([step]) as fake:
        with jupyter_server(tmp_path, f"--OffgridApp.engine_url={fake.url}", "--OffgridApp.engine_model=fake",
                            "--OffgridApp.engine_read_timeout=2") as srv:
            with httpx.Client(base_url=srv["url"] + "offgrid/v1/", headers=AUTH, timeout=60) as api:
                api.post("sessions", json={"name": "quiet"})
                plain = api.post("sessions/quiet/chat", json={"message": "Tell me."})
                assert plain.status_code == 502, plain.text[:300]
                message = plain.json()["error"]["message"]
                assert "sent nothing for 2 s" in message and fake.url.split("//")[1] in message
                streamed = api.post("sessions/quiet/chat", json={"message": "Tell me.", "stream": True})
                assert "event: error" in streamed.text and "sent nothing for 2 s" in streamed.text
                openai = api.post("chat/completions", json={"messages": user("Tell me.")})
                assert openai.status_code == 502
                assert api.get("sessions/quiet").json()["messages"] == []  # nothing half-done stays


def test_the_engine_key_never_leaves_the_server(tmp_path):
    key = "sk-very-secret-0123456789"
    with FakeEngine([("echo_error", 400), ("echo_error", 500), ("error_event", None), ("echo_error", 422)]) as fake:
        with jupyter_server(tmp_path, f"--OffgridApp.engine_url={fake.url}", "--OffgridApp.engine_model=fake",
                            f"--OffgridApp.engine_api_key={key}") as srv:
            with httpx.Client(base_url=srv["url"] + "offgrid/v1/", headers=AUTH, timeout=60) as api:
                api.post("sessions", json={"name": "leak"})
                answers = [api.post("chat/completions", json={"messages": user("Hi.")}),
                           api.post("chat/completions", json={"messages": user("Hi."), "stream": True}),
                           api.post("sessions/leak/chat", json={"message": "Hi.", "stream": True}),
                           api.post("sessions/leak/chat", json={"message": "Hi."})]
                for r in answers:
                    assert key not in r.text and "very-secret" not in r.text, r.text[:400]
                assert any("[redacted]" in r.text for r in answers)  # the engine's words are still relayed
                assert fake.posts >= 4


# -- model files that cannot be used -----------------------------------------------------------------
def test_a_model_that_cannot_be_used_is_a_400_naming_only_its_path_and_the_loaded_model_stays(engine, tmp_path):
    engine.complete(user("Hi."), max_tokens=1)
    assert engine.loaded
    text = tmp_path / "passwd.gguf"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)  # a profile's model path may be anything a user typed
    for path, needle in ((text, "Not a GGUF"), (folder, "directory"), (fifo, "not a regular file"),
                         (tmp_path / "absent.gguf", "not found")):
        started = time.monotonic()
        with pytest.raises(UnusableModelError) as caught:
            engine.generate(user("Hi."), model=str(path))
        assert time.monotonic() - started < 5  # (a FIFO used to block the thread reading it forever)
        assert needle in str(caught.value) and str(path) in str(caught.value)
        assert "root" not in str(caught.value).replace(str(tmp_path), "") and caught.value.status == 400
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)  # the magic, then nothing llama.cpp can load
    result = engine.generate(user("Hi."), model=str(corrupt))
    with pytest.raises(UnusableModelError, match="corrupt.gguf"):
        result.wait()
    assert engine.loaded  # the configured model is back in memory
    events = [kind for kind, _ in engine.generate(user("Again."), max_tokens=2).events()]
    assert "loading" not in events and events[-1] == "complete"
