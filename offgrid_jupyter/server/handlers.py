"""The ``{base_url}offgrid/v1/`` routes (and ``{base_url}offgrid/metrics``), and their table.

Shared behaviour (auth, bodies, errors, the executor) is in :mod:`.base`; the
generating routes are in :mod:`.chat`. Every store call here runs off the event
loop, in the extension's own thread pool.
"""

from __future__ import annotations

import json
import re

from jupyter_server.auth.decorator import authorized
from prometheus_client import CONTENT_TYPE_LATEST
from tornado import web

from ..version import __version__
from ..chat import turns
from ..errors import InvalidRequestError, OffgridError
from ..inference.models import resolve_model
from ..stats import stats_document, stats_frame, to_epoch
from ..validation import check_text
from . import spec
from .base import OffgridHandler
from .collections import CollectionHandler, CollectionsHandler, SearchHandler
from .chat import CancelHandler, ChatHandler, OpenAIChatHandler, ProposalHandler, TurnHandler
from .completions import InlineCompletionHandler


class SessionsHandler(OffgridHandler):
    spec_path = "/sessions"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        limit = self.query_int("limit", 50, 1, 1000)
        offset = self.query_int("offset", 0, 0, 10**9)
        store = self.state.store

        def page() -> dict:
            return {"sessions": [s.to_dict(messages=False) for s in store.list(limit=limit, offset=offset)],
                    "total": store.count(), "limit": limit, "offset": offset}

        self.send(200, await self.run(page))

    @web.authenticated
    @authorized
    async def post(self) -> None:
        data = await self.body()

        def create():
            return self.state.store.create(data.get("name"), system_prompt=data.get("system_prompt"),
                                           profile=data.get("profile_name", data.get("profile")),
                                           metadata=data.get("metadata")).to_dict()

        self.send(201, await self.run(create))


class SessionHandler(OffgridHandler):
    spec_path = "/sessions/{ref}"

    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        self.send(200, await self.run(lambda: self.state.store.get(ref).to_dict()))

    @web.authenticated
    @authorized
    async def patch(self, ref: str) -> None:
        data = await self.body()

        def change() -> dict:
            store = self.state.store
            sid = store.get(ref, messages=False).id
            if "name" in data:
                store.rename(sid, data["name"])
            if "system_prompt" in data:
                store.update(sid, system_prompt=data["system_prompt"])
            if data.get("ended"):
                store.end(sid)
            return store.get(sid, messages=False).to_dict(messages=False)

        self.send(200, await self.run(change))

    @web.authenticated
    @authorized
    async def delete(self, ref: str) -> None:
        await self.run(self.state.store.delete, ref)
        self.send(204)


class ForkHandler(OffgridHandler):
    spec_path = "/sessions/{ref}/fork"

    @web.authenticated
    @authorized
    async def post(self, ref: str) -> None:
        data = await self.body()

        def fork() -> dict:
            return self.state.store.fork(ref, data.get("upto_message_id"), name=data.get("name")
                                         ).to_dict(messages=False)

        self.send(201, await self.run(fork))


class ExportHandler(OffgridHandler):
    spec_path = "/sessions/{ref}/export"

    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        self.send(200, await self.run(lambda: self.state.store.export_doc(self.state.store.get(ref))))


class ImportHandler(OffgridHandler):
    spec_path = "/import"

    @web.authenticated
    @authorized
    async def post(self) -> None:
        doc = await self.body()
        self.send(201, await self.run(lambda: self.state.store.import_doc(doc).to_dict(messages=False)))


class NotebookSessionHandler(OffgridHandler):
    """Which session a notebook uses, so a kernel on another machine finds it again after a restart."""

    spec_path = "/notebooks/session"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        path = self.query("path")
        if not path or len(path) > 4096:
            raise InvalidRequestError("path (the notebook's path, 1-4096 characters) is required.")
        check_text(path, "path")
        found = await self.run(self.state.store.notebook_session, path)
        self.send(200, {"path": path, "session": None if found is None else found.to_dict(messages=False)})

    @web.authenticated
    @authorized
    async def put(self) -> None:
        data = await self.body()
        await self.run(self.state.store.bind_notebook, data["path"], data["session"])
        self.send(204)


class MessagesHandler(OffgridHandler):
    spec_path = "/sessions/{ref}/messages"

    @web.authenticated
    @authorized
    async def post(self, ref: str) -> None:
        data = await self.body()

        def add() -> dict:
            return self.state.store.add_message(ref, data["role"], data["content"],
                                                metadata=data.get("metadata")).to_dict()

        self.send(201, await self.run(add))


