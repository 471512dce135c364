import pytest

pytest_plugins = ["pytest_jupyter.jupyter_server"]  # jp_fetch and a real in-process Jupyter server

from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from offgrid_jupyter.kernel.context import Context
from offgrid_jupyter.inference.engine import Engine
from offgrid_jupyter.kernel.magics import OffgridMagics
from offgrid_jupyter.chat.store import Store

# Deterministic generation for tests: greedy decoding with a fixed seed.
GREEDY = {"temperature": 0.0, "seed": 42}


@pytest.fixture(scope="session")
def engine():
    """One real engine on the embedded default model, shared by the tests that
    only need ordinary behaviour (tests that reconfigure the queue make their own).
    One slot, so a long generation makes the next request queue, which many tests need;
    tests/test_batching.py and every server the tests start use the default n_parallel."""
    eng = Engine(n_ctx=4096, n_parallel=1, tune_threads=False)  # the same tokens whatever else runs
    yield eng
    eng.close()


@pytest.fixture
def make_engine():
    made = []

    def make(**kwargs):
        eng = Engine(**{"n_ctx": 2048, "n_parallel": 1, "tune_threads": False, **kwargs})
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


# -- the magics in a real IPython shell ---------------------------------------------------------------
class Shell:
    """A real InteractiveShell with the magics on the test engine and a fresh store."""

    def __init__(self, engine, store, **config):
        self.ip = InteractiveShell.instance()
        for key, value in config.items():
            setattr(self.ip.config.OffgridMagics, key, value)
        self.magics = OffgridMagics(shell=self.ip, context=Context(self.ip, engine=engine, store=store))
        self.ip.register_magics(self.magics)
        self.ip.events.register("pre_run_cell", self.magics.pre_run_cell)
        self.magics.cells.install()  # what cells printed and raised (--context, {Err[n]})
        self.store = store

    def run(self, code, cell_id=None):
        with capture_output() as cap:
            result = self.ip.run_cell(code, store_history=True, cell_id=cell_id)
        return result, cap

    def close(self):
        self.magics.context.close()
        self.magics.cells.uninstall()
        if self.magics.pre_run_cell in self.ip.events.callbacks["pre_run_cell"]:
            self.ip.events.unregister("pre_run_cell", self.magics.pre_run_cell)
        self.ip.config.OffgridMagics = type(self.ip.config)()


@pytest.fixture
def make_shell(engine, store):
    made = []

    def make(**config):
        shell = Shell(engine, store, **config)
        made.append(shell)
        return shell

    yield make
    for shell in made:
        shell.close()


@pytest.fixture
def sh(make_shell):
    return make_shell()


def one_line_error(result, cap, *needles):
    assert not result.success
    text = cap.stdout + cap.stderr
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
