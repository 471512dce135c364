"""What one kernel talks to: the engine, the store and its current session.

The cell magic and the chat panel share one ``Context`` per kernel, so they
share the engine, the store and the notion of "this notebook's session".

Where the model runs is a :class:`Runner`: this kernel's backend (a GGUF loaded
here, or an OpenAI-compatible engine after ``%offgrid engine URL`` or with
``OFFGRID_ENGINE_URL`` set), or the Jupyter server that started the kernel. Such a
server puts ``OFFGRID_URL`` and a key in the environment its kernels inherit; a
kernel then sends its turns there (``%offgrid disconnect`` or ``--local`` opt
out, ``%offgrid connect URL`` opts in). The magic and the panel ask the runner,
never which kind it is.

A notebook's session is found again after a kernel restart through the
notebook's path, which the kernel learns from Jupyter (``JPY_SESSION_NAME``,
exposed by ipykernel as ``__session__``) or VS Code (``__vsc_ipynb_file__``).
Without a path (plain IPython, ``jupyter execute``) a kernel starts a fresh,
generated session; ``%offgrid use NAME`` picks any existing one.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
import weakref
from pathlib import PurePath
from typing import Any, Callable, Protocol

from ..client import Client
from ..inference.backend import Backend
from ..runtime import get_engine, make_backend, settings_from_env
from ..errors import DuplicateNameError, InvalidRequestError, SessionNotFoundError, UnknownProfileError
from .describe import DEFAULT_TOKENS
from .remote import RemoteStore, RemoteTurn
from ..stats import RequestLog, attach
from ..chat.store import Session, Store, get_store
from ..chat.tools import Tool
from ..chat.tools import resolve as resolve_tools
from ..chat.turns import ChatTurn


log = logging.getLogger(__name__)
_loaded: "Context | None" = None  # the context of the magics `%load_ext offgrid_jupyter` registered


def loaded() -> "Context | None":
    """The loaded extension's context (the chat panel shares its engine, store and session)."""
    return _loaded


def set_loaded(context: "Context | None") -> None:
    global _loaded
    _loaded = context


