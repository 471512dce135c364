"""llama-cpp-python's private parts we rely on are all there (and we would say so if not)."""

import llama_cpp
import pytest

from offgrid_jupyter.inference import llamacpp
from offgrid_jupyter.errors import IncompatibleLlamaError
from offgrid_jupyter.inference.llamacpp import LlamaModel, check_compat
from offgrid_jupyter.inference.models import resolve_model


@pytest.fixture(scope="module")
def model():
    m = LlamaModel(str(resolve_model(None).path), n_ctx=512, n_batch=128, n_threads=2, chat_format=None, n_parallel=3)
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


def test_prompt_capture_batched_decode_and_a_sequence_moved_to_another_slot(model):
    kwargs = model.format([{"role": "user", "content": "Say yes."}], max_tokens=4, temperature=0.0, seed=1)
    prompt = kwargs["prompt"]
    assert isinstance(prompt, list) and len(prompt) > 3 and kwargs["stop"] is not None
    model.clear()
    row0 = model.add(prompt, 0, 0, True)  # two sequences in one batch, one llama_decode
    row1 = model.add(prompt, 0, 1, True)
    assert (row0, row1) == (len(prompt) - 1, 2 * len(prompt) - 1) and model.decode() == 0
    first = [model.sampler(kwargs).sample(model.ctx, row) for row in (row0, row1)]
    assert first[0] == first[1]  # the same prompt, the same greedy token, from either row
    saved = model.seq_save(0)
    assert len(saved) > 0
    model.seq_rm(0)
    assert model.seq_load(2, saved)  # sequence 0's cells, now in slot 2: decoding goes on from there
    model.clear()
    model.add([first[0]], len(prompt), 2, True)
    assert model.decode() == 0
    assert model.piece(first[0]) and not model.is_eog(first[0])
    model.set_threads(1, 2)
    assert model.threads == (1, 2)
    for seq in range(3):
        model.seq_rm(seq)
