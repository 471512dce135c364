"""The notebook as context: describe(), @name, --context, {Err[n]}, attachments stored and in the prompt.

Unit tests of the logic (describe, mentions, fitting) run in-process; the magics run in a real
IPython shell on the real default model; printed output and the example notebook run in real
kernels (nbclient)."""

import json
import re
import os
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

import offgrid_jupyter
from offgrid_jupyter.chat import attachments
from offgrid_jupyter.chat.store import Store
from offgrid_jupyter.errors import InvalidRequestError
from offgrid_jupyter.kernel.describe import describe, kernel_attach, kernel_variables, mentions, resolve

ROOT = Path(__file__).resolve().parent.parent
GREEDY = "-t 0 --seed 42"


# -- describe(): what the model is shown of a value -------------------------------------------------
def test_a_dataframe_is_described_by_shape_columns_first_rows_and_summary():
    df = pd.DataFrame({"month": ["Jan", "Feb", "Mar"], "sales": [1.5, 2.25, None]})
    text = offgrid_jupyter.describe(df, name="df")
    assert text.startswith("`df`: pandas DataFrame, 3 rows × 2 columns")
    assert "- month: str" in text or "- month: object" in text
    assert "- sales: float64, 1 null" in text
    assert "| 0 | Jan | 1.5 |" in text  # the first rows as a Markdown table
    assert "| sales | 1.875 |" in text  # the numeric summary's mean


@pytest.mark.parametrize("value, needles", [
    (pd.Series([1, 2, None], name="x"), ["pandas Series 'x', 3 values", "1 null"]),
    (pd.Index(["a", "b"]), ["pandas Index, 2 items", "['a', 'b']"]),
    (np.arange(12).reshape(3, 4), ["numpy array, shape (3, 4), dtype int64", "min 0, max 11"]),
    ({"a": 1, "b": [1, 2]}, ["dict with 2 keys", "- 'a': 1"]),
    (list(range(1000)), ["list of 1,000 items (int)", "first items: [0, 1, 2"]),
    (describe, ["function describe(obj", "A compact Markdown description"]),
    (json, ["module json", "public names"]),
    ("x" * 5000, ["str, 5,000 characters", "… (5,002 characters)"]),
    (3.5, ["float = 3.5"]),
])
def test_every_kind_of_value_has_a_compact_description(value, needles):
    text = describe(value, "v")
    for needle in needles:
        assert needle in text, text
    assert attachments.estimate_tokens(text) <= 400


def test_a_ten_million_row_frame_is_sampled_not_scanned_and_stays_in_budget():
    big = pd.DataFrame({"a": np.zeros(10_000_000), "b": np.ones(10_000_000, dtype=np.int32)})
    big.loc[:4_999_999, "a"] = np.nan
    text = describe(big, "big", max_tokens=300)
    assert "10,000,000 rows × 2 columns" in text
    assert "evenly spaced sample of 10,000 rows" in text  # and says so
    assert "- a: float64, 5,000 nulls" in text  # counted in the sample
    assert attachments.estimate_tokens(text) <= 300


def test_a_wide_frame_keeps_every_section_within_the_budget():
    wide = pd.DataFrame(np.random.default_rng(0).random((50, 60)), columns=[f"feature_{i}" for i in range(60)])
    text = describe(wide, "wide")
    assert "Columns by dtype:" in text and "First" in text and "Numeric summary" in text
    assert attachments.estimate_tokens(text) <= 400


def test_a_repr_that_raises_hangs_or_is_enormous_gives_a_one_line_stand_in():
    class Raises:
        def __repr__(self):
            raise ValueError("no repr")

    class Hangs:
        def __repr__(self):
            while True:
                pass

    class Enormous:
        def __repr__(self):
            return "y" * 5_000_000

    assert describe(Raises(), "r") == "<`r`: Raises: describing it raised ValueError>"
    assert describe(Hangs(), "h") == "<`h`: Hangs: describing it took over 1 s>"
    text = describe(Enormous(), "e")
    assert attachments.estimate_tokens(text) <= 400 and "5,000,000 characters" in text


def test_a_credential_looking_name_has_its_value_masked():
    for name in ("api_key", "GITHUB_TOKEN", "db_password", "client.secret"):
        text = describe("sk-live-123456", name)
        assert "sk-live" not in text and "value hidden" in text


def test_mentions_are_variables_only_not_addresses_decorators_or_code():
    class Model:
        coef_ = np.array([1.0, 2.0])

        @property
        def expensive(self):
            raise AssertionError("a property must not run")

    ns = {"df": pd.DataFrame({"sales": [1]}), "model": Model(), "dataclass": object(), "json": json}
    text = ("Compare @df with @model.coef_ and @model.expensive, mail me at ada@example.org, @nothere.\n"
            "```python\n@df\n```\n@dataclass\nclass Point: pass\nand @json.dumps and @df.sales.")
    assert mentions(text, ns) == ["df", "model.coef_", "model", "json.dumps", "df.sales"]
    assert resolve("model.expensive", ns) == (False, None)  # never ran the property
    assert resolve("df.sales", ns)[1].tolist() == [1]  # a DataFrame's column


