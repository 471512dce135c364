"""Real use and hostile input against a real `jupyter server` on loopback.

A crowd on one session, retries with Idempotency-Keys, clients that go away,
hostile bodies and names, schemathesis on the server's own openapi.json, and a
server killed with SIGKILL mid-turn, round after round. bench/reliability.py runs
the crash loop for longer and prints its figures.
"""

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from offgrid_jupyter.chat.store import Store

from .kernels import parallel_slots, slots_taken, AUTH, TOKEN, Load, jupyter_server, unanswered

GREEDY = {"temperature": 0, "seed": 42}
HTTP_METHODS = ("get", "put", "post", "delete", "patch")
ROOT = Path(__file__).resolve().parent.parent
SERVER_ARGS = ("--OffgridApp.n_ctx=1024", "--OffgridApp.max_body_bytes=65536")
# the module's own server: two slots in a 2,048-token context, so a queue forms behind two turns
MODULE_ARGS = ("--OffgridApp.n_ctx=2048", "--OffgridApp.max_body_bytes=65536", "--OffgridApp.n_parallel=2")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with jupyter_server(tmp_path_factory.mktemp("reliable"), *MODULE_ARGS) as srv:
        yield srv


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server["url"] + "offgrid/v1/", headers=AUTH, timeout=120) as client:
        yield client


def fresh(api, prefix="s"):
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    assert api.post("sessions", json={"name": name}).status_code == 201
    return name


def sse(text):
    """[(event, data)] of a Server-Sent Events body."""
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            out.append((fields.get("event"), json.loads(fields["data"])))
    return out


def turns_are_pairs(messages):
    roles = [m["role"] for m in messages]
    return roles == ["user", "assistant"] * (len(roles) // 2)


# -- a crowd on one session -------------------------------------------------------------------
def test_more_chats_on_one_session_than_the_server_has_threads(server):
    """12 chats at once on one session (the store pool has 4 threads, asyncio's default 6),
    plus another session's chat; all complete as pairs, and the status routes answer at once."""
    base = server["url"] + "offgrid/v1/"

    async def scenario():
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=300) as c:
            crowd, other = f"crowd-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
            for name in (crowd, other):
                assert (await c.post("sessions", json={"name": name})).status_code == 201
            for route in ("stats", "health", "generation/status"):  # warm: first calls import and sample
                assert (await c.get(route)).status_code == 200

            async def chat(i, session, stream):
                body = {"message": f"Question {i}: name a fruit.", "max_tokens": 16, "stream": stream, **GREEDY}
                if not stream:
                    r = await c.post(f"sessions/{session}/chat", json=body)
                    return r.status_code, r.json()["response"]["id"]
                async with c.stream("POST", f"sessions/{session}/chat", json=body) as r:
                    events = sse((await r.aread()).decode())
                    return r.status_code, events[-1][1]["response"]["id"]

            tasks = [asyncio.ensure_future(chat(i, crowd, i % 2 == 0)) for i in range(12)]
            tasks.append(asyncio.ensure_future(chat(99, other, False)))
            answered = {"stats": [], "health": [], "generation/status": []}  # chats still pending at each answer
            while not all(t.done() for t in tasks):
                for route, pending in answered.items():
                    assert (await c.get(route)).status_code == 200
                    pending.append(sum(not t.done() for t in tasks))
            results = [t.result() for t in tasks]
            session = (await c.get(f"sessions/{crowd}")).json()
            return results, session, answered

    results, session, answered = asyncio.run(asyncio.wait_for(scenario(), 280))
    assert all(code == 200 for code, _ in results)
    assert turns_are_pairs(session["messages"]) and len(session["messages"]) == 24
    replies = {m["id"] for m in session["messages"] if m["role"] == "assistant"}
    assert {reply for _, reply in results[:12]} == replies  # each chat got its own stored reply
    for route, pending in answered.items():
        # The status routes answer throughout, not once the crowd has gone: from the start (13 chats
        # pending) and through nearly every stage after (two chats may end within one poll).
        # (Their latency is measured by bench/bench_server.py, not asserted here.)
        stages = set(pending)
        assert 13 in stages and len(stages & set(range(1, 14))) >= 10, (route, sorted(stages))


