"""llama-cpp-python's private parts we rely on are all there (and we would say so if not)."""

import llama_cpp
import numpy as np
import pytest

from offgrid_jupyter import llamacpp
from offgrid_jupyter.llamacpp import IncompatibleLlamaError, LlamaModel, check_compat
from offgrid_jupyter.models import resolve_model


@pytest.fixture(scope="module")
def model():
    m = LlamaModel(str(resolve_model(None).path), n_ctx=512, n_batch=128, n_threads=2, chat_format=None)
    yield m
    m.close()


def test_every_private_piece_is_there(model):
    check_compat(model.llm)  # raises IncompatibleLlamaError naming what moved


def test_a_missing_piece_fails_loudly_by_name(monkeypatch):
    monkeypatch.delattr(llama_cpp, "llama_state_seq_get_data")
    with pytest.raises(IncompatibleLlamaError, match=r"llama_cpp\.llama_state_seq_get_data.*llamacpp\.py"):
        check_compat()


def test_loading_does_not_swap_the_process_streams(model):
    import llama_cpp.llama

    assert llama_cpp.llama.suppress_stdout_stderr is llamacpp._NoRedirect


def test_prompt_capture_snapshot_restore_and_the_token_hook(model):
    kwargs = model.format([{"role": "user", "content": "Say yes."}], max_tokens=4, temperature=0.0, seed=1)
    prompt = kwargs["prompt"]
    assert isinstance(prompt, list) and len(prompt) > 3 and kwargs["stop"] is not None
    seen = []
    text = "".join(c["choices"][0]["text"] for c in model.stream(
        {**kwargs, "max_tokens": 4}, lambda tok: seen.append(tok) or True))
    assert seen and text
    assert "generate" not in model.llm.__dict__  # the hook is gone afterwards
    tokens, data = model.snapshot()
    assert np.array_equal(tokens, model.tokens) and len(data) > 0
    model.reset()
    assert len(model.tokens) == 0
    assert model.restore(tokens, data) and np.array_equal(model.tokens, tokens)
    stopped = list(model.stream({**kwargs, "max_tokens": 20}, lambda tok: False))  # the hook can stop it
    assert "".join(c["choices"][0]["text"] for c in stopped) == ""
    model.set_threads(1, 2)
    assert model.threads == (1, 2)
