"""Tools (tools.py) on the real default model: functions as tools, calls constrained by a grammar,
the rounds of a turn, what is stored, Stop between and within rounds, and the magic."""

import json

import pytest
from pydantic import BaseModel

from offgrid_jupyter.errors import InvalidRequestError, InvalidToolsError, UnknownToolError
from offgrid_jupyter.chat.rounds import Rounds
from offgrid_jupyter.chat.tools import REGISTRY, Tool, load, resolve
from offgrid_jupyter.inference.toolcalls import check_tools
from offgrid_jupyter.chat.turns import ChatTurn

from .conftest import one_line_error
from .tool_functions import add, broken, distance

ADD = "What is 2 + 3? Use the add tool."
GREEDY = {"temperature": 0, "seed": 1}


def kinds(events):
    return [k for k, _ in events if k not in ("token", "queued", "loading")]


# -- a function as a tool ------------------------------------------------------------------------------
def test_a_typed_function_is_a_tool_with_its_schema_and_checked_arguments():
    assert REGISTRY["add"] is add and add(2, 3) == 5  # @tool registers it and it stays callable
    assert add.description == "Add two integers."
    assert add.parameters["properties"] == {"a": {"type": "integer"}, "b": {"type": "integer"}}
    assert add.parameters["required"] == ["a", "b"] and add.parameters["additionalProperties"] is False
    assert add.run({"a": 2, "b": 3})["result"] == "5" and add.run({"a": 2, "b": 3})["error"] is None
    for bad in ({"a": "two", "b": 3}, {"a": 1}, {"a": 1, "b": 2, "c": 3}):
        out = add.run(bad)
        assert out["error"].startswith("invalid arguments for add") and out["result"].startswith("Error:")
    d = Tool(distance)  # a pydantic model as a parameter: its schema inline, no $ref left for the grammar
    assert d.parameters["properties"]["p"]["properties"] == {"x": {"type": "number"}, "y": {"type": "number"}}
    assert "$ref" not in json.dumps(d.parameters) and "$defs" not in d.parameters
    assert d.run({"p": {"x": 3, "y": 4}})["result"] == "5.0"
    assert Tool(broken).run({"text": "x"})["result"] == "Error: ValueError: the dictionary is closed today"

    class Node(BaseModel):
        children: list["Node"]

    def tree(root: Node) -> int:
        return 0

    with pytest.raises(InvalidToolsError, match="contains itself"):
        Tool(tree)
    with pytest.raises(InvalidRequestError, match="reserved"):
        Tool(lambda _private: 0, name="odd")
    with pytest.raises(UnknownToolError, match="Known tools: .*add"):
        resolve(["nope"], {})
    assert resolve(["distance"], {"distance": distance})[0].name == "distance"  # a plain function, by name
    assert set(load(["tests.tool_functions:add", "tests.tool_functions:broken"])) == {"add", "broken"}
    with pytest.raises(InvalidRequestError, match="cannot be imported"):
        load(["tests.tool_functions:missing"])


@pytest.mark.parametrize("tools, choice, error, needle", [
    ([{"type": "function", "function": {"name": "a b"}}], None, InvalidRequestError, "identifier"),
    ([add.spec(), add.spec()], None, InvalidToolsError, "offered twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}], None, InvalidToolsError,
     "not a valid JSON schema"),
    ([add.spec()], "subtract", InvalidToolsError, "not among the tools"),
    ([add.spec()], {"type": "function", "function": {"name": "\ud800"}}, InvalidToolsError, "not among"),
    (None, "required", InvalidToolsError, "needs tools"),
    ([], None, InvalidRequestError, "non-empty"),
    ([add.spec()] * 65, None, InvalidRequestError, "At most 64"),
])
def test_hostile_tools_are_refused_naming_the_problem(tools, choice, error, needle):
    with pytest.raises(error, match=needle):
        check_tools(tools, choice)


