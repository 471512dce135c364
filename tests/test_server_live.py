"""A real `jupyter server` on a loopback port: the SDK, streaming, disconnects, and a kernel
the server started that uses the server's model instead of loading its own."""

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from offgrid_jupyter import Client
from offgrid_jupyter.errors import DuplicateNameError, ServerError, SessionNotFoundError
from offgrid_jupyter.stats import requests_frame
from offgrid_jupyter.chat.store import Store

from .kernels import TOKEN, ServerKernel, free_port, jupyter_server
GREEDY = {"temperature": 0, "seed": 42}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with jupyter_server(tmp_path_factory.mktemp("live")) as srv:
        yield srv


@pytest.fixture
def client(server):
    with Client(server["url"] + "offgrid/v1/", api_key=None, max_retries=0) as c:
        c.http.headers["Authorization"] = f"token {TOKEN}"  # Jupyter's own token works like an API key
        c._home = server["home"]
        yield c


def test_the_extension_is_enabled_on_install():
    out = subprocess.run([sys.executable, "-m", "jupyter", "server", "extension", "list"], capture_output=True,
                         text=True, timeout=60)
    text = out.stdout + out.stderr
    assert "offgrid_jupyter" in text and "enabled" in text.split("offgrid_jupyter", 1)[1][:40]


def test_sdk_sessions_chat_stream_and_stats(client):
    name = "sdk-" + uuid.uuid4().hex[:6]
    created = client.sessions.create(name, system_prompt="Be brief.")
    assert created["name"] == name
    with pytest.raises(DuplicateNameError):
        client.sessions.create(name)
    assert name in [s["name"] for s in client.sessions.list()]
    client.sessions.add_message(name, "user", "Remember: the code word is heron.")
    turn = client.sessions.chat(name, "What is the code word?", max_tokens=12, **GREEDY)
    assert turn["response"]["role"] == "assistant" and turn["usage"]["prompt_tokens"] > 20
    events = list(client.sessions.stream(name, "Say it again.", max_tokens=12, **GREEDY))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "complete" and "token" in kinds and "start" in kinds
    assert events[-1][1]["text"] == "".join(d["delta"] for k, d in events if k == "token")
    assert len(client.sessions.get(name)["messages"]) == 5
    one_shot = client.chat("Say hi.", max_tokens=5, **GREEDY)
    assert one_shot["text"] and one_shot["usage"]["completion_tokens"] > 0
    other = "with-" + uuid.uuid4().hex[:6]
    client.sessions.chat_with_session(other, "Hello!", max_tokens=5)  # created on first use
    assert len(client.sessions.get(other)["messages"]) == 2
    stats = client.stats()
    assert stats["inference"]["aggregate"]["total_requests"] >= 4
    assert set(client.generation_status()) >= {"generating_session_id", "queued_session_ids", "waiting_for_session"}
    frame = client.stats_frame(session=name)
    assert len(frame) == 2 and set(frame["source"]) == {"server"}
    assert str(frame["started_at"].dtype) == "datetime64[ns, UTC]" and frame["completion_tokens"].dtype == "int64"
    assert isinstance(frame["finish_reason"].dtype, pd.CategoricalDtype)
    local = requests_frame(Store(server_home(client)))  # the same frame as in-process, column for column
    assert list(frame.columns) == list(local.columns)
    assert [str(t) for t in frame.dtypes if str(t) != "category"] == \
        [str(t) for t in local.dtypes if str(t) != "category"]
    client.sessions.delete(name)
    with pytest.raises(SessionNotFoundError):
        client.sessions.get(name)


def server_home(client):
    return client._home / "offgrid.sqlite3"


def test_names_are_url_encoded(client):
    with pytest.raises(SessionNotFoundError):
        client.sessions.get("../../api/contents")  # stays a session name: never a path on the server


def test_a_disconnecting_stream_cancels_its_generation(client):
    name = "drop-" + uuid.uuid4().hex[:6]
    client.sessions.create(name)
    stream = client.sessions.stream(name, "Write a long essay about rivers.", max_tokens=400, **GREEDY)
    for kind, _ in stream:
        if kind == "token":
            break
    stream.close()  # the client goes away mid-generation
    after = client.sessions.chat(name, "Hi.", max_tokens=4, **GREEDY)  # queued behind it: served once it stopped
    assert after["response"]
    messages = client.sessions.get(name)["messages"]
    cancelled = messages[1]
    assert cancelled["role"] == "assistant" and cancelled["finish_reason"] == "cancelled"
    assert 0 < cancelled["usage"]["completion_tokens"] < 400


