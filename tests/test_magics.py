"""The magics through a real IPython InteractiveShell on the real default model."""


import numpy as np
import pandas as pd
import pytest

from offgrid_jupyter.kernel.magics import extract_code, interpolate, parse_json

from .conftest import Shell, one_line_error

GREEDY = "-t 0 --seed 42"


def final(cap):
    """The last display of a cell (the final state of its updating display)."""
    return cap.outputs[-1]


def test_a_cell_streams_then_leaves_provenance(sh):
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 80\nWrite a short story about a lighthouse keeper.")
    assert result.success, cap.stdout
    assert len(cap.outputs) >= 3  # the first display, at least one streamed update, the final state
    assert all(o.update for o in cap.outputs[1:])
    streamed = [o.data["text/markdown"] for o in cap.outputs[1:-1]]
    assert any(s.endswith("▌") for s in streamed)  # partial text with a cursor while streaming
    out = final(cap)
    meta = out.metadata["offgrid"]
    assert set(meta) >= {"model", "model_sha256", "session_id", "message_id", "params", "usage", "timings",
                         "queue_stats"}
    assert len(meta["model_sha256"]) == 64 and meta["params"]["max_tokens"] == 80
    session = sh.store.get(meta["session_id"])
    assert [m.role for m in session.messages] == ["user", "assistant"]
    assert session.messages[1].id == meta["message_id"]
    assert session.messages[1].content == out.data["text/plain"].split("\n\n[")[0]
    assert meta["usage"]["completion_tokens"] == session.messages[1].usage["completion_tokens"] > 0


def test_memory_across_cells_reuses_the_conversation(sh):
    r1, c1 = sh.run(f"%%offgrid {GREEDY} -n 30\nMy favourite colour is teal. Reply with one word.")
    r2, c2 = sh.run(f"%%offgrid {GREEDY} -n 30\nWhat is my favourite colour?")
    assert r1.success and r2.success
    m1, m2 = final(c1).metadata["offgrid"], final(c2).metadata["offgrid"]
    assert m1["session_id"] == m2["session_id"]
    assert m2["usage"]["prompt_tokens"] > m1["usage"]["total_tokens"]  # the first turn is in the prompt
    assert m2["usage"]["cached_tokens"] > 0  # and its KV state was reused
    assert len(sh.store.get(m1["session_id"]).messages) == 4


def test_output_variable_text_and_no_stream(sh):
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 20 -f text --no-stream -o answer\nName a fruit.")
    assert result.success
    assert len(cap.outputs) == 1 and not cap.outputs[0].update  # no streaming: one display
    assert "text/markdown" not in cap.outputs[0].data
    answer = sh.ip.user_ns["answer"]
    assert isinstance(answer, str) and answer.strip()
    assert cap.outputs[0].data["text/plain"].startswith(answer)


def test_code_format_puts_the_code_in_the_next_cell(sh):
    sh.ip.rl_next_input = None  # a terminal shell keeps the next input here (a kernel sends a payload)
    result, _ = sh.run(f"%%offgrid {GREEDY} -n 120 -f code\nWrite a Python function that adds two numbers.")
    assert result.success
    code = sh.ip.rl_next_input
    assert code.strip() and "```" not in code
    reply = sh.store.messages(sh.magics.context.current_session().id)[-1].content
    assert "```" in reply and code == extract_code(reply)  # the fenced code, without the prose


def test_json_format_returns_the_object_or_one_clear_line(sh):
    result, _ = sh.run(f'%%offgrid {GREEDY} -n 40 -f json --no-history\n'
                       'Reply with exactly this JSON and nothing else: {{"city": "Paris", "rank": 1}}')
    assert result.success
    assert isinstance(result.result, dict) and result.result  # Out[n] holds the parsed object
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 3 -f json --no-history -o prose\nSay hello in French.")
    one_line_error(result, cap, "token limit", "raise -n", "prose")  # constrained to JSON, but cut short
    assert sh.ip.user_ns["prose"].strip()


