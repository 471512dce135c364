"""The one place that chooses and builds a backend, from configuration or the environment.

Where a process's model runs is decided here and nowhere else: an OpenAI-compatible inference
server when an engine URL is given (``llama_cpp`` is then never imported), else a GGUF loaded in
this process (:class:`~offgrid_jupyter.inference.engine.Engine`). The kernel (``get_engine()``,
``%offgrid engine``), the server extension (its traitlets) and Python code (``get_engine()``)
all build through :func:`make_backend`; ``OFFGRID_*`` variables are read by
:func:`settings_from_env` only.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from .chat.store import Store, get_store
from .client import Client
from .errors import InvalidRequestError
from .inference.backend import QueueBackend
from .inference.completion import DEFAULT_TOKENS, CompletionRequest, answer
from .inference.engine import COMPLETION_CTX, MB, Engine
from .inference.openai_engine import OpenAIEngine
from .stats import attach, stats_document

# keyword -> (environment variable, how to read it); the queue's two are both kinds'
LOCAL = {"model_path": (None, str),  # (OFFGRID_MODEL is read where the model is resolved: inference/models.py)
         "n_ctx": ("OFFGRID_N_CTX", int),
         "n_threads": ("OFFGRID_THREADS", int), "n_parallel": ("OFFGRID_N_PARALLEL", int),
         "chat_format": ("OFFGRID_CHAT_FORMAT", str),
         "kv_cache_bytes": ("OFFGRID_KV_CACHE_MB", lambda v: int(float(v) * MB)),
         "tune_threads": ("OFFGRID_TUNE_THREADS", lambda v: _flag(v)),
         "completion_ctx": ("OFFGRID_COMPLETION_CTX", int),
         "prompt_lookup": ("OFFGRID_PROMPT_LOOKUP", lambda v: _flag(v)),
         "kv_dir": (None, str),  # the store's: <data dir>/kv
         "kv_disk_bytes": ("OFFGRID_KV_DISK_MB", lambda v: int(float(v) * MB))}
REMOTE = {"model": ("OFFGRID_ENGINE_MODEL", str), "api_key": ("OFFGRID_ENGINE_API_KEY", str),
          "max_concurrent": ("OFFGRID_ENGINE_MAX_CONCURRENT", int),
          "read_timeout": ("OFFGRID_ENGINE_READ_TIMEOUT", float),
          "completion_model": ("OFFGRID_COMPLETION_MODEL", str)}
QUEUE = {"queue_timeout": ("OFFGRID_QUEUE_TIMEOUT", float), "max_queue": ("OFFGRID_MAX_QUEUE", int)}
URL_ENV = "OFFGRID_ENGINE_URL"


def _flag(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("use 1 or 0")


def settings_from_env(remote: bool) -> dict[str, Any]:
    """The keyword arguments ``OFFGRID_*`` variables set, for an engine (*remote*) or a local model;
    a value that does not read is a 400 naming the variable."""
    out: dict[str, Any] = {}
    for key, (env, cast) in {**(REMOTE if remote else LOCAL), **QUEUE}.items():
        value = os.environ.get(env) if env else None
        if not value:
            continue
        try:
            out[key] = cast(value)
        except ValueError as exc:
            raise InvalidRequestError(f"{env}={value!r} is not valid: {exc}.") from None
    return out


def make_backend(engine_url: str | None = None, *, from_env: bool = False, **settings: Any) -> QueueBackend:
    """A backend: the OpenAI-compatible engine at *engine_url*, else a GGUF in this process.

    *settings* may hold both kinds' keywords (the server passes all its settings); each kind
    takes its own: ``model``, ``api_key``, ``max_concurrent``, ``read_timeout``, ``send_session``
    and ``completion_model`` for an engine; ``model_path``, ``n_ctx``, ``n_threads``, ``n_parallel``,
    ``chat_format``, ``kv_cache_bytes``, ``tune_threads``, ``completion_ctx``, ``prompt_lookup``, ``kv_dir``,
    ``kv_disk_bytes`` for a local model; ``queue_timeout`` and ``max_queue``
    for both. None means the default. *from_env* fills what is not given (the URL included) from
    ``OFFGRID_*`` variables."""
    if from_env:
        engine_url = engine_url or os.environ.get(URL_ENV) or None
        settings = {**settings_from_env(remote=bool(engine_url)),
                    **{k: v for k, v in settings.items() if v is not None}}
    given = {k: v for k, v in settings.items() if v is not None}
    if engine_url:
        return OpenAIEngine(engine_url, **{k: v for k, v in given.items() if k in REMOTE or k in QUEUE
                                           or k == "send_session"})
    return Engine(given.pop("model_path", None), **{k: v for k, v in given.items() if k in LOCAL or k in QUEUE})


def make_completer(backend: QueueBackend, completion_model: str | None, *, completion_ctx: int | None = None,
                   n_threads: int | None = None) -> QueueBackend:
    """Where inline completions run: *backend* itself (its reserved sequence, or the engine's
    ``/completions``), or, for a local server given a completion GGUF, a small engine of its
    own for that model (one unused chat sequence of 64 cells beside the completions' own)."""
    if not completion_model or isinstance(backend, OpenAIEngine):
        return backend
    return Engine(completion_model, n_ctx=64, n_parallel=1, n_threads=n_threads,
                  completion_ctx=completion_ctx or COMPLETION_CTX, tune_threads=False)


_engine: QueueBackend | None = None
_engine_lock = threading.Lock()


def get_engine(**kwargs: Any) -> QueueBackend:
    """The process-wide backend, created on first call (a local model loads on first use).

    Keyword arguments (and OFFGRID_* environment variables) apply only when it is
    created; ``switch_model`` changes the model later. Its requests are recorded in
    the process-wide store (the usage statistics).
    """
    global _engine
    with _engine_lock:
        if _engine is None:
            url = kwargs.pop("url", None)
            store = get_store()
            _engine = make_backend(url, from_env=True, **{"kv_dir": str(store.kv_dir), **kwargs})
            attach(_engine, store)  # every request of the process's engine is recorded
            if isinstance(_engine, Engine):
                store.on_delete.append(_engine.forget)
        return _engine


def stats(engine: QueueBackend | None = None, store: Store | None = None) -> dict[str, Any]:
    """``offgrid_jupyter.stats()``: the stats document of this process's engine."""
    return stats_document(engine or get_engine(), store or get_store())


def complete_inline(prefix: str, suffix: str = "", *, context: list[str] | None = None, path: str | None = None,
                    language: str = "python", max_tokens: int | None = None,
                    engine: QueueBackend | None = None) -> dict[str, Any]:
    """``offgrid_jupyter.complete_inline``: what JupyterLab's ghost text would suggest after
    *prefix* (and before *suffix*), with *context* the cells above. In a kernel of a Jupyter
    server with the extension it asks the server's shared model (``OFFGRID_URL``), else this
    process's engine. Answers as the route does: ``{"items": [{"insertText"}], "model",
    "finish_reason", "latency_ms", "usage"}``."""
    if engine is None and os.environ.get("OFFGRID_URL"):
        with Client() as client:
            return client.complete_inline(prefix, suffix, language=language, path=path, context=context,
                                          max_tokens=max_tokens)
    request = CompletionRequest(prefix, suffix, language, path, context, max_tokens or DEFAULT_TOKENS)
    started = time.monotonic()
    return answer(request, (engine or get_engine()).complete_inline(request).wait(), started)
