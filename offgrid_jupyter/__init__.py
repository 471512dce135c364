"""offgrid-jupyter: an offline LLM that lives inside Jupyter."""

from importlib.metadata import PackageNotFoundError, version

from .client import Client
from .inference.backend import Backend, Generation, GenerationParams, GenerationResult, get_engine
from .inference.engine import Engine
from .errors import OffgridError
from .inference.models import resolve_model
from .stats import stats, stats_frame
from .chat.store import Store, get_store
from .inference.tools import Tool, tool

try:
    __version__ = version("offgrid-jupyter")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "Backend", "ChatPanel", "Client", "Engine", "Generation", "GenerationParams", "GenerationResult", "OffgridError",
    "OpenAIEngine", "Store", "Tool",
    "get_engine", "get_store", "load_ipython_extension", "resolve_model", "stats", "stats_frame",
    "tool", "unload_ipython_extension",
    "__version__",
]

_magics = None


def __getattr__(name: str):
    if name == "OpenAIEngine":
        from .inference.openai_engine import OpenAIEngine

        return OpenAIEngine
    if name == "ChatPanel":  # imported on first use: widgets are not needed to load the extension
        from .kernel.widget import ChatPanel

        return ChatPanel
    raise AttributeError(f"module 'offgrid_jupyter' has no attribute {name!r}")


def _jupyter_server_extension_points():
    """jupyter-server discovers the extension here (enabled by jupyter-config/)."""
    from .server import OffgridApp

    return [{"module": "offgrid_jupyter.server", "app": OffgridApp}]


def load_ipython_extension(ipython) -> None:
    """``%load_ext offgrid_jupyter`` (or ``c.InteractiveShellApp.extensions``).

    Registers the magics only; the engine and the model load on first use."""
    global _magics
    from .kernel.magics import OffgridMagics

    unload_ipython_extension(ipython)
    _magics = OffgridMagics(shell=ipython)
    ipython.register_magics(_magics)
    ipython.events.register("pre_run_cell", _magics.pre_run_cell)


def unload_ipython_extension(ipython) -> None:
    global _magics
    if _magics is not None:
        _magics.context.close()
        try:
            ipython.events.unregister("pre_run_cell", _magics.pre_run_cell)
        except ValueError:
            pass
        _magics = None
