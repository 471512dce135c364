"""offgrid-jupyter: an offline LLM that lives inside Jupyter."""

from importlib.metadata import PackageNotFoundError, version

from .engine import Engine, Generation, GenerationParams, GenerationResult, get_engine
from .errors import OffgridError
from .models import resolve_model
from .store import Store, get_store

try:
    __version__ = version("offgrid-jupyter")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "Engine", "Generation", "GenerationParams", "GenerationResult", "OffgridError", "Store",
    "get_engine", "get_store", "resolve_model", "__version__",
]