def test_interpolation_from_the_user_namespace(sh):
    sh.ip.user_ns.update(frame=pd.DataFrame({"a": [1, 2, 3]}), who="Ada")
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 10\nThe table has shape {{frame.shape}}, says {{who}} "
                         "and {unknown}; literal {{braces}}.")
    assert result.success
    sent = sh.store.messages(final(cap).metadata["offgrid"]["session_id"])[0].content
    assert sent == "The table has shape (3, 1), says Ada and {unknown}; literal {braces}."
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 10 --no-interpolate\nKeep {{who}} as is.")
    assert sh.store.messages(final(cap).metadata["offgrid"]["session_id"])[-2].content == "Keep {who} as is."


def test_interpolate_unit():
    ns = {"In": ["", "x = 1", "y = 2"], "Out": {2: 42}, "x": 3.14159, "d": {"k": "v"}}
    assert interpolate("{In[1]} / {Out[2]} / {x:.2f} / {d[k]} / {x!r}", ns) == "x = 1 / 42 / 3.14 / v / 3.14159"
    assert interpolate('{"json": 1} {nope} {In[9]} { x } {{x}} {', ns) == '{"json": 1} {nope} {In[9]} { x } {x} {'


def test_extract_code_and_parse_json_unit():
    assert extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nand\n```\nf()\n```") == \
        "def f():\n    return 1\n\nf()"
    assert extract_code("x = 1") == "x = 1"
    assert parse_json('Here:\n```json\n{"a": [1, 2]}\n```') == {"a": [1, 2]}
    assert parse_json('The answer is {"a": 1}.') == {"a": 1}
    with pytest.raises(ValueError, match="line 1"):
        parse_json("no json here")


def test_rerunning_a_cell_replaces_its_turn(sh, make_shell):
    q = f"%%offgrid {GREEDY} -n 10\n"
    sh.run(q + "First question.", cell_id="cell-1")
    sh.run(q + "Second question.", cell_id="cell-2")
    sh.run(q + "First question, edited.", cell_id="cell-1")
    sid = sh.magics.context.current_session().id
    assert [m.content for m in sh.store.messages(sid) if m.role == "user"] == \
        ["Second question.", "First question, edited."]
    assert len(sh.store.messages(sid)) == 4
    sh.close()
    appending = make_shell(rerun="append")
    appending.run(q + "Third.", cell_id="cell-3")
    appending.run(q + "Third again.", cell_id="cell-3")
    sid = appending.magics.context.current_session().id
    assert [m.content for m in sh.store.messages(sid) if m.role == "user"] == ["Third.", "Third again."]


def test_sessions_options_and_system_prompt(sh):
    before = sh.store.count()
    result, _ = sh.run(f"%%offgrid {GREEDY} -n 5 --no-history\nHi.")
    assert result.success and sh.store.count() == before  # one-shot: nothing stored
    result, cap = sh.run(f'%%offgrid {GREEDY} -n 5 --new -s research --system "You are terse."\nHi.')
    assert result.success
    research = sh.store.get("research")
    assert research.system_prompt == "You are terse." and len(research.messages) == 2
    assert sh.magics.context.current_session().id == research.id  # --new keeps using it
    sh.store.create("side")
    result, _ = sh.run(f"%%offgrid {GREEDY} -n 5 -s side\nHello side.")
    assert len(sh.store.get("side").messages) == 2
    assert sh.magics.context.current_session().id == research.id  # -s is for that cell only
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 4 -s fresh-name\nHi.")  # created on first use
    assert result.success and "created session `fresh-name`" in final(cap).data["text/markdown"]
    assert len(sh.store.get("fresh-name").messages) == 2
    assert sh.magics.context.current_session().id == research.id  # still for that cell only
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 4 -s fresh-name\nAgain.")
    assert result.success and "created" not in final(cap).data["text/markdown"]
    assert len(sh.store.get("fresh-name").messages) == 4
    result, cap = sh.run(f"%%offgrid {GREEDY} --new -s research\nHi.")  # --new still means a fresh one
    one_line_error(result, cap, "already exists", "`-s research` continues it")
    result, cap = sh.run(f"%%offgrid {GREEDY} -s session-0123456789ab\nHi.")  # an id is never created
    one_line_error(result, cap, "session-0123456789ab", "%offgrid sessions")
    result, cap = sh.run(f"%%offgrid {GREEDY} -s 'bad name'\nHi.")
    one_line_error(result, cap, "Invalid session name")


