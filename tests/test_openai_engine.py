"""The OpenAI-compatible backend, against a real engine: llama-cpp-python's own server on the
default GGUF, started on loopback. (Two small stand-ins play engines that misbehave in ways a
real one cannot be made to on demand: busy with a Retry-After, and a malformed stream.)"""

import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from offgrid_jupyter.errors import EngineUnavailableError, InvalidRequestError
from offgrid_jupyter.inference.openai_engine import OpenAIEngine
from offgrid_jupyter.stats import attach, stats_frame
from offgrid_jupyter.chat.turns import ChatTurn

from .conftest import GREEDY
from .kernels import AUTH, ServerKernel, free_port, jupyter_server, llama_engine

USER = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
def remote(llama_server):
    made = []

    def make(**kwargs):
        eng = OpenAIEngine(llama_server["url"], api_key=llama_server["key"], **kwargs)
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.close()


def test_a_reply_streams_with_usage_and_timings_and_is_recorded(remote, store):
    eng = remote()
    log = attach(eng, store)
    gen = eng.generate(USER, session_id=None, max_tokens=24, **GREEDY)
    kinds, text = [], []
    for kind, payload in gen.events():
        kinds.append(kind)
        if kind == "token":
            text.append(payload)
    result = payload
    assert kinds[0] in ("queued", "start") and kinds[-1] == "complete" and kinds.count("token") >= 2
    assert result.text == "".join(text) and result.text.strip()
    assert result.model == "smollm2" and result.finish_reason in ("stop", "length")
    assert result.usage["completion_tokens"] >= 2 and result.timings["ttft_ms"] > 0
    assert result.timings["tokens_per_second"] > 0
    again = eng.complete(USER, max_tokens=24, **GREEDY)
    # the engine reuses the first prompt's KV cells, whose numerics differ slightly from a fresh
    # evaluation, so greedy decoding may part ways after a few tokens: compare structure, not wording
    assert again.text.strip() and again.finish_reason in ("stop", "length") and again.request_id != result.request_id
    log.close()
    frame = stats_frame(store=store)
    assert len(frame) == 2 and set(frame["model"]) == {"smollm2"} and (frame["completion_tokens"] >= 2).all()
    assert eng.describe()["kind"] == "openai" and eng.describe()["loaded"] is True
    assert [m["id"] for m in eng.models()] == ["smollm2"]


def test_up_to_max_concurrent_run_at_once_the_rest_queue_in_order_and_each_cancels_alone(remote):
    eng = remote(max_concurrent=2)
    started = threading.Semaphore(0)
    gens = []
    for i in range(4):
        gen = eng.generate([{"role": "user", "content": f"Write a long story about the number {i}."}],
                           session_id=f"s{i}", max_tokens=200, **GREEDY)
        gen.listen(lambda kind, _p: kind == "start" and started.release())
        gens.append(gen)
    assert started.acquire(timeout=60) and started.acquire(timeout=60)
    status = eng.status()
    assert [g["session_id"] for g in status["generating"]] == ["s0", "s1"]
    assert status["queued_session_ids"] == ["s2", "s3"] and [g.position for g in gens[2:]] == [1, 2]
    assert eng.stats()["queue"]["running"] == 2 and eng.stats()["queue"]["slots"] == 2
    gens[3].cancel()  # leaves the queue at once
    gens[0].cancel()  # closes its stream: the engine stops it, and s2 starts in its place
    assert gens[3].wait().finish_reason == "cancelled" and gens[3].result.usage["completion_tokens"] == 0
    assert gens[0].wait().finish_reason == "cancelled"
    assert started.acquire(timeout=60)  # s2 started
    gens[1].cancel()
    gens[2].cancel()
    assert {gens[1].wait().finish_reason, gens[2].wait().finish_reason} <= {"cancelled", "length", "stop"}
    assert eng.status()["generating"] == [] and eng.busy_session_ids() == set()


def test_an_unreachable_engine_or_a_refused_key_is_one_clear_error_naming_the_url(llama_server):
    port = free_port()  # nothing listens there
    down = OpenAIEngine(f"http://127.0.0.1:{port}/v1", model="smollm2", api_key="s3cret-key")
    with pytest.raises(EngineUnavailableError) as caught:
        down.complete(USER, max_tokens=4)
    assert f"127.0.0.1:{port}/v1" in str(caught.value) and "not reachable" in str(caught.value)
    assert "s3cret" not in str(caught.value) and caught.value.status == 502
    down.close()
    unnamed = OpenAIEngine(f"http://127.0.0.1:{port}/v1")  # the model would come from its list
    assert "not reachable" in unnamed.describe()["error"] and unnamed.describe()["loaded"] is False
    unnamed.close()
    wrong = OpenAIEngine(llama_server["url"], model="smollm2", api_key="wrong-key-123")
    with pytest.raises(EngineUnavailableError, match="refused the API key") as caught:
        wrong.complete(USER, max_tokens=4)
    assert "wrong-key-123" not in str(caught.value)
    wrong.close()
    with pytest.raises(InvalidRequestError, match="not an http"):
        OpenAIEngine("ftp://example/v1")