# -- Idempotency-Key ----------------------------------------------------------------------------
def test_a_retried_stream_replays_its_events_and_a_json_retry_gets_the_same_turn(api):
    name = fresh(api, "idem")
    body = {"message": "Count to three.", "max_tokens": 12, "stream": True, **GREEDY}
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = sse(api.post(f"sessions/{name}/chat", json=body, headers=key).text)
    again = sse(api.post(f"sessions/{name}/chat", json=body, headers=key).text)
    as_json = api.post(f"sessions/{name}/chat", json={**body, "stream": False}, headers=key)
    text = "".join(d["delta"] for k, d in first if k == "token")
    assert first[-1][0] == again[-1][0] == "complete" and text
    assert "".join(d["delta"] for k, d in again if k == "token") == text  # never an empty 200
    assert again[-1][1]["response"]["id"] == first[-1][1]["response"]["id"] == as_json.json()["response"]["id"]
    assert len(api.get(f"sessions/{name}").json()["messages"]) == 2  # one turn
    other = fresh(api, "idem-other")  # keys are per session: the same key there is a new turn
    elsewhere = api.post(f"sessions/{other}/chat", json={**body, "stream": False}, headers=key).json()
    assert elsewhere["session_id"] != first[-1][1]["session_id"] and elsewhere["response"]["id"] not in (
        first[-1][1]["response"]["id"],)
    conflict = api.post(f"sessions/{name}/chat", json={**body, "message": "Something else."}, headers=key)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"
    bad = api.post(f"sessions/{name}/chat", json=body, headers={"Idempotency-Key": "tab\tkey"})
    assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["error"]["message"]


def test_a_retry_joins_the_in_flight_original_which_then_outlives_its_client(server, api):
    name = fresh(api, "flight")
    key = {"Idempotency-Key": uuid.uuid4().hex, **AUTH}
    body = {"message": "Write a long story about the sea.", "max_tokens": 400, "stream": True, **GREEDY}
    url = server["url"] + f"offgrid/v1/sessions/{name}/chat"
    with httpx.Client(timeout=120) as original_client, httpx.Client(timeout=120) as retry_client:
        with original_client.stream("POST", url, json=body, headers=key) as original:
            lines = original.iter_lines()  # kept: a dropped iterator closes the connection
            seen = []  # up to the first token: "queued" (if the engine was still admitting it), "start", ...
            for line in lines:
                seen.append(line)
                if line == "event: token":  # generating
                    break
            assert "event: start" in seen
            retry_cm = retry_client.stream("POST", url, json=body, headers=key)  # the client thinks it failed
            retry = retry_cm.__enter__()
            retry_lines = retry.iter_lines()
            replay = [next(retry_lines) for _ in seen]
            assert replay == seen  # joined: the same events, replayed from the start
        # the original client went away mid-stream; the retry still wants the answer, so it goes on
        rest = "\n".join(replay + list(retry_lines))
        retry_cm.__exit__(None, None, None)
    events = sse(rest)
    final = events[-1][1]
    assert events[-1][0] == "complete" and final["finish_reason"] in ("stop", "length")
    assert "".join(d["delta"] for k, d in events if k == "token") == final["text"]
    messages = api.get(f"sessions/{name}").json()["messages"]
    assert len(messages) == 2 and messages[1]["id"] == final["response"]["id"]


