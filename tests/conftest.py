import pytest

pytest_plugins = ["pytest_jupyter.jupyter_server"]  # jp_fetch and a real in-process Jupyter server

from offgrid_jupyter.engine import Engine
from offgrid_jupyter.store import Store

# Deterministic generation for tests: greedy decoding with a fixed seed.
GREEDY = {"temperature": 0.0, "seed": 42}


@pytest.fixture(scope="session")
def engine():
    """One real engine on the embedded default model, shared by the tests that
    only need ordinary behaviour (tests that reconfigure the queue make their own)."""
    eng = Engine(n_ctx=4096)
    yield eng
    eng.close()


@pytest.fixture
def make_engine():
    made = []

    def make(**kwargs):
        eng = Engine(**{"n_ctx": 2048, **kwargs})
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.close()


@pytest.fixture
def store(tmp_path):
    st = Store(tmp_path / "offgrid.sqlite3")
    yield st
    st.close()


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="session")
def llama_server():
    """One OpenAI-compatible engine (llama-cpp-python's server on the default GGUF) for the
    tests of the remote backend that do not stop it."""
    from .kernels import llama_engine

    with llama_engine() as srv:
        yield srv