# -- calls the engine makes --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_a_required_call_always_parses_and_validates(engine, seed):
    """Sampled at temperature 0.8, the grammar still makes every call well-formed."""
    for fn, question in ((add, "Add 12 and 30."), (Tool(distance), "How far is (3, 4) from the origin?")):
        gen = engine.generate([{"role": "user", "content": question}], tools=[add.spec(), Tool(distance).spec()],
                              tool_choice=fn.name, temperature=0.8, seed=seed, max_tokens=80)
        events = list(gen.events())
        result = events[-1][1]
        assert result.text == "" and "token" not in kinds(events)  # a call is not shown as text
        [call] = result.tool_calls
        assert call["name"] == fn.name and call["id"].startswith("call_")
        assert fn.run(call["arguments"])["error"] is None, call


def test_auto_lets_a_plain_question_stream_as_text(engine):
    gen = engine.generate([{"role": "user", "content": "Hello! How are you today?"}], tools=[add.spec()],
                          tool_choice="auto", max_tokens=30, **GREEDY)
    events = list(gen.events())
    result = events[-1][1]
    assert result.tool_calls == [] and result.text.strip()
    assert "".join(p for k, p in events if k == "token") == result.text
    assert result.params["tools"] == ["add"]  # the record names the tools, not their schemas


# -- a turn's rounds -------------------------------------------------------------------------------------
def test_a_turn_calls_a_tool_answers_and_is_stored_in_seed_002s_shape(engine, store, tmp_path):
    session = store.create("calc")
    heard = []
    turn = ChatTurn(engine, store, "calc", ADD, source="api", params=GREEDY, tools=[add], tool_choice="required")
    turn.start()
    turn.generation.listen(lambda kind, payload: heard.append((kind, payload)))
    events = list(turn.generation.events())
    outcome = turn.finish()
    order = kinds(events)
    assert order[:4] == ["round_start", "start", "tool_start", "tool_end"] and order[-1] == "complete"
    assert order.count("round_start") == outcome.result.rounds >= 2
    # a listener sees the same events (round 1 may have started before it listened)
    assert [k for k in kinds(heard) if k != "start"] == [k for k in order if k != "start"]
    r = outcome.result
    assert r.tool_calls[0]["name"] == "add" and r.tool_results[0] == {
        "tool_name": "add", "result": str(sum(r.tool_calls[0]["arguments"].values()))}
    messages = store.get(session.id).messages
    assert [m.role for m in messages][:2] == ["user", "tool"] and messages[-1].role == "assistant"
    reply = messages[-1]
    assert reply.tool_calls == r.tool_calls and reply.tool_results == r.tool_results and reply.content.strip()
    assert reply.metadata["rounds"] == r.rounds and outcome.provenance()["tool_calls"][0]["result"]
    tool_message = messages[1]
    assert tool_message.metadata["tool_call"]["name"] == "add" and tool_message.content == r.tool_results[0]["result"]
    # the next turn's prompt sees the call and its result in OpenAI's shapes
    history = store.get(session.id).chat_messages()
    assert history[1]["tool_calls"][0]["function"]["name"] == "add"
    assert history[2] == {"role": "tool", "tool_call_id": history[1]["tool_calls"][0]["id"],
                          "content": tool_message.content}
    # export/import keeps the tool messages and the calls
    store.export(tmp_path / "out", [session.id])
    store.delete(session.id)
    [back] = store.import_(tmp_path / "out")
    again = store.get(back.id).messages
    assert [(m.role, m.content, m.tool_calls, m.tool_results, m.metadata.get("tool_call")) for m in again] == [
        (m.role, m.content, m.tool_calls, m.tool_results, m.metadata.get("tool_call")) for m in messages]


def test_a_tool_that_raises_tells_the_model_and_the_turn_goes_on(engine, store):
    store.create("words")
    turn = ChatTurn(engine, store, "words", "What does 'serendipity' mean? Look it up.", source="api",
                    params={**GREEDY, "max_tokens": 60}, tools=[Tool(broken)], tool_choice="required", max_rounds=2)
    events = list(turn.start().generation.events())
    ends = [p for k, p in events if k == "tool_end"]
    assert ends and ends[0]["error"] == "ValueError: the dictionary is closed today" and "result" not in ends[0]
    outcome = turn.finish()
    assert outcome.reply is not None and outcome.result.rounds == 2
    stored = store.get("words").messages
    assert stored[1].role == "tool" and stored[1].content.startswith("Error: ValueError")
    assert stored[1].metadata["error"].startswith("ValueError")