# -- clients that go away ---------------------------------------------------------------------------
class Vanishing:
    """A raw HTTP client that sends a request, then closes its connection without reading."""

    def __init__(self, server, path, body):
        host, port = server["url"].split("//")[1].rstrip("/").split(":")
        data = json.dumps(body).encode()
        self.sock = socket.create_connection((host, int(port)))
        self.sock.sendall((f"POST /offgrid/v1/{path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                           f"Authorization: token {TOKEN}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(data)}\r\n\r\n").encode() + data)

    def vanish(self):
        self.sock.close()


def wait_for(api, predicate):
    """Poll generation/status (a real request each time) until *predicate(status)* holds."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = api.get("generation/status").json()
        if predicate(status):
            return status
    raise AssertionError(f"status never matched: {status}")


def test_a_disconnect_cancels_a_chat_waiting_for_its_session_or_for_the_model(server, api):
    busy, queued = fresh(api, "busy"), fresh(api, "queued")
    busy_id = api.get(f"sessions/{busy}").json()["id"]
    queued_id = api.get(f"sessions/{queued}").json()["id"]
    holder, generating = {}, threading.Event()

    def hold():
        with api.stream("POST", f"sessions/{busy}/chat", json={"message": "Write a long essay about rivers.",
                                                                 "max_tokens": 400, "stream": True, **GREEDY}) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line == "event: token":
                    generating.set()
            holder["events"] = sse("\n".join(lines))

    t = threading.Thread(target=hold)
    t.start()
    assert generating.wait(60)
    running = wait_for(api, lambda st: st["generating_session_id"] == busy_id)
    base = server["url"] + "offgrid/v1/"
    with slots_taken(base, parallel_slots(base) - 1, max_tokens=1000):  # every other slot busy: the next queues
        for_session = Vanishing(server, f"sessions/{busy}/chat", {"message": "Me too (session).", "max_tokens": 50})
        for_model = Vanishing(server, f"sessions/{queued}/chat", {"message": "Me too (queue).", "max_tokens": 50})
        wait_for(api, lambda st: st["waiting_for_session"].get(busy_id) == 1 and queued_id in st["queued_session_ids"])
        for_session.vanish()
        for_model.vanish()
        wait_for(api, lambda st: not st["waiting_for_session"] and not st["queued_session_ids"])  # both let go
    assert api.post("generation/cancel", json={"request_id": running["generating_request_id"]}).status_code == 200
    t.join(120)
    assert holder["events"][-1][0] == "complete" and holder["events"][-1][1]["finish_reason"] == "cancelled"
    messages = api.get(f"sessions/{busy}").json()["messages"]
    assert [m["content"] for m in messages][:1] == ["Write a long essay about rivers."] and len(messages) == 2
    assert api.get(f"sessions/{queued}").json()["messages"] == []  # never stored, never answered
    rows = api.get("stats/requests", params={"session": queued}).json()
    finish = rows["columns"].index("finish_reason")
    assert [r[finish] for r in rows["data"]] == ["cancelled"]  # it left the queue without generating
    assert api.post("generation/cancel", json={"request_id": "req-000000000000"}).status_code == 404


# -- hostile input ------------------------------------------------------------------------------------
def nested(depth, leaf="x"):
    value = leaf
    for _ in range(depth):
        value = {"k": value}
    return value


SURROGATE = '"bad \\ud800 text"'  # a JSON string holding a lone surrogate (escaped, as attackers send it)
HOSTILE = [
    # (method, path, raw body or JSON value, expected status, words the error must contain)
    ("POST", "sessions", {"name": "deep", "metadata": nested(490)}, 400, "limit is 32"),
    ("POST", "sessions", "[" * 100_000 + "]" * 100_000, 413, "limit"),
    ("POST", "sessions", "[" * 5000 + "]" * 5000, 400, "nested"),
    ("POST", "sessions/victim/messages", {"role": "user", "content": "x", "metadata": nested(40)}, 400, "limit is 32"),
    ("POST", "sessions/victim/chat", {"message": "hi", "metadata": nested(40)}, 400, "limit is 32"),
    ("POST", "sessions", '{"name": %s}' % SURROGATE, 400, "lone surrogate"),
    ("POST", "sessions", '{"system_prompt": %s}' % SURROGATE, 400, "lone surrogate"),
    ("POST", "sessions", '{"profile": %s}' % SURROGATE, 400, "lone surrogate"),
    ("POST", "sessions", '{"metadata": {%s: 1}}' % SURROGATE, 400, "lone surrogate"),
    ("POST", "sessions/victim/messages", '{"role": "user", "content": %s}' % SURROGATE, 400, "lone surrogate"),
    ("POST", "sessions/victim/chat", '{"message": %s}' % SURROGATE, 400, "lone surrogate"),
    ("POST", "chat/completions", '{"messages": [{"role": "user", "content": %s}]}' % SURROGATE, 400, "surrogate"),
    ("POST", "chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "system_prompt": %s}'
     % SURROGATE, 400, "surrogate"),
    ("POST", "sessions", b'{"name": "\xff\xfe"}', 400, "UTF-8"),
    ("POST", "sessions", b'{"name": "caf\xe9"}', 400, "UTF-8"),
    ("POST", "sessions", {"name": "abc\n"}, 400, "Invalid session name"),
    ("POST", "sessions", {"name": "nul\u0000name"}, 400, "name"),
    ("POST", "sessions", {"name": "../../etc/passwd"}, 400, "name"),
    ("POST", "sessions", {"name": "x" * 65}, 400, "name"),
    ("POST", "sessions/victim/messages", {"role": "user", "content": "   \n\t "}, 400, "content"),
    ("POST", "sessions/victim/messages", {"role": "user", "content": ""}, 400, "content"),
    ("POST", "sessions/victim/messages", {"role": "user", "content": None}, 400, "content"),
    ("POST", "sessions/victim/chat", {"message": "hi", "max_tokens": 10**30}, 400, "max_tokens"),
    ("POST", "sessions/victim/chat", {"message": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("POST", "sessions/victim/chat", {"message": "hi", "seed": 2**64}, 400, "seed"),
    ("POST", "sessions/victim/chat", {"message": "hi", "temperature": True}, 400, "temperature"),
    ("POST", "sessions/victim/chat", '{"message": "hi", "temperature": NaN}', 400, "NaN"),
    ("POST", "sessions/victim/chat", '{"message": "hi", "temperature": Infinity}', 400, "Infinity"),
    ("POST", "sessions/victim/chat", '{"message": "hi", "max_tokens": 1e400}', 400, "not a JSON number"),
    ("POST", "sessions/victim/chat", '{"message": "hi", "seed": %s}' % ("9" * 5000), 400, "not valid JSON"),
    ("POST", "sessions/victim/chat", {"message": "x" * 70_000}, 413, "limit"),
    ("POST", "sessions/victim/chat", [1, 2], 400, "JSON object"),
    ("POST", "sessions/victim/chat", "null", 400, "JSON object"),
    ("POST", "sessions/victim/chat", "{", 400, "not valid JSON"),
    ("POST", "chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("POST", "generation/cancel", {"request_id": ""}, 400, "request_id"),
    ("GET", "sessions?limit=100000000000000000000", None, 400, "limit"),
    ("GET", "sessions?offset=-1", None, 400, "offset"),
    ("GET", "sessions?offset=99999999999", None, 400, "offset"),
    ("GET", "stats/requests?since=", None, 400, "time"),
    ("GET", "stats/requests?since=2026-02-31", None, 400, "filter"),
    ("GET", "stats/requests?since=1e999", None, 400, "time"),
    ("GET", "sessions/..%2F..%2Fapi%2Fcontents", None, 404, "session"),
    ("GET", "sessions/%ED%A0%80", None, 400, ""),
    ("GET", "sessions/abc%0A", None, 404, "not a valid session id or name"),
    ("GET", "sessions/" + "a" * 5000, None, 404, "session"),
    ("GET", "sessions/%00", None, 404, "session"),
    ("PUT", "sessions/victim", {}, 405, "DELETE or GET or PATCH"),
    ("PUT", "sessions", {}, 405, "GET or POST"),
]


@pytest.mark.parametrize("method, path, body, status, needle", HOSTILE,
                         ids=[f"{i}-{m}-{p.split('?')[0][:24]}" for i, (m, p, *_r) in enumerate(HOSTILE)])
def test_hostile_input_is_a_clear_4xx_and_everything_still_reads(api, method, path, body, status, needle):
    if not api.get("sessions/victim").is_success:
        api.post("sessions", json={"name": "victim"})
    before = api.get("sessions", params={"limit": 1000}).json()["total"]
    raw = body if isinstance(body, (str, bytes)) else None if body is None else json.dumps(body)
    r = api.request(method, path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert needle.lower() in error["message"].lower() and set(error) == {"message", "type", "code"}
    if status == 405:
        assert r.headers["Allow"] and method not in r.headers["Allow"]
    listed = api.get("sessions", params={"limit": 1000})
    assert listed.status_code == 200 and listed.json()["total"] == before  # nothing was stored
    assert api.get("sessions/victim").status_code == 200
    assert api.get("sessions/victim").json()["messages"] == []


def test_an_oversized_body_is_refused_before_it_is_read(server):
    """A client announces 100 MB: the answer comes before it sends them, and the connection closes."""
    host, port = server["url"].split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall((f"POST /offgrid/v1/sessions HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: token {TOKEN}"
                      f"\r\nContent-Type: application/json\r\nContent-Length: {100 * 1024 * 1024}\r\n\r\n"
                      "{").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"closed without an answer: {answer!r}"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"104857600 bytes" in answer
    assert b"\r\nconnection: close\r\n" in answer.lower()  # so no client reuses a connection about to close
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # unauthenticated: refused first
        sock.sendall((f"POST /offgrid/v1/sessions HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      f"Content-Length: {100 * 1024 * 1024}\r\n\r\n").encode())
        refused = sock.recv(65536)
        assert refused.startswith(b"HTTP/1.1 403") and b"\r\nconnection: close\r\n" in refused.lower()


# -- the server's own contract ---------------------------------------------------------------------------
@pytest.mark.timeout(600)  # a few minutes on 2 cores: every chat it sends generates
def test_schemathesis_finds_no_server_error_and_no_contract_violation(tmp_path):
    """schemathesis (every check) against the live server's openapi.json: 0 5xx, 0 conformance failures."""
    # A schema-valid request may still be too large in ways a JSON schema cannot say (bytes, tokens in
    # the model's context): 413 is accepted for valid data too; and a response_format schema may be
    # valid JSON Schema that no llama.cpp grammar can express: 422. Nothing else is added.
    config = tmp_path / "schemathesis.toml"
    # And a session may name a profile that does not exist, which the issue says is a 400: for
    # POST /sessions alone, 400 is accepted too.
    # An invalid body larger than c.OffgridApp.max_body_bytes is refused as too large before it is read
    # (413), which schemathesis does not count as a rejection of invalid data: 413 is added there.
    accepted = '"2xx", "3xx", "401", "403", "404", "409", "413", "422", "429"'
    rejected = '"400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"'
    # Schema-valid data the server must still refuse with a 400: a learn whose every path is missing
    # (nothing is made), and a response_format or tool schema whose grammar would be too deep for
    # llama.cpp (a maxLength of 30,000 is valid JSON Schema): for those operations 400 is accepted too.
    also_400 = [("/sessions", "POST"), ("/collections", "POST"), ("/sessions/{ref}/chat", "POST"),
                ("/chat/completions", "POST")]
    config.write_text(f'[checks.positive_data_acceptance]\nexpected-statuses = [{accepted}]\n\n'
                      f'[checks.negative_data_rejection]\nexpected-statuses = [{rejected}]\n\n' + "".join(
                          f'[[operations]]\ninclude-path = "{path}"\ninclude-method = "{method}"\n'
                          f'checks.positive_data_acceptance.expected-statuses = [{accepted}, "400"]\n\n'
                          for path, method in also_400))
    with jupyter_server(tmp_path, "--OffgridApp.n_ctx=384", "--OffgridApp.max_body_bytes=65536") as srv:
        out = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
             srv["url"] + "offgrid/v1/openapi.json",
             "-H", f"Authorization: token {TOKEN}", "--checks", "all", "--max-examples", "60", "--seed", "20261124",
             "--request-timeout", "60", "--max-response-time", "120", "--generation-database", "none",
             "--no-color",
             "--report-dir", str(tmp_path / "report")],
            capture_output=True, text=True, timeout=540, cwd=tmp_path)
    summary = out.stdout[-6000:]
    (tmp_path / "schemathesis.out").write_text(out.stdout)  # the whole of it, for a failure cut above
    assert out.returncode == 0, summary
    spec = json.loads((ROOT / "offgrid_jupyter" / "server" / "openapi.json").read_text())
    operations = sum(1 for item in spec["paths"].values() for method in item if method in HTTP_METHODS)
    selected, total = map(int, re.search(r"Operations:\s+(\d+) selected / (\d+) total", out.stdout).groups())
    # every operation of the contract tested, none left out (schemathesis counts one fewer than the
    # document lists: 27 of our 28 when this was written)
    assert selected == total >= operations - 1, summary
    assert "failure" not in summary.split("SUMMARY")[-1].lower(), summary