def test_a_model_the_engine_does_not_serve_is_refused_naming_those_it_does(remote):
    eng = remote()
    with pytest.raises(InvalidRequestError, match="serves: smollm2"):
        eng.generate(USER, model="gpt-17")
    assert eng.switch_model("smollm2").name == "smollm2"


# -- engines that misbehave --------------------------------------------------------------------
class _Fake(BaseHTTPRequestHandler):
    script: list  # what each POST answers, in turn: (status, headers, body)
    posts = 0

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._send(200, {"Content-Type": "application/json"}, json.dumps({"data": [{"id": "fake"}]}))

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts += 1
        self._send(*self.script.pop(0))

    def _send(self, status, headers, body):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())


def _sse(*chunks):
    return "".join(f"data: {json.dumps(c) if not isinstance(c, str) else c}\n\n" for c in chunks)


def _delta(text, finish=None):
    return {"choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}


@pytest.fixture
def fake_engine():
    handler = type("Fake", (_Fake,), {"script": [], "posts": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_busy_engine_is_retried_after_its_retry_after_then_answers(fake_engine):
    handler, url = fake_engine
    stream = {"Content-Type": "text/event-stream"}
    handler.script = [(429, {"Retry-After": "0"}, "{}"), (503, {"Retry-After": "0"}, "{}"),
                      (200, stream, _sse(_delta("Hi"), _delta(" there", "stop"), "[DONE]"))]
    eng = OpenAIEngine(url)  # no /v1 in the URL: it is added
    result = eng.complete(USER, max_tokens=8)
    assert result.text == "Hi there" and result.usage["completion_tokens"] == 2 and handler.posts == 3
    assert result.model == "fake"  # the engine's first listed model
    eng.close()


def test_a_malformed_or_truncated_stream_ends_the_turn_as_an_error_and_stores_nothing(fake_engine, store):
    handler, url = fake_engine
    stream = {"Content-Type": "text/event-stream"}
    handler.script = [(200, stream, _sse(_delta("Half an"), "{not json")),
                      (200, stream, _sse(_delta("Half an"), _delta(" answer"))),  # ends without a finish_reason
                      (400, {"Content-Type": "application/json"},
                       json.dumps({"error": {"message": "This model's maximum context length is 2048"}}))]
    eng = OpenAIEngine(url + "/v1", model="fake")
    session = store.create("fragile")
    for needle in ("malformed", "ended before the reply did", "too long"):
        turn = ChatTurn(eng, store, session.id, "Tell me everything.", params={}, source="api", history=True).start()
        with pytest.raises(Exception, match=needle):
            turn.finish()
        assert store.get(session.id).messages == []  # the question went back out with the failed turn
    eng.close()


# -- the whole path ----------------------------------------------------------------------------
def test_killing_the_engine_mid_reply_stores_nothing_half_done_and_a_restart_continues(store):
    port = free_port()
    with llama_engine(port) as srv:
        eng = OpenAIEngine(srv["url"], api_key=srv["key"], model="smollm2")
        session = store.create("survivor")
        turn = ChatTurn(eng, store, session.id, "Write a very long story about a lighthouse.",
                        params={"max_tokens": 400, **GREEDY}, source="api", history=True).start()
        first = threading.Event()
        turn.generation.listen(lambda kind, _p: kind == "token" and first.set())
        assert first.wait(60)
        srv["proc"].kill()
        with pytest.raises(EngineUnavailableError, match=f"127.0.0.1:{port}"):
            turn.finish()
        assert store.get(session.id).messages == []
        assert store.transaction(lambda c: c.execute("SELECT * FROM busy").fetchall()) == []  # no mark left
    with llama_engine(port):  # the same engine, back on the same port
        again = ChatTurn(eng, store, session.id, "Say hello.", params={"max_tokens": 8, **GREEDY}, source="api",
                         history=True).start().finish()
        assert again.reply is not None and [m.role for m in store.get(session.id).messages] == ["user", "assistant"]
    eng.close()


def test_magics_in_an_ipython_shell_run_on_the_engine_without_importing_llama_cpp(llama_server, tmp_path):
    script = textwrap.dedent("""
        import sys
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        ip.run_line_magic("load_ext", "offgrid_jupyter")
        ip.run_cell_magic("offgrid", "-s remote-notes -n 16 -t 0 --seed 1", "My name is Ada. Say hello.")
        ip.run_cell_magic("offgrid", "-s remote-notes -n 16 -t 0 --seed 1 -o reply", "What is my name?")
        status = ip.run_line_magic("offgrid", "status")
        frame = ip.run_line_magic("offgrid", "sessions")
        print("STATUS", dict(status.rows)["runs"])
        print("MESSAGES", int(frame.loc[frame["name"] == "remote-notes", "message_count"].iloc[0]))
        print("REPLY", bool(str(ip.user_ns["reply"]).strip()))
        print("LLAMA", "llama_cpp" in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFGRID_")}
    env.update(OFFGRID_HOME=str(tmp_path), OFFGRID_ENGINE_URL=llama_server["url"],
               OFFGRID_ENGINE_API_KEY=llama_server["key"])
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    keys = ("STATUS", "MESSAGES", "REPLY", "LLAMA")  # (the replies stream into stdout too: "I'm" is upper case)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ")[0] in keys)
    assert "engine at " + llama_server["url"] in lines["STATUS"]
    assert lines["MESSAGES"] == "4" and lines["REPLY"] == "True" and lines["LLAMA"] == "False"
    assert llama_server["key"] not in out.stdout + out.stderr


def test_a_jupyter_server_on_the_engine_serves_its_routes_and_loads_no_model(llama_server, tmp_path):
    with jupyter_server(tmp_path, f"--OffgridApp.engine_url={llama_server['url']}",
                        f"--OffgridApp.engine_api_key={llama_server['key']}",
                        "--OffgridApp.engine_max_concurrent=3") as srv:
        with httpx.Client(base_url=srv["url"] + "offgrid/v1/", headers=AUTH, timeout=120) as api:
            assert api.post("sessions", json={"name": "via-engine"}).status_code == 201
            reply = api.post("sessions/via-engine/chat", json={"message": "Hello!", "max_tokens": 12, **GREEDY})
            assert reply.status_code == 200 and reply.json()["response"]["content"].strip()
            with api.stream("POST", "sessions/via-engine/chat",
                            json={"message": "And again?", "max_tokens": 12, "stream": True, **GREEDY}) as r:
                kinds = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
            assert kinds[0] in ("queued", "start") and "token" in kinds and kinds[-1] == "complete"
            models = api.get("models").json()
            assert [m["id"] for m in models["data"]] == ["smollm2"] and models["current"]["kind"] == "openai"
            assert llama_server["key"] not in json.dumps(models)
            stats = api.get("stats").json()
            assert stats["inference"]["models"]["smollm2"]["completed"] == 2
            assert stats["server"]["current_model"] == "smollm2"
            assert api.get("generation/status").json()["generating"] == []
            with ThreadPoolExecutor(4) as pool:  # more chats at once than engine_max_concurrent: all answered
                crowd = list(pool.map(lambda i: api.post("chat/completions", json={
                    "messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 24, **GREEDY}), range(4)))
            assert [r.status_code for r in crowd] == [200] * 4, [r.text[:200] for r in crowd]
            assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in crowd)
            messages = api.get("sessions/via-engine").json()["messages"]
            assert [m["role"] for m in messages] == ["user", "assistant"] * 2
        # a notebook's kernel, started by this server: its magic and its panel run on the engine too
        outputs = ServerKernel.run_cells(srv["url"], [
            "%load_ext offgrid_jupyter",
            "%%offgrid -s nb-engine -t 0 --seed 1 -n 12\nSay hello.",
            "from offgrid_jupyter import ChatPanel\n"
            "panel = ChatPanel('nb-engine', max_tokens=8, temperature=0.0)\npanel.send('And the panel?')\n"
            "assert panel.join(120), 'the panel did not finish'\n"
            "import sys; print(repr(panel.status.value), repr(panel.error.value), 'llama_cpp' in sys.modules)"])
        assert all(cell[-1]["content"]["status"] == "ok" for cell in outputs), outputs
        printed = "".join(m["content"]["text"] for m in outputs[2] if m["msg_type"] == "stream")
        status, error, llama = printed.rsplit(" ", 2)
        assert "server" in status and error == "''" and llama.strip() == "False"
        with httpx.Client(base_url=srv["url"] + "offgrid/v1/", headers=AUTH, timeout=60) as api:
            notebook = api.get("sessions/nb-engine").json()["messages"]
            assert [m["role"] for m in notebook] == ["user", "assistant"] * 2
            assert notebook[2]["content"] == "And the panel?" and notebook[3]["content"].strip()
            assert api.get("stats").json()["inference"]["models"]["smollm2"]["completed"] == 8
        with open(f"/proc/{srv['proc'].pid}/maps") as fh:
            assert "libllama" not in fh.read()  # no model in the Jupyter server's process


def test_offgrid_engine_switches_a_shell_to_the_engine_and_back(llama_server, engine, store, tmp_path):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from offgrid_jupyter.kernel.context import Context
    from offgrid_jupyter.kernel.magics import OffgridMagics
    from offgrid_jupyter.kernel.widget import ChatPanel

    ip = InteractiveShell.instance()
    context = Context(ip, engine=engine, store=store)
    magics = OffgridMagics(shell=ip, context=context)
    ip.register_magics(magics)

    def run(code):
        with capture_output() as cap:
            result = ip.run_cell(code)
        return result, cap

    try:
        result, _ = run(f"%offgrid engine {llama_server['url']} --api-key {llama_server['key']} --max-concurrent 2")
        assert "smollm2" in result.result._repr_markdown_() and llama_server["key"] not in repr(result.result)
        result, _ = run("%offgrid status")
        assert "engine at " + llama_server["url"] in dict(result.result.rows)["runs"]
        run("%%offgrid -s on-engine -n 8 -t 0 --seed 1\nSay hello.")
        result, _ = run("%%offgrid -s on-engine -n 8 -t 0 --seed 1 --model smollm2\nAgain.")
        result, _ = run("%%offgrid -s on-engine -n 8 --model gpt-17\nAgain.")  # one line, nothing stored
        assert "has no model 'gpt-17'; it serves: smollm2" in str(result.error_in_exec)
        messages = store.get("on-engine").messages
        assert [m.role for m in messages] == ["user", "assistant"] * 2
        assert {m.metadata["model"] for m in messages if m.role == "assistant"} == {"smollm2"}
        panel = ChatPanel("on-engine", context=context)
        assert "smollm2" in panel.status.value and "engine" in panel.status.value
        panel.close()
        run("%offgrid engine local")
        result, _ = run("%offgrid status")
        assert "in this kernel" in dict(result.result.rows)["runs"]
    finally:
        context.close()


def test_tools_map_to_the_engines_own_tool_calling_and_rounds_run_on_it(remote, store):
    """A named tool_choice is what llama-cpp-python's server constrains (its default chat format
    has no tool prompt of its own); its streamed tool_calls come back as the engine's calls."""
    from offgrid_jupyter.chat.rounds import Rounds

    from .tool_functions import add

    eng = remote()
    question = [{"role": "user", "content": "What is 2 + 3? Use the add tool."}]
    result = eng.complete(question, tools=[add.spec()], tool_choice="add", max_tokens=60, **GREEDY)
    [call] = result.tool_calls
    assert call["name"] == "add" and add.run(call["arguments"])["error"] is None and result.text == ""
    rounds = Rounds(eng, question, [add], tool_choice="add", max_rounds=2, params={"max_tokens": 60, **GREEDY})
    final = rounds.wait()
    assert final.tool_calls and final.tool_calls[0]["name"] == "add" and final.rounds == 2


def test_inline_completions_go_to_the_engines_completions_route_with_the_suffix(remote, store):
    from offgrid_jupyter.inference.completion import CompletionRequest

    eng = remote(completion_model="smollm2")
    log = attach(eng, store)
    request = CompletionRequest(prefix="import math\n\ndef area(r):\n    return ", suffix="\n\nprint(area(2))",
                                context=["radius = 2.0"], path="remote.ipynb", max_tokens=16)
    result = eng.complete_inline(request).wait()
    assert result.source == "completion" and result.finish_reason in ("stop", "length") and result.text.strip()
    assert result.model == "smollm2" and result.usage["completion_tokens"] >= 1  # (its usage, or the pieces)
    # llama-cpp-python's server answers nothing when given a suffix for a model without FIM tokens:
    # asked again without it, and from then on sent without it
    assert eng._suffix is False
    assert eng.status()["generating"] == []  # not a turn anyone waits on
    # a newer keystroke on the same file cancels the one still running
    slow = eng.complete_inline(CompletionRequest(prefix="for i in range(100):\n", path="remote.ipynb",
                                                 max_tokens=200))
    newer = eng.complete_inline(CompletionRequest(prefix="for i in range(100):\n    ", path="remote.ipynb",
                                                  max_tokens=4))
    assert slow.wait().finish_reason == "cancelled" and newer.wait().finish_reason in ("stop", "length")
    log.flush()
    frame = stats_frame(store=store)
    assert set(frame["source"]) == {"completion"} and len(frame) == 3