def test_config_sets_defaults(make_shell):
    sh = make_shell(max_tokens=3, temperature=0.0, format="text")
    result, cap = sh.run("%%offgrid\nWrite a long essay about rivers.")
    assert result.success
    meta = final(cap).metadata["offgrid"]
    assert meta["params"]["max_tokens"] == 3 and meta["params"]["temperature"] == 0.0
    assert meta["usage"]["completion_tokens"] <= 3 and meta["finish_reason"] == "length"
    assert "text/markdown" not in final(cap).data


@pytest.mark.parametrize("cell, needle", [
    ("%%offgrid --bogus\nHi.", "unrecognized arguments: --bogus"),
    ("%%offgrid -t warm\nHi.", "invalid float value: 'warm'"),
    ("%%offgrid -o 1x\nHi.", "not a valid Python variable name"),
    ("%%offgrid -f yaml\nHi.", "invalid choice: 'yaml'"),
    ("%%offgrid --system 'unclosed\nHi.", "check the quotes"),
    ("%%offgrid --no-history -s x\nHi.", "--no-history"),
    ("%%offgrid\n   \n", "The cell is empty"),
    ("%offgrid frobnicate", "Unknown subcommand 'frobnicate'"),
    ("%offgrid rename onlyone", "required: new"),
])
def test_bad_options_are_one_usage_line(sh, cell, needle):
    before = sh.store.count()
    result, cap = sh.run(cell)
    line = one_line_error(result, cap, needle)
    assert line.startswith("UsageError:")
    assert sh.store.count() == before


@pytest.mark.parametrize("cell, needle", [
    ("%%offgrid -t 9\nHi.", "temperature must be a number from 0 to 5"),
    ("%%offgrid --model /nonexistent/model.gguf\nHi.", "Model file not found: /nonexistent/model.gguf"),
])
def test_runtime_errors_are_one_line_and_store_nothing(sh, cell, needle):
    session = sh.magics.context.current_session()
    result, cap = sh.run(cell)
    one_line_error(result, cap, needle)
    assert sh.store.messages(session.id) == []


def test_every_subcommand(sh, tmp_path):
    run = sh.run
    result, _ = run("%offgrid help")
    assert "%%offgrid" in result.result._repr_markdown_() and "export" in result.result._repr_markdown_()
    result, _ = run("%offgrid")  # no subcommand: the status
    rows = dict(result.result.rows)
    assert rows["model"] == "SmolLM2-135M-Instruct.Q4_1" and "in this kernel" in rows["runs"]
    result, _ = run("%offgrid new alpha --system 'Be brief.'")
    assert sh.store.get("alpha").system_prompt == "Be brief."
    run(f"%%offgrid {GREEDY} -n 8\nSay one word.")
    assert len(sh.store.get("alpha").messages) == 2
    result, _ = run("%offgrid sessions")
    frame = result.result
    assert isinstance(frame, pd.DataFrame) and frame.loc[frame["name"] == "alpha", "current"].item()
    result, _ = run("%offgrid history")
    md = result.result._repr_markdown_()
    assert "Session `alpha`" in md and "**You**" in md and "Say one word." in md and "Be brief." in md
    result, _ = run("%offgrid history alpha --last 1")
    md = result.result._repr_markdown_()
    assert "last 1 shown" in md and "**You**" not in md
    run("%offgrid fork alpha beta")
    assert len(sh.store.get("beta").messages) == 2
    run("%offgrid rename beta gamma")
    assert sh.store.exists("gamma") and not sh.store.exists("beta")
    run("%offgrid use gamma")
    assert sh.magics.context.current_session().name == "gamma"
    run("%offgrid end gamma")
    assert sh.store.get("gamma").ended
    run(f"%offgrid export alpha {tmp_path / 'one'}")
    run(f"%offgrid export --all {tmp_path / 'all'}")
    assert len(list((tmp_path / "one").glob("*.json"))) == 1
    assert len(list((tmp_path / "all").glob("*.json"))) == sh.store.count()
    run("%offgrid delete alpha")
    assert not sh.store.exists("alpha")
    result, _ = run(f"%offgrid import {tmp_path / 'one'}")
    assert sh.store.exists("alpha") and len(sh.store.get("alpha").messages) == 2
    run("%offgrid delete gamma")  # the current session: the next cell starts a fresh one
    assert sh.magics.context.current_session(create=False) is None
    result, _ = run("%offgrid model")
    assert dict(result.result.rows)["name"] == "SmolLM2-135M-Instruct.Q4_1"
    result, cap = run("%offgrid model /nonexistent.gguf")
    one_line_error(result, cap, "Model file not found")
    result, _ = run("%offgrid stats")
    summary = result.result
    assert summary.index.names == ["model", "session"] and summary.loc[(slice(None), "alpha"), "requests"].sum() == 1
    result, _ = run("%offgrid stats --by source -o reqs")
    reqs = sh.ip.user_ns["reqs"]
    assert list(result.result.index) == ["magic"] and result.result.loc["magic", "requests"] == len(reqs) == 1
    result, cap = run("%offgrid stats --since yesterday-ish")
    one_line_error(result, cap, "--since")
    result, _ = run("%offgrid stats --model no-such-model")
    assert "No requests recorded yet for that selection" in repr(result.result)
    result, _ = run("%offgrid chat alpha")
    assert type(result.result).__name__ == "ChatPanel" and result.result.session_id == sh.store.get("alpha").id
    result, cap = run("%offgrid connect http://127.0.0.1:9/offgrid/v1/")  # nothing listens on port 9
    one_line_error(result, cap, "Could not reach the offgrid server")
    assert sh.magics.context.client is None
    result, cap = run("%offgrid use nosuch")
    one_line_error(result, cap, "nosuch")
    result, cap = run("%offgrid export alpha")
    one_line_error(result, cap, "export NAME PATH")