def _notebook_stem(path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", PurePath(path).stem).strip("-._")
    return stem[:56] or "notebook"


class Context:
    """One engine, one store and the current session of one kernel."""

    def __init__(self, shell: Any = None, *, engine: Backend | None = None, store: Store | None = None,
                 client: Client | None = None):
        self.shell = shell
        self._engine = engine
        self._store = store
        self._client = client
        self._own_engine = False  # made by use_engine (closed when replaced)
        self._shared = client is None  # the server's database is ours (it started this kernel)
        self._remote_store: RemoteStore | None = None
        self._local = False  # %offgrid disconnect: ignore the server from the environment
        self._watchers: list[Callable[[], Callable | None]] = []  # weak refs to turn watchers
        self._log: RequestLog | None = None
        self._server_engine: Backend | None = None  # see server_engine()
        self._current: str | None = None  # session id
        self._current_spec: dict[str, Any] = {}  # name/system prompt, to re-create a pruned empty session
        self.attach_tokens = DEFAULT_TOKENS  # one @variable's description (c.OffgridMagics.attach_tokens)

    @property
    def engine(self) -> Backend:
        """The engine, with every request it serves recorded in the store (the stats)."""
        if self._engine is None:
            self._engine = get_engine()
        if self._log is None:
            self._log = attach(self._engine, self.local_store)  # this kernel's requests, in its own store
        return self._engine

    @property
    def store(self) -> Store | RemoteStore:
        """Where this kernel's sessions are: its own database, or, when connected to a server
        that does not share that database (``%offgrid connect URL``), the server's routes."""
        if self.remote_sessions:
            if self._remote_store is None or self._remote_store.client is not self._client:
                self._remote_store = RemoteStore(self._client)
            return self._remote_store
        return self.local_store

    @property
    def local_store(self) -> Store:
        if self._store is None:
            self._store = get_store()
        return self._store

    @property
    def remote_sessions(self) -> bool:
        """True when sessions go through a server's routes (a connection that shares no database)."""
        return self._client is not None and not self._shared

    def close(self) -> None:
        """Stop recording this context's requests, and close a backend it made (tests;
        unloading the extension; another backend chosen)."""
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_engine and self._engine is not None:
            self._engine.close()
            self._engine, self._own_engine = None, False
        if self._server_engine is not None:
            self._server_engine.close()
            self._server_engine = None

    # -- where the model runs ----------------------------------------------------------
    @property
    def client(self) -> Client | None:
        """The server this kernel's turns go to, or None for this kernel's own backend."""
        if self._client is None and not self._local and os.environ.get("OFFGRID_URL"):
            self._client, self._shared = Client(), True  # the server that started us: same data directory
        return self._client

    def runner(self, *, local: bool = False) -> "Runner":
        """Where this kernel's turns run: the Jupyter server when connected (unless *local*),
        else this kernel's backend (a GGUF loaded here, or an OpenAI-compatible engine)."""
        client = None if local else self.client
        return ServerRunner(client, self) if client is not None else KernelRunner(self)

    def connect(self, url: str | None = None, token: str | None = None) -> Client:
        with Client(url, token, max_retries=0) as probe:
            probe.health()  # fail now, clearly, if it is not there or refuses the key
        client = Client(url, token)
        was = self._sessions_home()
        self._client, self._local = client, False
        self._shared = url is None or url.rstrip("/") == os.environ.get("OFFGRID_URL", "").rstrip("/")
        self._sessions_moved(was)
        return client

    def disconnect(self) -> None:
        was = self._sessions_home()
        if self._client is not None:
            self._client.close()
        self._client, self._local = None, True
        self._sessions_moved(was)

    def _sessions_home(self) -> Client | None:
        return self._client if self.remote_sessions else None

    def _sessions_moved(self, was: Client | None) -> None:
        """The sessions now live elsewhere: forget the current one (the notebook's session is
        looked up again where they are)."""
        if self._sessions_home() is not was:
            self._current, self._current_spec = None, {}

    def use_engine(self, url: str | None, *, model: str | None = None, api_key: str | None = None,
                   max_concurrent: int | None = None) -> Backend:
        """Generate on the OpenAI-compatible engine at *url* from now on (None: a GGUF in this
        kernel again). The kernel stops sending its turns to a Jupyter server."""
        if url:
            engine = make_backend(url, from_env=True, model=model, api_key=api_key, max_concurrent=max_concurrent)
            engine.model  # noqa: B018 - fail now, clearly, if it is not there or refuses the key
        else:
            engine = make_backend(None, from_env=False, **settings_from_env(remote=False))
        self.close()
        self._engine, self._own_engine = engine, True
        self.disconnect()
        return self.engine

    @property
    def where(self) -> str:
        return self.runner().where

    def start_turn(self, session_id: str | None, content: str, *, params: dict[str, Any], local: bool = False,
                   source: str = "magic", **kwargs: Any) -> ChatTurn | RemoteTurn:
        """A turn on the server's model when connected (unless *local*), else on this kernel's backend.
        *kwargs*: system_prompt, model, metadata, replace, and the turn's tools (see ChatTurn)."""
        return self.runner(local=local).start_turn(session_id, content, params=params, source=source, **kwargs)

    def server_engine(self, client: Client) -> Backend:
        """The server's OpenAI-compatible route as a backend (rounds the kernel drives; the
        server records each request, so nothing is recorded here)."""
        engine = self._server_engine
        if engine is None or engine.url.rstrip("/") != client.base_url.rstrip("/"):
            if engine is not None:
                engine.close()
            engine = self._server_engine = make_backend(client.base_url, api_key=client.api_key, max_concurrent=4,
                                                        send_session=True)
        return engine

    def find_tools(self, names: list[str]) -> list[Tool]:
        """Tools by name: the notebook's functions (or @tool objects), then every @tool of the kernel."""
        return resolve_tools(names, getattr(self.shell, "user_ns", None))

    # -- the notebook ----------------------------------------------------------------
    def notebook_path(self) -> str | None:
        """This kernel's notebook: its path relative to the Jupyter server's root when the server
        said where that is (``OFFGRID_ROOT``), the form the sidebar and every kernel use."""
        ns = getattr(self.shell, "user_ns", None) or {}
        for value in (ns.get("__vsc_ipynb_file__"), ns.get("__session__"), os.environ.get("JPY_SESSION_NAME")):
            if isinstance(value, str) and value.endswith(".ipynb"):
                return self.local_store.notebook_key(value) if not self.remote_sessions else value
        return None

    # -- the current session --------------------------------------------------------------
    def current_session(self, *, create: bool = True, system_prompt: str | None = None) -> Session | None:
        """This kernel's session: the one in use, else the notebook's last one, else a new one."""
        store = self.store
        if self._current is not None:
            try:
                return store.get(self._current, messages=False)
            except SessionNotFoundError:  # deleted elsewhere, or pruned while still empty
                self._current = None
                if create and self._current_spec:
                    return self._adopt(self._create(**self._current_spec))
        notebook = self.notebook_path()
        if notebook:
            found = store.notebook_session(notebook)
            if found is not None:
                return self._adopt(found)
        if not create:
            return None
        return self.new_session(None, system_prompt=system_prompt)

    def use(self, ref: str) -> Session:
        return self._adopt(self.store.get(ref, messages=False))

    def new_session(self, name: str | None, *, system_prompt: str | None = None, adopt: bool = True,
                    profile: str | None = None) -> Session:
        """Create a session (named after the notebook when known) and, if *adopt*, make it current."""
        keep = self._adopt if adopt else (lambda s: s)
        if name is not None:
            return keep(self._create(name=name, system_prompt=system_prompt, profile=profile))
        notebook = self.notebook_path()
        base = _notebook_stem(notebook) if notebook else time.strftime("chat-%Y%m%d-%H%M%S")
        candidates = [base] + [f"{base}-{i}" for i in range(2, 10)] + [f"{base}-{secrets.token_hex(3)}"]
        for candidate in candidates:
            try:
                return keep(self._create(name=candidate, system_prompt=system_prompt, profile=profile))
            except DuplicateNameError:
                continue
        raise DuplicateNameError(f"Could not find a free session name starting with {base!r}.")

    # -- who wants to know about turns (chat panels showing a session) ---------------------------
    def watch(self, callback: Callable[[str, str | None, Any], None]) -> None:
        """Call *callback(event, session_id, turn)* when a turn made through this context
        starts (``"started"``, with the turn, whose generation can be followed) and when it
        is over (``"done"``, turn None). Held weakly for bound methods: a closed panel goes away."""
        self._watchers.append(weakref.WeakMethod(callback) if hasattr(callback, "__self__")
                              else (lambda: callback))

    def turn_started(self, session_id: str | None, turn: Any) -> None:
        self._tell("started", session_id, turn)

    def turn_done(self, session_id: str | None) -> None:
        self._tell("done", session_id, None)

    def _tell(self, event: str, session_id: str | None, turn: Any) -> None:
        for ref in list(self._watchers):
            callback = ref()
            if callback is None:
                self._watchers.remove(ref)
                continue
            try:
                callback(event, session_id, turn)
            except Exception:  # a broken panel must not break a cell
                log.exception("offgrid: a turn watcher failed")

    def forget(self, session_id: str) -> None:
        """A session was deleted: stop using it."""
        if self._current == session_id:
            self._current, self._current_spec = None, {}

    def _create(self, name: str | None, system_prompt: str | None, profile: str | None = None) -> Session:
        notebook = self.notebook_path()
        return self.store.create(name, system_prompt=system_prompt, profile=profile,
                                 metadata={"notebook": notebook} if notebook else None)

    def _adopt(self, session: Session) -> Session:
        self._current = session.id
        self._current_spec = {"name": session.name, "system_prompt": session.system_prompt}
        notebook = self.notebook_path()
        if notebook:
            self.store.bind_notebook(notebook, session.id)
        return session


class Runner(Protocol):
    """Where a kernel's turns run, as the magic and the panel see it."""

    label: str  # short, for a status line
    where: str  # a phrase: "in this kernel", "on the Jupyter server (URL)", ...

    def describe(self) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...

    def switch_model(self, name: str) -> str: ...

    def start_turn(self, session_id: str | None, content: str, **kwargs: Any) -> ChatTurn | RemoteTurn: ...


class KernelRunner:
    """Turns run on this kernel's backend and are stored in its store."""

    def __init__(self, context: Context):
        self.context = context

    @property
    def label(self) -> str:
        return "engine" if self.describe().get("kind") == "openai" else "in-kernel"

    @property
    def where(self) -> str:
        desc = self.describe()
        return f"on the engine at {desc['url']}" if desc.get("kind") == "openai" else "in this kernel"

    def describe(self) -> dict[str, Any]:
        return self.context.engine.describe()

    def status(self) -> dict[str, Any]:
        return self.context.engine.status()

    def switch_model(self, name: str) -> str:
        info = self.context.engine.switch_model(name)
        size = f" ({info.size_bytes / (1 << 20):.0f} MB); it loads on the next prompt" if info.size_bytes else ""
        return f"Switched to `{info.name}`{size}."

    def start_turn(self, session_id: str | None, content: str, *, params: dict[str, Any], source: str = "magic",
                   **kwargs: Any) -> ChatTurn:
        ctx = self.context
        return ChatTurn(ctx.engine, ctx.store, session_id, content, source=source, params=params,
                        history=session_id is not None, find_tools=ctx.find_tools, **kwargs).start()


class ServerRunner:
    """Turns run on a Jupyter server's shared model; the server stores them."""

    label = "server"

    def __init__(self, client: Client, context: Context | None = None):
        self.client = client
        self.context = context
        self.where = f"on the Jupyter server ({client.base_url})"

    def describe(self) -> dict[str, Any]:
        return self.client.models()["current"]

    def status(self) -> dict[str, Any]:
        return self.client.generation_status()

    def switch_model(self, name: str) -> str:
        raise InvalidRequestError("This kernel uses the Jupyter server's model, which its configuration sets "
                                  "(c.OffgridApp.model_path or engine_url). `%offgrid disconnect` to use a model "
                                  "of your own in this kernel.")

    def start_turn(self, session_id: str | None, content: str, *, params: dict[str, Any], source: str = "magic",
                   system_prompt: str | None = None, model: str | None = None, metadata: dict | None = None,
                   replace: str | None = None, tools: list[Tool] | None = None, tool_choice: Any = None,
                   max_rounds: int | None = None, rag: dict | None = None,
                   context: list[dict] | None = None) -> ChatTurn | RemoteTurn:
        if model:
            raise InvalidRequestError("--model needs this kernel's own backend: the server's model is set by its "
                                      "configuration. Add --local to run the cell in this kernel.")
        ctx = self.context
        profile_tools = (session_id is not None and tools is None and ctx is not None and not ctx.remote_sessions
                         and _profile_tools(ctx.local_store, session_id))
        if tools or profile_tools:
            return self._tool_turn(session_id, content, params=params, source=source, system_prompt=system_prompt,
                                   metadata=metadata, replace=replace, tools=tools, tool_choice=tool_choice,
                                   max_rounds=max_rounds, rag=rag, context=context)
        if rag is not None and session_id is None:
            raise InvalidRequestError("--rag on the server's model needs a session (its chat route retrieves): "
                                      "drop --no-history, or add --local.")
        return RemoteTurn(self.client, session_id, content, params=params, metadata=metadata, replace=replace,
                          system_prompt=system_prompt, rag=rag, context=context)

    def _tool_turn(self, session_id: str | None, content: str, **kwargs: Any) -> ChatTurn:
        """Tools are the kernel's functions, so the kernel drives the rounds: each round is one
        generation on the server's model (its OpenAI-compatible route, which records it in the
        server's statistics), and the turn is stored in the database this kernel shares with
        the server, as any turn of the server is."""
        ctx = self.context
        if session_id is not None and (ctx is None or ctx.remote_sessions):
            raise InvalidRequestError(
                "Tools run in this kernel, but its sessions are on a server elsewhere (`%offgrid connect`): add "
                "--no-history for a one-shot turn with tools, or --local to use a model in this kernel.")
        return ChatTurn(ctx.server_engine(self.client), ctx.local_store, session_id, content,
                        history=session_id is not None, find_tools=ctx.find_tools, **kwargs).start()


def _profile_tools(store: Store, session_id: str) -> bool:
    """Whether a session's profile offers tools (which a kernel, not the server, must run)."""
    profile = store.get(session_id, messages=False).profile
    if not profile:
        return False
    try:
        return bool(store.profiles.get(profile).tools)
    except UnknownProfileError:
        return False
