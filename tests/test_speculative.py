"""Prompt-lookup decoding (speculative.py): the drafts' lookup and price as logic, and on the real
default model that drafting never changes a reply: greedy, sampled with a seed, under a grammar,
beside another request. Correctness only; bench/speculative.py has the speed."""

import threading

import pytest

from offgrid_jupyter.inference.speculative import Drafter, best_length

from .conftest import user

CODE = "\n".join(["import pandas as pd", "", "frame = pd.read_csv('sales.csv')"]
                 + [f"frame['total_{c}'] = frame['{c}'] * frame['price']" for c in "abcdefghij"]
                 + ["print(frame.describe())"])
PROMPTS = [
    user(f"Copy this code exactly, but read 'sales_2024.csv' instead:\n```python\n{CODE}\n```"),
    user("Write a short story about a cat and a lighthouse."),
    user("List the numbers from 1 to 40, one per line."),
]


# -- logic ---------------------------------------------------------------------------------------------
def test_a_draft_is_what_followed_the_last_earlier_occurrence_of_the_suffix():
    d = Drafter([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8])
    d.append(1)
    d.append(2)
    assert d.propose(4, row_cost=0.0) == [3, 7, 8, 1]  # the most recent "1 2" was followed by 3 7 8 1
    d.append(6)
    assert d.propose(4, row_cost=0.0) == []  # "2 6" and "1 2 6" never occurred before


def test_a_draft_never_finds_the_suffix_itself_and_stops_at_room():
    d = Drafter([5, 6, 7])
    assert d.propose(8, row_cost=0.0) == []  # "6 7" occurs only as the suffix
    d = Drafter([5, 6, 7, 8, 5, 6])
    assert d.propose(1, row_cost=0.0) == [7]


def test_sources_are_looked_up_when_the_context_has_no_match():
    d = Drafter([1, 2, 3], sources=[[40, 2, 3, 41, 42]])
    assert d.propose(2, row_cost=0.0) == [41, 42]


def test_drafts_are_priced_by_what_a_row_costs_and_what_is_kept():
    assert best_length(0.8, 0.05, 16) >= 6  # cheap rows: long drafts
    assert best_length(0.8, 0.9, 16) == 0  # rows as dear as a step: a guess kept 80% does not pay
    assert best_length(0.99, 0.5, 16) >= 8  # copying: long drafts pay even so
    assert best_length(0.0, 0.0, 16) == 0
    d = Drafter([1, 2, 3, 4, 1, 2])
    assert d.propose(8, row_cost=0.3)  # a prior of 0.8 at 0.3: a draft
    for _ in range(8):
        d.feedback(3, 0)  # misses
    assert d.propose(8, row_cost=0.3) == []  # turned down: a token kept 4 times in 13 does not pay
    assert (d.drafted, d.accepted) == (24, 0)


# -- on the real model -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines():
    from offgrid_jupyter.inference.engine import Engine

    plain = Engine(n_ctx=2048, n_parallel=2, tune_threads=False, prompt_lookup=False)
    drafting = Engine(n_ctx=2048, n_parallel=2, tune_threads=False, prompt_lookup=True)
    drafting.complete(user("Hi"), max_tokens=1)  # loaded: its batcher exists
    drafting._batcher.fixed_row_cost = 0.02  # draft wherever there is a match, so every path is taken
    yield plain, drafting
    plain.close()
    drafting.close()


def _run(engine, messages, **params):
    before = dict(engine.stats()["drafts"])
    r = engine.complete(messages, max_tokens=160, **params)
    after = engine.stats()["drafts"]
    return r, after["drafted"] - before["drafted"], after["accepted"] - before["accepted"]


@pytest.mark.parametrize("params", [{"temperature": 0.0}, {"temperature": 0.8, "seed": 11, "top_k": 40}],
                         ids=["greedy", "sampled"])
def test_drafting_gives_token_for_token_the_reply_of_plain_decoding(engines, params):
    plain, drafting = engines
    total_drafted = total_kept = 0
    for messages in PROMPTS:
        a, _, _ = _run(plain, messages, **params)
        b, drafted, kept = _run(drafting, messages, **params)
        assert b.text == a.text
        assert b.usage["completion_tokens"] == a.usage["completion_tokens"]
        assert b.finish_reason == a.finish_reason
        total_drafted += drafted
        total_kept += kept
    assert total_drafted > total_kept > 0  # drafts were made, some kept and some refused


def test_drafting_under_a_json_schema_gives_the_same_reply(engines):
    plain, drafting = engines
    schema = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}
    fmt = {"type": "json_object", "schema": schema}
    a, _, _ = _run(plain, PROMPTS[0], temperature=0.0, response_format=fmt)
    b, drafted, _ = _run(drafting, PROMPTS[0], temperature=0.0, response_format=fmt)
    assert drafted > 0 and b.text == a.text


def test_a_reply_beside_another_request_is_the_reply_it_gives_alone(engines):
    """Attention takes the same kernel for a row whatever else is in the batch (llamacpp.py: keys in
    q8_0), so neither a neighbour's rows nor drafts change a greedy reply."""
    _, drafting = engines
    alone = drafting.complete(PROMPTS[2], max_tokens=120, temperature=0.0).text
    other = drafting.generate(PROMPTS[1], max_tokens=200, temperature=0.0)
    results = {}
    t = threading.Thread(target=lambda: results.update(r=drafting.complete(PROMPTS[2], max_tokens=120,
                                                                           temperature=0.0)))
    t.start()
    t.join(120)
    other.wait()
    assert results["r"].text == alone