def test_a_queue_timeout_shows_the_wait_then_one_line_and_stores_nothing(make_engine, store):
    from .test_engine import occupy

    busy_engine = make_engine(queue_timeout=0.5)
    shell = Shell(busy_engine, store)
    try:
        blocker, events = occupy(busy_engine)
        session = shell.magics.context.current_session()
        result, cap = shell.run("%%offgrid -n 5\nHi.")
        events.close()
        blocker.wait()
        one_line_error(result, cap, "Waited 0 s in the generation queue")
        assert any("queued: position 1" in o.data.get("text/markdown", "") for o in cap.outputs)
        assert store.messages(session.id) == []
    finally:
        shell.close()


def test_a_pandas_index_or_array_is_interpolated_as_its_values():
    frame = pd.DataFrame({"month": [1], "region": ["n"], "revenue": [2.0]})
    ns = {"df": frame, "arr": np.arange(3), "many": np.arange(60)}
    assert interpolate("{df.columns.values}", ns) == "['month', 'region', 'revenue']"
    assert interpolate("{df.columns} {arr} {df.shape}", ns) == "['month', 'region', 'revenue'] [0, 1, 2] (1, 3)"
    assert interpolate("{many}", ns).endswith(", 49, … 10 more]")
    assert interpolate("{arr!r}", ns) == "array([0, 1, 2])"  # asked for the repr: the repr


def test_a_structured_reply_cut_by_the_token_limit_is_not_kept_and_o_var_holds_its_text(sh):
    sh.ip.user_ns["Tool"] = {"type": "object", "properties": {"name": {"type": "string"},
                                                               "description": {"type": "string"}},
                             "required": ["name", "description"]}
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 16 --schema Tool -s structured -o partial\nDescribe pandas.")
    one_line_error(result, cap, "token limit", "Nothing was stored", "The text is in partial")
    assert sh.ip.user_ns["partial"].lstrip().startswith("{")
    assert sh.store.get("structured").messages == []  # not in the session, nor in later prompts


def test_status_names_the_tiny_default_and_help_lists_local(sh):
    result, cap = sh.run("%offgrid status")
    rows = dict(result.result.rows)
    assert "Choosing a model" in rows["note"] and "SmolLM2-135M" in rows["note"]
    result, _ = sh.run("%offgrid help")
    assert "[--local]" in result.result.text
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 4\nMy data:\n`df` has <ArrowStringArray> columns\n- and a list")
    history, _ = sh.run("%offgrid history")
    shown = history.result._repr_markdown_()
    assert "&lt;ArrowStringArray&gt;" in shown and "> My data:  \n> \\`df\\` has" in shown and "> \\- and a list" in shown
