"""What one kernel talks to: the engine, the store and its current session.

The cell magic and the chat panel share one ``Context`` per kernel, so they
share the engine, the store and the notion of "this notebook's session".

Where the model runs: in this kernel (an in-process engine), or on the Jupyter
server that started the kernel. Such a server puts ``OFFGRID_URL`` and a key in
the environment its kernels inherit; a kernel then sends its turns there instead
of loading a model of its own (``%offgrid disconnect`` or ``--local`` opt out,
``%offgrid connect URL`` opts in). Either way the sessions are the same database.

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
from typing import Any, Callable

from .client import Client
from .engine import Engine, get_engine
from .errors import DuplicateNameError, InvalidRequestError, SessionNotFoundError
from .remote import RemoteTurn
from .stats import RequestLog, attach
from .store import Session, Store, get_store
from .turns import ChatTurn


log = logging.getLogger(__name__)


def _notebook_stem(path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", PurePath(path).stem).strip("-._")
    return stem[:56] or "notebook"


class Context:
    """One engine, one store and the current session of one kernel."""

    def __init__(self, shell: Any = None, *, engine: Engine | None = None, store: Store | None = None,
                 client: Client | None = None):
        self.shell = shell
        self._engine = engine
        self._store = store
        self._client = client
        self._local = False  # %offgrid disconnect: ignore the server from the environment
        self._watchers: list[Callable[[], Callable | None]] = []  # weak refs to turn watchers
        self._log: RequestLog | None = None
        self._current: str | None = None  # session id
        self._current_spec: dict[str, Any] = {}  # name/system prompt, to re-create a pruned empty session

    @property
    def engine(self) -> Engine:
        """The engine, with every request it serves recorded in the store (the stats)."""
        if self._engine is None:
            self._engine = get_engine()
        if self._log is None:
            self._log = attach(self._engine, self.store)
        return self._engine

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = get_store()
        return self._store

    def close(self) -> None:
        """Stop recording this context's requests (tests; unloading the extension)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- where the model runs ----------------------------------------------------------
    @property
    def client(self) -> Client | None:
        """The server this kernel's turns go to, or None for the in-kernel engine."""
        if self._client is None and not self._local and os.environ.get("OFFGRID_URL"):
            self._client = Client()
        return self._client

    def connect(self, url: str | None = None, token: str | None = None) -> Client:
        with Client(url, token, max_retries=0) as probe:
            probe.health()  # fail now, clearly, if it is not there or refuses the key
        client = Client(url, token)
        self._client, self._local = client, False
        return client

    def disconnect(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client, self._local = None, True

    @property
    def where(self) -> str:
        client = self.client
        return f"on the Jupyter server ({client.base_url})" if client else "in this kernel"

    def start_turn(self, session_id: str | None, content: str, *, params: dict[str, Any], local: bool = False,
                   source: str = "magic",
                   system_prompt: str | None = None, model: str | None = None, metadata: dict | None = None,
                   replace: str | None = None) -> ChatTurn | RemoteTurn:
        """A turn on the server's model when connected (unless *local*), else in this kernel."""
        client = None if local else self.client
        if client is not None:
            if model:
                raise InvalidRequestError("--model needs the in-kernel engine: the server's model is set by its "
                                          "configuration. Add --local to load it in this kernel.")
            return RemoteTurn(client, session_id, content, params=params, metadata=metadata, replace=replace,
                              system_prompt=system_prompt)
        return ChatTurn(self.engine, self.store, session_id, content, source=source, params=params,
                        system_prompt=system_prompt, model=model, metadata=metadata, replace=replace,
                        history=session_id is not None).start()

    # -- the notebook ----------------------------------------------------------------
    def notebook_path(self) -> str | None:
        ns = getattr(self.shell, "user_ns", None) or {}
        for value in (ns.get("__vsc_ipynb_file__"), ns.get("__session__"), os.environ.get("JPY_SESSION_NAME")):
            if isinstance(value, str) and value.endswith(".ipynb"):
                return value
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

    def new_session(self, name: str | None, *, system_prompt: str | None = None, adopt: bool = True) -> Session:
        """Create a session (named after the notebook when known) and, if *adopt*, make it current."""
        keep = self._adopt if adopt else (lambda s: s)
        if name is not None:
            return keep(self._create(name=name, system_prompt=system_prompt))
        notebook = self.notebook_path()
        base = _notebook_stem(notebook) if notebook else time.strftime("chat-%Y%m%d-%H%M%S")
        candidates = [base] + [f"{base}-{i}" for i in range(2, 10)] + [f"{base}-{secrets.token_hex(3)}"]
        for candidate in candidates:
            try:
                return keep(self._create(name=candidate, system_prompt=system_prompt))
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

    def _create(self, name: str | None, system_prompt: str | None) -> Session:
        notebook = self.notebook_path()
        return self.store.create(name, system_prompt=system_prompt,
                                 metadata={"notebook": notebook} if notebook else None)

    def _adopt(self, session: Session) -> Session:
        self._current = session.id
        self._current_spec = {"name": session.name, "system_prompt": session.system_prompt}
        notebook = self.notebook_path()
        if notebook:
            self.store.bind_notebook(notebook, session.id)
        return session
