"""offgrid-jupyter: an offline LLM that lives inside Jupyter.

The package is a house with floors, each a folder importing only the floors below it:
``errors``/``validation`` (the ground), ``inference/`` (backends, the generation handle,
llama.cpp), ``retrieval/`` (learned files), ``chat/`` (the store, turns, tools, profiles),
``stats``/``client``/``runtime`` (services: usage statistics, the SDK, choosing a backend),
``kernel/`` (magics, the chat panel) and ``server/`` (the Jupyter server extension). The names
below are the public API.
"""

from .chat.store import Store, get_store
from .chat.tools import Tool, tool
from .client import Client
from .errors import OffgridError
from .inference.backend import Backend
from .inference.engine import Engine
from .inference.generation import Generation, GenerationParams, GenerationResult
from .inference.models import resolve_model
from .inference.openai_engine import OpenAIEngine
from .kernel.describe import describe
from .runtime import complete_inline, get_engine, stats
from .stats import stats_frame
from .version import __version__

__all__ = [
    "Backend", "ChatPanel", "Client", "Engine", "Generation", "GenerationParams", "GenerationResult", "OffgridError",
    "OpenAIEngine", "Store", "Tool",
    "complete_inline", "describe", "get_engine", "get_store", "load_ipython_extension", "resolve_model", "stats", "stats_frame",
    "tool", "unload_ipython_extension",
    "__version__",
]


def __getattr__(name: str):
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
    from .kernel import magics

    magics.load(ipython)


def unload_ipython_extension(ipython) -> None:
    from .kernel import magics

    magics.unload(ipython)