def test_max_rounds_ends_the_turn_with_a_note(engine, store):
    store.create("one-round")
    outcome = ChatTurn(engine, store, "one-round", ADD, source="api", params=GREEDY, tools=[add],
                       tool_choice="required", max_rounds=1).start().finish()
    r = outcome.result
    assert r.rounds == 1 and len(r.tool_calls) == 1 and "max-rounds" in r.note
    assert outcome.reply.content == r.note and outcome.reply.tool_calls == r.tool_calls
    with pytest.raises(InvalidRequestError, match="max_rounds"):
        Rounds(engine, [{"role": "user", "content": "x"}], [add], max_rounds=0)


def test_stop_between_rounds_runs_no_further_round(engine, store):
    store.create("stopped")
    holder = {}

    def slow_add(a: int, b: int) -> int:
        """Add two integers."""
        holder["turn"].cancel()  # the user presses Stop while the tool runs
        return a + b

    turn = holder["turn"] = ChatTurn(engine, store, "stopped", ADD, source="api", params=GREEDY,
                                     tools=[Tool(slow_add, name="add")], tool_choice="required")
    events = list(turn.start().generation.events())
    outcome = turn.finish()
    r = outcome.result
    assert kinds(events).count("round_start") == 1 and r.rounds == 1 and r.finish_reason == "cancelled"
    assert r.note == "Stopped after 1 tool call." and outcome.reply.content == r.note
    assert [m.role for m in store.get("stopped").messages] == ["user", "tool", "assistant"]  # what ran is kept


def test_stop_within_a_round_ends_it_within_a_token(engine, store):
    store.create("mid-round")
    turn = ChatTurn(engine, store, "mid-round", ADD + " Then explain addition at length.", source="api",
                    params={**GREEDY, "max_tokens": 400}, tools=[add], tool_choice="required", max_rounds=3)
    turn.start()
    seen = []

    def on_event(kind, payload):
        seen.append(kind)
        if kind == "token" and seen.count("round_start") >= 2:
            turn.cancel()

    turn.generation.listen(on_event)
    outcome = turn.finish()  # not streamed: wait() drives the rounds and runs the tool on this thread
    r = outcome.result
    assert seen.count("tool_end") >= 1 and r.finish_reason == "cancelled"
    assert r.usage["completion_tokens"] < 100  # round 2 stopped soon after its first token


# -- the magic -----------------------------------------------------------------------------------------
def test_the_magic_offers_notebook_functions_and_shows_each_call(make_shell):
    sh = make_shell()
    sh.run("calls = []\n"
           "def add(a: int, b: int) -> int:\n"
           "    'Add two integers.'\n"
           "    calls.append((a, b))\n"
           "    return a + b\n")
    result, cap = sh.run(f"%%offgrid -s sums -t 0 --seed 1 --tools add --tool-choice required -o answer\n{ADD}")
    assert result.success, cap.stdout + cap.stderr
    assert sh.ip.user_ns["calls"]  # the function ran in this kernel
    final = cap.outputs[-1]
    shown = final.data["text/markdown"]
    assert "called <code>add(a=" in shown and "tool call" in shown
    meta = final.metadata["offgrid"]
    assert meta["tool_calls"][0]["name"] == "add" and meta["rounds"] >= 1
    assert sh.ip.user_ns["answer"] == sh.store.get("sums").messages[-1].content
    one_line_error(*sh.run("%%offgrid -s sums --tools nope\nHi"), "No tool 'nope'")
    one_line_error(*sh.run("%%offgrid --no-history --tool-choice required\nHi"), "--tools")
    # a profile's tools: the cell offers the notebook's function of that name
    result, cap = sh.run("%offgrid profile add calc --tools add --max-rounds 2")
    assert result.success
    before = len(sh.ip.user_ns["calls"])
    result, cap = sh.run(f"%%offgrid --new -s with-profile --profile calc -t 0 --seed 1 --tool-choice required\n{ADD}")
    assert result.success and len(sh.ip.user_ns["calls"]) > before
    assert [m.role for m in sh.store.get("with-profile").messages][:2] == ["user", "tool"]
    history, _ = sh.run("%offgrid history with-profile")
    assert "called" in history.result._repr_markdown_()