def test_the_sidebar_helpers_answer_json_the_kernel_can_send(sh):
    sh.ip.user_ns.update(frame=pd.DataFrame({"a": [1]}), secret_token="abc", _hidden=1)
    listed = json.loads(repr(kernel_variables()))
    names = {v["name"]: v["type"] for v in listed}
    assert names["frame"] == "DataFrame" and "_hidden" not in names
    attached = json.loads(repr(kernel_attach(["frame", "nothere", "secret_token"], "and @frame again, x@frame")))
    assert [a["name"] for a in attached] == ["frame", "secret_token"]
    assert "value hidden" in attached[1]["text"] and attached[0]["tokens"] > 0


# -- attachments: checks and fitting ------------------------------------------------------------------
@pytest.mark.parametrize("items, needle", [
    ("df", "context must be a list"),
    ([{"kind": "file", "name": "a", "text": "x"}], "context[0].kind must be one of variable, cell, selection"),
    ([{"kind": "variable", "name": "", "text": "x"}], "context[0].name"),
    ([{"kind": "variable", "name": "a\nb", "text": "x"}], "context[0].name"),
    ([{"kind": "variable", "name": "a", "text": "  "}], "context[0].text is empty"),
    ([{"kind": "variable", "name": "a", "text": "\ud800"}], "lone surrogate"),
    ([{"kind": "variable", "name": "a", "text": "x"}] * 33, "at most 32"),
])
def test_bad_attachments_are_refused_naming_the_field(items, needle):
    with pytest.raises(InvalidRequestError, match=None) as info:
        attachments.check(items)
    assert needle in str(info.value)


def test_attachments_are_fitted_keeping_variables_then_the_newest_cells():
    items = attachments.check([
        {"kind": "cell", "name": "In[1]", "text": "old " * 300},
        {"kind": "variable", "name": "df", "text": "frame " * 100},
        {"kind": "cell", "name": "In[2]", "text": "new " * 100},
    ])
    fitted, note = attachments.fit(items, 250)
    assert [i["name"] for i in fitted] == ["df", "In[2]"]  # in their own order
    assert sum(i["tokens"] for i in fitted) <= 250
    assert note == "attachments fitted to 250 tokens (left out: cell In[1])"
    fitted, note = attachments.fit(items, 320)
    assert [i["name"] for i in fitted] == ["In[1]", "df", "In[2]"] and "cut: cell In[1]" in note


# -- the magic in a real IPython shell --------------------------------------------------------------
def test_at_name_attaches_a_description_stored_with_the_message_and_in_every_later_prompt(sh):
    sh.ip.user_ns["df"] = pd.DataFrame({"month": ["Jan", "Feb"], "units": [3, None]})
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 12\nWhich column of @df has gaps? Mail a@b.org.")
    assert result.success, cap.stdout
    status = cap.outputs[-1].data["text/plain"]
    assert "attached @df" in status and re.search(r"context \d+ / 4,096 tokens", status)
    session = sh.store.get(cap.outputs[-1].metadata["offgrid"]["session_id"])
    user = session.messages[0]
    assert user.content == "Which column of @df has gaps? Mail a@b.org."  # what was typed
    [item] = user.metadata["context"]
    assert (item["kind"], item["name"], item["type"]) == ("variable", "df", "DataFrame")
    assert item["text"] == describe(sh.ip.user_ns["df"], "df") and item["tokens"] > 0
    prompt = session.chat_messages()[0]["content"]
    assert prompt.startswith("Attached context:\n\n### @df (DataFrame)\n`df`: pandas DataFrame")
    assert prompt.endswith(user.content)
    sh.ip.user_ns["df"] = "changed"  # the record is what was shown then, not the variable now
    r2, c2 = sh.run(f"%%offgrid {GREEDY} -n 5\nThanks.")
    assert r2.success
    again = sh.store.get(session.id).chat_messages()
    assert again[0]["content"] == prompt  # the same prompt prefix: the KV cache stays reusable
    assert c2.outputs[-1].metadata["offgrid"]["usage"]["cached_tokens"] > 0


def test_a_raising_variable_or_a_credential_never_fails_the_cell(sh):
    class Broken:
        def __repr__(self):
            raise RuntimeError("boom")

    sh.ip.user_ns.update(thing=Broken(), openai_api_key="sk-secret-value")
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 5\nLook at @thing and @openai_api_key.")
    assert result.success, cap.stdout
    session = sh.store.get(cap.outputs[-1].metadata["offgrid"]["session_id"])
    texts = [i["text"] for i in session.messages[0].metadata["context"]]
    assert texts[0] == "<`thing`: Broken: describing it raised RuntimeError>"
    assert "sk-secret" not in json.dumps(session.messages[0].metadata) and "value hidden" in texts[1]