def test_a_kernel_started_by_the_server_uses_the_servers_model(server, client):
    cells = ["%load_ext offgrid_jupyter",
             "%%offgrid -t 0 --seed 42 -n 12\nSay hello.",
             "from offgrid_jupyter import ChatPanel\n"
             "panel = ChatPanel(max_tokens=8, temperature=0.0)\npanel.send('Hello from the panel.')\n"
             "assert panel.join(120), 'the panel did not finish'\n",
             "import sys, json; m = get_ipython().magics_manager.registry['OffgridMagics']; "
             "print(json.dumps({'llama_cpp': 'llama_cpp' in sys.modules, 'engine': m.context._engine is not None, "
             "'where': m.context.where, 'panel': panel.status.value, 'error': panel.error.value, "
             "'panel_session': panel.session_id}))"]
    outputs = ServerKernel.run_cells(server["url"], cells)
    assert all(cell[-1]["content"]["status"] == "ok" for cell in outputs), outputs
    shown = [m for m in outputs[1] if m["msg_type"] in ("display_data", "update_display_data")]
    meta = shown[-1]["content"]["metadata"]["offgrid"]
    assert meta["usage"]["completion_tokens"] > 0
    printed = json.loads(next(m for m in outputs[3] if m["msg_type"] == "stream")["content"]["text"])
    assert not printed["llama_cpp"] and not printed["engine"]  # no model in the kernel, panel included
    assert "on the Jupyter server" in printed["where"] and "server" in printed["panel"] and not printed["error"]
    assert printed["panel_session"] == meta["session_id"]  # the panel opens on the notebook's session
    panel_turn = client.sessions.get(printed["panel_session"])["messages"][-2:]
    assert [m["role"] for m in panel_turn] == ["user", "assistant"]
    assert panel_turn[0]["content"] == "Hello from the panel."
    # one store: the kernel's turn is in the server's database, recorded as served by the server
    store = Store(server["home"] / "offgrid.sqlite3")
    session = store.get(meta["session_id"])
    assert [m.role for m in session.messages][:2] == ["user", "assistant"]
    assert session.messages[1].id == meta["message_id"]
    assert meta["request_id"] in set(requests_frame(store)["request_id"])
    assert client.sessions.get(meta["session_id"])["messages"][1]["content"] == session.messages[1].content