class StatusHandler(OffgridHandler):
    spec_path = "/generation/status"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.send(200, {**self.state.engine.status(), "waiting_for_session": turns.waiting()})


class StatsHandler(OffgridHandler):
    spec_path = "/stats"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.send(200, await self.slow(stats_document, self.state.engine, self.state.store))  # (describes the engine)


class RequestsHandler(OffgridHandler):
    """The per-request rows behind ``client.stats_frame()`` (JSON columns)."""

    spec_path = "/stats/requests"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        args = {k: self.query(k) for k in ("since", "until", "session", "model")}
        for k in ("since", "until"):
            if args[k] is not None:
                args[k] = _time(k, args[k])

        def rows() -> dict:
            frame = stats_frame(**args, store=self.state.store)
            return {"columns": list(frame.columns),
                    "data": json.loads(frame.to_json(orient="values", date_format="iso", date_unit="us"))}

        self.send(200, await self.run(rows))


_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})")


def _time(name: str, text: str) -> float:
    """A query's time, exactly as openapi.json says: epoch seconds, an RFC 3339 date or date-time."""
    if not (_NUMBER.fullmatch(text) or _DATE.fullmatch(text) or _DATE_TIME.fullmatch(text)):
        raise InvalidRequestError(f"Bad filter: {name}={text[:40]!r} is not a time. Times look like 1793491200 "
                                  "(epoch seconds), 2026-11-01 or 2026-11-01T09:00:00Z.")
    try:
        return to_epoch(text)
    except (ValueError, OverflowError) as exc:  # 2026-02-31, 25:00, 1e999
        raise InvalidRequestError(f"Bad filter: {name}={text[:40]!r}: {exc}.") from None


class ProfilesHandler(OffgridHandler):
    spec_path = "/profiles"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.send(200, {"profiles": await self.run(lambda: [p.to_dict() for p in self.state.store.profiles.list()])})


class ToolsHandler(OffgridHandler):
    spec_path = "/tools"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.send(200, {"tools": [t.spec() for t in self.state.tools.values()]})


class ModelsHandler(OffgridHandler):
    spec_path = "/models"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        def describe() -> dict:
            try:
                default = resolve_model(None)
                default_info = {"name": default.name, "path": str(default.path), "source": default.source,
                                "size_bytes": default.size_bytes}
            except OffgridError as exc:
                default_info = {"error": str(exc)}
            current = self.state.engine.describe()
            data = [{"id": current["name"], "object": "model", "owned_by": "offgrid"}] if "name" in current else []
            return {"current": current, "default": default_info, "object": "list", "data": data}

        self.send(200, await self.slow(describe))  # (an engine may be slow to describe; never the store's threads)


class HealthHandler(OffgridHandler):
    spec_path = "/health"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.send(200, {"status": "ok", "version": __version__, "model_loaded": self.state.engine.loaded})


class OpenAPIHandler(OffgridHandler):
    spec_path = "/openapi.json"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.send(200, spec.served(self.base_url))


class MetricsHandler(OffgridHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        metrics = await self.slow(self.state.request_log.metrics)  # (reads the engine's figures)
        self.finish(metrics, set_content_type=CONTENT_TYPE_LATEST)


ROUTES = [SessionsHandler, SessionHandler, MessagesHandler, ForkHandler, ExportHandler, ImportHandler,
          NotebookSessionHandler, ChatHandler, ProposalHandler, TurnHandler, StatusHandler, CancelHandler,
          StatsHandler, RequestsHandler, ProfilesHandler, ToolsHandler, CollectionsHandler, CollectionHandler, SearchHandler, ModelsHandler,
          HealthHandler, OpenAIChatHandler, OpenAPIHandler, InlineCompletionHandler]


def handlers() -> list[tuple[str, type]]:
    """The URL table, derived from openapi.json: each route class names its path in the document
    (``spec_path``), whose ``{parameters}`` become URL groups; a route the document has and no
    class serves (or the reverse) stops the server from starting."""
    by_path = {h.spec_path: h for h in ROUTES}
    missing = sorted(set(spec.paths()) ^ set(by_path))
    if missing:
        raise RuntimeError(f"openapi.json and the route classes disagree on: {', '.join(missing)}")
    return [("/offgrid/v1" + spec.url_pattern(path), by_path[path]) for path in spec.paths()] + [
        ("/offgrid/metrics", MetricsHandler)]
