"""The jupyter-server extension: one engine and one store for every notebook on a server.

Enabled on install by ``jupyter-config/jupyter_server_config.d/offgrid_jupyter.json``.
Kernels started by this server inherit ``OFFGRID_URL``, ``OFFGRID_API_KEY`` (a key
made for this server start) and ``OFFGRID_HOME``, so their ``%%offgrid`` cells use
the server's model and the same session database instead of loading their own.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from jupyter_server.extension.application import ExtensionApp
from jupyter_server.utils import url_path_join
from traitlets import Bool, Dict, Float, Int, List, Unicode, default

from ..inference import kvdisk
from ..retrieval import embeddings
from ..retrieval.chunking import Limits
from ..inference.backend import QueueBackend
from ..chat.tools import load as load_tools
from ..inference.engine import MB, Engine
from ..inference.engine import COMPLETION_CTX
from ..runtime import make_backend, make_completer
from ..stats import attach
from ..chat.store import DB_FILENAME, ROOT_ENV, Store, data_dir
from .handlers import handlers
from .snapshot import pre_save_hook
from .state import ServerState


def _freeze_heap(local_model: bool) -> None:
    """Keep the long-lived heap out of the garbage collector's full passes.

    A Jupyter server with our modules holds ~235,000 objects, and CPython's full collection walks
    every one: 107 ms here, during which the event loop answers nothing; it runs whenever enough
    new objects have survived (a few times a minute while files are learned or chats stored), and
    it was the worst /health pause left under load. The modules a request will use are imported
    now, what is garbage is collected once, and the rest is frozen (``gc.freeze``): full passes
    then walk only what was made since, a fraction of a millisecond."""
    import gc

    import jsonschema  # noqa: F401 - every request body is checked with it (pandas is not imported for this: 50 MB)

    if local_model:
        import llama_cpp  # noqa: F401 - loaded with the model on the first chat anyway

    gc.collect()
    gc.freeze()


class OffgridApp(ExtensionApp):
    """offgrid-jupyter's server extension (``c.OffgridApp.…``)."""

    name = "offgrid_jupyter"
    load_other_extensions = True

    model_path = Unicode(None, allow_none=True, help="GGUF file (default: OFFGRID_MODEL, else the embedded "
                         "SmolLM2-135M-Instruct).").tag(config=True)
    n_ctx = Int(4096, help="Context size in tokens.").tag(config=True)
    n_threads = Int(None, allow_none=True, help="CPU threads (default: every core the server may use)."
                    ).tag(config=True)
    queue_timeout = Float(1800.0, help="Seconds a request may wait in the queue (then 503).").tag(config=True)
    max_queue = Int(64, help="Requests that may wait at once (then 503).").tag(config=True)
    kv_cache_mb = Float(512.0, help="Memory for per-session KV snapshots, MB.").tag(config=True)
    kv_disk_mb = Float(2048.0, help="Disk for per-session KV snapshots under <data_dir>/kv, MB (least recently "
                       "used go first): a long session's next turn after a restart need not re-read its history. "
                       "0 keeps them in memory only.").tag(config=True)
    prompt_lookup = Bool(True, help="Draft replies from their context (prompt-lookup decoding): faster where a "
                         "reply copies its prompt, never a different reply; it turns itself down where drafts "
                         "do not pay.").tag(config=True)
    n_parallel = Int(None, allow_none=True, help="Requests the in-process model decodes together (continuous "
                     "batching, one context); the rest wait in the queue. 1 serves one at a time. Default: one per "
                     "512 tokens of n_ctx, at most 8 (8 with the default 4,096).").tag(config=True)
    tune_threads = Bool(True, help="Choose the decode thread count from measured token times (faster beside a "
                        "busy process); False always uses n_threads, so greedy replies repeat exactly.").tag(config=True)
    api_key = Unicode(None, allow_none=True, help="Also accept `Authorization: Bearer <key>` "
                      "(default: OFFGRID_API_KEY). Jupyter's own authentication always works.").tag(config=True)
    data_dir = Unicode(help="Where the session database lives (default: OFFGRID_HOME, else "
                       "<jupyter data dir>/offgrid).").tag(config=True)
    preload = Bool(False, help="Load the model at start-up instead of on the first chat.").tag(config=True)
    share_with_kernels = Bool(True, help="Kernels started by this server use its model.").tag(config=True)
    max_body_bytes = Int(2 * MB, help="Largest request body accepted (then 413).").tag(config=True)
    snapshot_panels = Bool(True, help="When a notebook is saved, write a readable snapshot of each chat panel "
                           "into the file instead of its widget (which cannot be shown without its kernel)."
                           ).tag(config=True)

    engine_url = Unicode(None, allow_none=True, help="An OpenAI-compatible inference server (llama.cpp's server, "
                         "vLLM, Ollama, LM Studio, LiteLLM) to generate on instead of loading a GGUF here, e.g. "
                         "http://127.0.0.1:8000/v1 (default: OFFGRID_ENGINE_URL).").tag(config=True)
    engine_model = Unicode(None, allow_none=True, help="The engine's model name (default: OFFGRID_ENGINE_MODEL, "
                           "else the first the engine lists).").tag(config=True)
    engine_api_key = Unicode(None, allow_none=True, help="The engine's API key (default: OFFGRID_ENGINE_API_KEY)."
                             ).tag(config=True)
    profiles = Dict(help="Named presets sessions are created with: {name: {system_prompt, temperature, "
                    "max_tokens, top_p, top_k, repeat_penalty, seed, model, tools, max_rounds}} (put in the store "
                    "at start-up, so every kernel and the sidebar see them).").tag(config=True)
    tools = List(Unicode(), help="Server tools, as 'package.module:function' (typed functions, or "
                 "@offgrid_jupyter.tool objects): a REST chat on a session whose profile offers them runs the "
                 "calls on the server. A name that does not import stops the start.").tag(config=True)
    embedding_model = Unicode(None, allow_none=True, help="A GGUF embedding model for the collections this server "
                              "learns (POST /v1/collections): their searches fuse its nearest chunks with BM25's. "
                              "A collection keeps the model it was learned with.").tag(config=True)
    learn_limits = Dict(help="What learning one file may take (POST /v1/collections): max_file_mb (20), "
                        "max_text_mb (20), max_columns (1000), max_rows (10,000,000), max_pages (2000), max_cells "
                        "(10,000), and per learn max_files (10,000), max_entries (200,000); each file is read in a "
                        "process of its own with seconds_per_file (60) and memory_mb (1024). A file past a limit is "
                        "listed in the learn's failed, with the limit.").tag(config=True)
    completion_model = Unicode(None, allow_none=True, help="Inline completions' model (default: "
                               "OFFGRID_COMPLETION_MODEL, else the chat model): a small code GGUF, ideally one with "
                               "fill-in-the-middle tokens (Qwen2.5-Coder-0.5B, StarCoder2), loaded beside the chat "
                               "model; with engine_url, the engine's model name for its /completions.").tag(config=True)
    completion_ctx = Int(COMPLETION_CTX, help="KV cells kept for inline completions beside the chats' n_ctx (the "
                         "prompt near the cursor and the suggestion); 0 turns inline completion off.").tag(config=True)
    engine_max_concurrent = Int(4, help="Requests sent to the engine at once (it batches them); the rest wait "
                                "in the queue.").tag(config=True)
    engine_read_timeout = Float(300.0, help="Seconds the engine's stream may send nothing (keep-alive comments "
                                "count as nothing) before the turn ends with an error naming the engine "
                                "(default: OFFGRID_ENGINE_READ_TIMEOUT, else 300).").tag(config=True)

    @default("tune_threads")
    def _default_tune_threads(self):
        return os.environ.get("OFFGRID_TUNE_THREADS", "1").strip().lower() not in ("0", "false", "no", "off")

    @default("engine_read_timeout")
    def _default_engine_read_timeout(self):
        raw = os.environ.get("OFFGRID_ENGINE_READ_TIMEOUT")
        return float(raw) if raw else 300.0

    @default("engine_url")
    def _default_engine_url(self):
        return os.environ.get("OFFGRID_ENGINE_URL") or None

    @default("engine_model")
    def _default_engine_model(self):
        return os.environ.get("OFFGRID_ENGINE_MODEL") or None

    @default("engine_api_key")
    def _default_engine_api_key(self):
        return os.environ.get("OFFGRID_ENGINE_API_KEY") or None

    @default("completion_model")
    def _default_completion_model(self):
        return os.environ.get("OFFGRID_COMPLETION_MODEL") or None

    @default("api_key")
    def _default_api_key(self):
        return os.environ.get("OFFGRID_API_KEY") or None

    @default("data_dir")
    def _default_data_dir(self):
        return str(data_dir())

    def initialize_settings(self) -> None:
        home = Path(self.data_dir).expanduser()
        engine = self._backend()
        root = getattr(self.serverapp, "root_dir", None) or os.getcwd()
        store = Store(home / DB_FILENAME, busy_sessions=engine.busy_session_ids, notebook_root=root)
        if isinstance(engine, Engine):
            store.on_delete.append(engine.forget)
        kernel_key = secrets.token_urlsafe(32)
        self.state = ServerState(engine=engine, store=store, request_log=attach(engine, store),
                                 api_key=self.api_key, kernel_key=kernel_key, max_body_bytes=self.max_body_bytes,
                                 log=self.log)
        self.state.completer = make_completer(engine, self.completion_model, completion_ctx=self.completion_ctx,
                                              n_threads=self.n_threads)
        if self.state.completer is not engine:
            self.state.completer.recorders.append(self.state.request_log)  # counted as "completion" requests
        self.settings["offgrid_state"] = self.state
        if self.embedding_model:  # a missing or non-GGUF file stops the start, naming it
            self.state.embedding_model = embeddings.model_path(self.embedding_model)
        self.state.learn_limits = Limits.from_config(self.learn_limits)  # a bad limit stops the start, naming it
        self.state.tools = load_tools(self.tools)  # a tool that does not import stops the start, naming it
        store.profiles.define(self.profiles)  # a bad profile stops the start with a message naming it
        if self.share_with_kernels:
            # kernels copy the server's environment when they start
            os.environ["OFFGRID_URL"] = url_path_join(self.serverapp.connection_url, "offgrid/v1/")
            os.environ["OFFGRID_API_KEY"] = kernel_key
            os.environ["OFFGRID_HOME"] = str(home)
            os.environ[ROOT_ENV] = str(Path(root).expanduser().resolve())  # notebooks are known relative to it
        contents = getattr(self.serverapp, "contents_manager", None)
        if self.snapshot_panels and hasattr(contents, "register_pre_save_hook"):
            contents.register_pre_save_hook(pre_save_hook(store))
        if self.preload:
            engine.complete([{"role": "user", "content": "Hi."}], max_tokens=1, source="preload")
        where = engine.describe()
        self.log.info("offgrid: model %s (%s), sessions in %s", where.get("path") or where.get("url"),
                      where.get("kind"), store.path)
        _freeze_heap(isinstance(engine, Engine))

    def _backend(self) -> QueueBackend:
        """Where this server's model runs: the engine at engine_url, else a GGUF loaded here."""
        return make_backend(self.engine_url, model=self.engine_model, api_key=self.engine_api_key,
                            max_concurrent=self.engine_max_concurrent, read_timeout=self.engine_read_timeout,
                            model_path=self.model_path, n_ctx=self.n_ctx, n_threads=self.n_threads,
                            kv_cache_bytes=int(self.kv_cache_mb * MB), n_parallel=self.n_parallel,
                            kv_dir=str(Path(self.data_dir).expanduser() / kvdisk.DIRNAME),
                            kv_disk_bytes=int(self.kv_disk_mb * MB), prompt_lookup=self.prompt_lookup,
                            tune_threads=self.tune_threads, queue_timeout=self.queue_timeout, max_queue=self.max_queue,
                            completion_ctx=self.completion_ctx, completion_model=self.completion_model)

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers())

    async def stop_extension(self) -> None:
        self.state.close()