def test_a_server_kernel_and_the_sdk_attach_variables_through_the_routes(server, client):
    cells = ["%load_ext offgrid_jupyter",
             "import pandas as pd\nsales = pd.DataFrame({'units': [1, None]})",
             "%%offgrid -t 0 --seed 42 -n 4 -s attached-here\nWhich column of @sales has a gap?",
             "from offgrid_jupyter import ChatPanel\n"
             "panel = ChatPanel('attached-here', max_tokens=4, temperature=0.0)\npanel.send('And now @sales?')\n"
             "assert panel.join(120), 'the panel did not finish'\nprint(panel.error.value or 'ok')"]
    outputs = ServerKernel.run_cells(server["url"], cells)
    assert all(cell[-1]["content"]["status"] == "ok" for cell in outputs), outputs
    users = [m for m in client.sessions.get("attached-here")["messages"] if m["role"] == "user"]
    assert [[(c["kind"], c["name"], c["type"]) for c in m["metadata"]["context"]] for m in users] == \
        [[("variable", "sales", "DataFrame")]] * 2  # the magic and the panel, through the server's route
    assert "- units: float64, 1 null" in users[0]["metadata"]["context"][0]["text"]
    attached = [{"kind": "selection", "name": "from In[3]", "text": "x = 1"}]
    turn = client.chat("What does the selection do?", "attached-here", context=attached, max_tokens=3, temperature=0)
    assert turn["message"]["metadata"]["context"][0]["name"] == "from In[3]"
    with_it = client.chat("What does the selection do?", context=attached, max_tokens=3, temperature=0)
    without = client.chat("What does the selection do?", max_tokens=3, temperature=0)
    assert with_it["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + 10  # a one-shot carries it


def test_interrupting_a_server_kernel_stops_the_servers_generation(server, client):
    async def scenario():
        async with ServerKernel(server["url"]) as kernel:
            await kernel.run("%load_ext offgrid_jupyter")
            state = {}

            def on_message(msg):
                if (msg["msg_type"] == "update_display_data" and "sent" not in state
                        and msg["content"]["data"].get("text/markdown", "").endswith("▌")):
                    state["sent"] = True
                    return kernel.interrupt()  # the Stop button
                return None

            out = await kernel.run("%%offgrid -t 0 -n 400\nWrite a long essay about maps.", on_message)
            after = await kernel.run("%%offgrid -t 0 -n 4\nSay hi.")
            return state, out, after

    state, out, after = asyncio.run(scenario())
    assert state.get("sent") and out[-1]["content"]["ename"] == "Interrupted"
    final = [m for m in out if m["msg_type"] == "update_display_data"][-1]["content"]["metadata"]["offgrid"]
    assert final["finish_reason"] == "cancelled"
    kept = client.sessions.get(final["session_id"])["messages"]
    assert kept[1]["finish_reason"] == "cancelled" and kept[1]["id"] == final["message_id"]
    assert 0 < kept[1]["usage"]["completion_tokens"] < 400
    assert after[-1]["content"]["status"] == "ok"  # the next cell works at once


def test_a_server_kernel_runs_its_own_tools_and_stop_interrupts_a_running_tool(server, client):
    """The kernel drives the rounds (its functions run in the kernel; each round is one generation on
    the server's model); the kernel's Stop button stops a tool that is running."""
    async def scenario():
        async with ServerKernel(server["url"]) as kernel:
            await kernel.run("%load_ext offgrid_jupyter")
            await kernel.run("import time\ncalls = []\n"
                             "def add(a: int, b: int) -> int:\n    'Add two integers.'\n"
                             "    calls.append((a, b))\n    return a + b\n"
                             "def slow_lookup(word: str) -> str:\n    'Look a word up in the dictionary.'\n"
                             "    time.sleep(120)\n    return 'found'\n")
            ok = await kernel.run("%%offgrid -s kernel-tools -t 0 --seed 1 --tools add --tool-choice required\n"
                                  "What is 2 + 3? Use the add tool.")
            printed = await kernel.printed("import sys, json; print(json.dumps({'calls': calls, "
                                           "'llama_cpp': 'llama_cpp' in sys.modules}))")
            state = {}

            def on_message(msg):
                shown = msg["content"].get("data", {}).get("text/markdown", "")
                if msg["msg_type"] == "update_display_data" and "calling slow_lookup" in shown and "at" not in state:
                    state["at"] = time.monotonic()
                    return kernel.interrupt()  # the Stop button, while the tool sleeps
                return None

            stopped = await kernel.run("%%offgrid -s kernel-stop -t 0 --seed 1 --tools slow_lookup "
                                       "--tool-choice required\nWhat does 'serendipity' mean?", on_message)
            state["ended"] = time.monotonic()
            after = await kernel.printed("print('still here')")
            return ok, json.loads(printed), state, stopped, after

    ok, printed, state, stopped, after = asyncio.run(scenario())
    assert ok[-1]["content"]["status"] == "ok", ok
    assert printed["calls"] and not printed["llama_cpp"]  # the tool ran in the kernel; no model there
    session = client.sessions.get("kernel-tools")
    roles = [m["role"] for m in session["messages"]]
    assert roles[:2] == ["user", "tool"] and roles[-1] == "assistant"
    assert session["messages"][-1]["tool_calls"][0]["name"] == "add"
    rows = client.stats_frame(session=session["id"])  # each round was a request of the server's, for this session
    assert len(rows) >= 2 and set(rows["source"]) == {"openai"}
    assert "at" in state and state["ended"] - state["at"] < 30 and stopped[-1]["content"]["ename"] == "Interrupted"
    kept = client.sessions.get("kernel-stop")["messages"]
    assert [m["role"] for m in kept] == ["user", "tool", "assistant"] and kept[-1]["finish_reason"] == "cancelled"
    assert "stopped by the user" in kept[1]["content"] and after.strip() == "still here"


def test_the_sdk_learns_on_the_server_and_a_server_kernel_answers_from_it(server, client):
    from offgrid_jupyter.errors import PathRefusedError

    from .test_rag import PROJECTS, corpus

    corpus(server["home"].parent)  # the server's root directory
    report = client.collections.learn(["notes"], "live-notes")
    assert report.added == len(PROJECTS) and report.failed == []
    hits = client.collections.search("refracting telescope aperture", "live-notes", k=2)
    assert hits[0].path == "notes/vesper.md" and hits[0].unit == "line"
    assert [c["name"] for c in client.collections.collections()] == ["live-notes"]
    with pytest.raises(PathRefusedError, match="'..'"):
        client.collections.learn(["../outside"], "live-notes")
    outputs = ServerKernel.run_cells(server["url"], [
        "%load_ext offgrid_jupyter",
        "%%offgrid -s rag-live -t 0 --seed 1 -n 30 --rag live-notes\nWhat aperture has the Vesper telescope?"])
    assert outputs[1][-1]["content"]["status"] == "ok", outputs[1]
    final = [m for m in outputs[1] if m["msg_type"] in ("display_data", "update_display_data")][-1]["content"]
    assert "**Sources**" in final["data"]["text/markdown"]
    assert final["metadata"]["offgrid"]["sources"][0]["path"] == "notes/vesper.md"  # retrieved by the server
    client.collections.delete("live-notes")


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 (Retry-After: 0) to the first request of each path, then 200."""

    seen: dict = {}

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        calls = self.seen.setdefault(self.path, [])
        calls.append(dict(self.headers))
        if self.path.endswith("/boom"):
            status, body = 500, {"error": {"message": "broken", "type": "StoreError", "code": "store_error"}}
        elif len(calls) == 1:
            status, body = 503, {"error": {"message": "busy", "type": "EngineBusyError", "code": "queue_full"}}
        else:
            status, body = 200, {"status": "ok", "text": "fine"}
        data = json.dumps(body).encode()
        self.send_response(status)
        if status == 503:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky():
    _Flaky.seen = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/offgrid/v1/", _Flaky.seen
    httpd.shutdown()


def test_retries_503_then_succeeds_with_one_idempotency_key(flaky):
    url, seen = flaky
    with Client(url, api_key="k") as c:
        assert c.health() == {"status": "ok", "text": "fine"}
        assert len(seen["/offgrid/v1/health"]) == 2
        c.sessions.chat("s", "hello")
        chat_calls = seen["/offgrid/v1/sessions/s/chat"]
        assert len(chat_calls) == 2 and chat_calls[0]["Idempotency-Key"] == chat_calls[1]["Idempotency-Key"]
        assert chat_calls[0]["Authorization"] == "Bearer k"
        from offgrid_jupyter.errors import StoreError

        with pytest.raises(StoreError, match="broken"):
            c.request("GET", "boom")
        assert len(seen["/offgrid/v1/boom"]) == 1  # a 500 is not retried


def test_connection_failures_are_retried_then_reported(flaky):
    port = free_port()  # nothing listens there
    with Client(f"http://127.0.0.1:{port}/offgrid/v1/", max_retries=1) as c:
        with pytest.raises(ServerError, match="Could not reach the offgrid server"):
            c.health()


def test_a_kernel_connected_to_a_server_elsewhere_keeps_its_sessions_there(server, client, tmp_path):
    """`%offgrid connect URL` from a kernel that shares no database with the server (another
    machine, as far as it can tell): cells, the session subcommands, the notebook's session
    after a restart and the statistics all go through the routes; nothing lands locally."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from offgrid_jupyter.kernel.context import Context
    from offgrid_jupyter.kernel.magics import OffgridMagics

    local = Store(tmp_path / "kernel" / "offgrid.sqlite3")
    notebook = f"work/far-{uuid.uuid4().hex[:6]}.ipynb"
    ip = InteractiveShell.instance()

    def kernel():
        ctx = Context(ip, store=local)
        magics = OffgridMagics(shell=ip, context=ctx)
        ip.register_magics(magics)
        ip.user_ns["__session__"] = notebook
        return ctx

    def run(code):
        with capture_output() as cap:
            result = ip.run_cell(code)
        assert result.error_in_exec is None, (code, result.error_in_exec, cap.stdout)
        return result.result

    ctx = kernel()
    try:
        run(f"%offgrid connect {server['url']}offgrid/v1/ --token {TOKEN}")
        assert ctx.remote_sessions
        run("%%offgrid -n 8 -t 0 --seed 1\nMy name is Ada. Say hi.")
        run("%%offgrid -n 8 -t 0 --seed 1\nWhat is my name?")
        session = client.sessions.for_notebook(notebook)
        assert session is not None and session["message_count"] == 4  # on the server, found by the notebook
        frame = run("%offgrid sessions")
        assert frame.loc[frame["id"] == session["id"], "current"].item()
        assert "What is my name?" in run("%offgrid history")._repr_markdown_()
        name = session["name"]
        run(f"%offgrid rename {name} {name}-x")
        run(f"%offgrid fork {name}-x {name}-copy")
        run(f"%offgrid end {name}-copy")
        assert client.sessions.get(f"{name}-copy")["ended"] and client.sessions.get(f"{name}-copy")["message_count"] == 4
        run(f"%offgrid export {name}-copy {tmp_path / 'out'}")
        run(f"%offgrid delete {name}-copy")
        with pytest.raises(SessionNotFoundError):
            client.sessions.get(f"{name}-copy")
        run(f"%offgrid import {tmp_path / 'out'}")
        assert client.sessions.get(f"{name}-copy")["message_count"] == 4
        stats = run("%offgrid stats --by source")
        assert stats.loc["server", "requests"] >= 2  # recorded by the server that ran them
        with capture_output():
            refused = ip.run_cell("%%offgrid --local -n 4\nHi.")
        assert "--local" in str(refused.error_in_exec) and "--no-history" in str(refused.error_in_exec)
        ctx.close()
        ctx = kernel()  # a restarted kernel of the same notebook
        run(f"%offgrid connect {server['url']}offgrid/v1/ --token {TOKEN}")
        assert ctx.current_session(create=False).id == session["id"]
        assert local.count() == 0  # nothing was stored on this side
    finally:
        ctx.close()
        ip.user_ns.pop("__session__", None)