# -- kill -9, round after round -----------------------------------------------------------------------
def test_kill_9_mid_turn_round_after_round_loses_nothing_acknowledged(tmp_path):
    acked: list[str] = []
    for round_ in range(10):
        with jupyter_server(tmp_path, *SERVER_ARGS) as srv:
            with httpx.Client(base_url=srv["url"] + "offgrid/v1/", headers=AUTH, timeout=60) as api:
                if round_ == 0:
                    for name in ("turns", "turns-2", "appends"):
                        assert api.post("sessions", json={"name": name}).status_code == 201
                sessions = {name: api.get(f"sessions/{name}").json()["messages"] for name in ("turns", "turns-2")}
                ids = {m["id"] for name in ("turns", "turns-2", "appends")
                       for m in api.get(f"sessions/{name}").json()["messages"]}
                assert set(acked) <= ids, f"round {round_}: lost {set(acked) - ids}"
                for name, messages in sessions.items():  # the start repaired what the kill left
                    assert unanswered(messages) == [], (round_, name, unanswered(messages))
                load = Load(srv["url"] + "offgrid/v1/")
                assert load.tokens.wait(60)
                for _ in range(3):
                    assert load.appended.acquire(timeout=60)
                os.kill(srv["proc"].pid, signal.SIGKILL)
                assert load.join()
                acked += load.acked
        conn = sqlite3.connect(tmp_path / "home" / "offgrid.sqlite3")
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
    store = Store(tmp_path / "home" / "offgrid.sqlite3")
    interrupted = [m for m in store.get("turns").messages if m.interrupted]
    assert len(interrupted) >= 5  # most kills landed mid-turn, and were repaired
    assert all(m["role"] != "user" or n["role"] != "user"
               for m, n in zip(store.get("turns").chat_messages()[:-1], store.get("turns").chat_messages()[1:]))