def test_context_attaches_earlier_cells_and_err_interpolates_a_traceback(sh):
    assert sh.run("x = 21 * 2\nx")[0].success
    failed, _ = sh.run("{}['missing']")
    assert not failed.success
    n = failed.execution_count
    traceback = sh.ip.user_ns["Err"][n]
    assert "KeyError" in traceback and "\x1b[" not in traceback  # plain text, no colour codes
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 5 --context 2\nWhy did In[{n}] fail? {{Err[{n}]}} {{Err[999]}}")
    assert result.success, cap.stdout
    user = sh.store.get(cap.outputs[-1].metadata["offgrid"]["session_id"]).messages[-2]
    assert "KeyError: 'missing'" in user.content and "{Err[999]}" in user.content  # a missing entry as written
    cells = user.metadata["context"]
    assert [(c["kind"], c["name"], c["type"]) for c in cells] == [("cell", f"In[{n - 1}]", "code"),
                                                                  ("cell", f"In[{n}]", "error")]
    assert "x = 21 * 2" in cells[0]["text"] and "42" in cells[0]["text"]  # source and result
    assert "KeyError" in cells[1]["text"]


def test_context_all_fits_the_budget_and_skips_prompt_cells(sh):
    for i in range(6):
        assert sh.run(f"v{i} = {i}\n" + "# padding line\n" * 40)[0].success
    assert sh.run(f"%%offgrid {GREEDY} -n 3\nHello.")[0].success
    sh.magics.attach_tokens = 120
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 3 --context all\nSummarise.")
    assert result.success, cap.stdout
    user = sh.store.get(cap.outputs[-1].metadata["offgrid"]["session_id"]).messages[-2]
    names = [c["name"] for c in user.metadata["context"]]
    assert names and all("%%offgrid" not in c["text"] for c in user.metadata["context"])
    assert all(c["tokens"] <= 120 for c in user.metadata["context"])


def test_a_profile_and_the_config_set_the_default_context(make_shell):
    sh = make_shell(context_cells=1)
    assert sh.run("y = 'from the cell before'")[0].success
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 3\nWhat is y?")
    assert result.success
    user = sh.store.get(cap.outputs[-1].metadata["offgrid"]["session_id"]).messages[0]
    assert [c["name"] for c in user.metadata["context"]] == [f"In[{result.execution_count - 1}]"]
    assert sh.run("%offgrid profile add nocells --context 0")[0].success
    result, cap = sh.run(f"%%offgrid {GREEDY} -n 3 --new -s bare --profile nocells\nWhat is y?")
    assert result.success, cap.stdout
    assert "context" not in sh.store.get("bare").messages[0].metadata


def test_history_shows_attachments_as_collapsed_chips(sh):
    sh.ip.user_ns["nums"] = [1, 2, 3]
    assert sh.run(f"%%offgrid {GREEDY} -n 3\nSum @nums.")[0].success
    result, _ = sh.run("%offgrid history")
    html = result.result._repr_markdown_()
    assert '<details class="offgrid-chip"><summary>@nums · list · ' in html and "list of 3 items" in html


# -- a real kernel: printed output, and the example notebook -----------------------------------------
def test_printed_output_is_part_of_an_attached_cell_in_a_real_kernel(tmp_path):
    from .test_kernel import execute, kernel_env

    home = tmp_path / "home"
    km, kc = start_new_kernel(kernel_name="python3", env=kernel_env(home), startup_timeout=60)
    try:
        assert execute(kc, "%load_ext offgrid_jupyter")[0]["content"]["status"] == "ok"
        execute(kc, "for i in range(3):\n    print('line', i)")
        reply, _ = execute(kc, f"%%offgrid {GREEDY} -n 3 --context 1\nWhat was printed?")
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    [session] = Store(home / "offgrid.sqlite3").list()
    user = Store(home / "offgrid.sqlite3").get(session.id).messages[0]
    [cell] = user.metadata["context"]
    assert "Output:\nline 0\nline 1\nline 2" in cell["text"]


def test_the_analysis_notebook_runs_headless_and_keeps_what_was_attached(tmp_path):
    from .test_kernel import kernel_env

    home = tmp_path / "home"
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute(env=kernel_env(home))  # raises CellExecutionError if a cell fails unexpectedly
    store = Store(home / "offgrid.sqlite3")
    [summary] = store.list()
    users = [m for m in store.get(summary.id).messages if m.role == "user"]
    kinds = [[(c["kind"], c["name"]) for c in m.metadata.get("context", [])] for m in users]
    assert kinds[0] == [("variable", "sales")]
    assert kinds[1] == [("cell", "In[5]")]
    assert "KeyError" in users[2].content  # {Err[7]}
    history = nb.cells[-1].outputs[0]["data"]["text/markdown"]
    assert "@sales · DataFrame" in history
