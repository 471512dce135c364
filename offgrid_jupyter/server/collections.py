"""The retrieval routes: ``collections`` (learn, list, delete) and ``collections/{name}/search``.

A server learns only files under its Jupyter root directory (``rag.inside``: no ``..``, no
absolute path elsewhere, no symbolic link out; a 403 naming the rule), and cites them by
their path relative to that root. Learning reads and chunks files, which can take a while:
it runs in the pool server tools use, never on the event loop or in the store's two threads.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from jupyter_server.auth.decorator import authorized
from tornado import web

from ..errors import InvalidRequestError
from ..retrieval.rag import MAX_K
from ..validation import check_text
from .base import OffgridHandler

MAX_QUERY = 2000  # characters of q (openapi.json's maxLength)


class CollectionsHandler(OffgridHandler):
    spec_path = "/collections"

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.send(200, {"collections": await self.run(self.state.store.library.collections)})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        data = await self.body()
        name, paths = data.get("name", "default"), data["paths"]
        for p in paths:
            check_text(p, "A path")
        root = self.settings.get("server_root_dir") or "."
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(self.state.tool_pool, lambda: self.state.store.library.learn(
            paths, name, root=root, embedding_model=self.state.embedding_model, limits=self.state.learn_limits))
        self.send(200, report.to_dict())


class CollectionHandler(OffgridHandler):
    spec_path = "/collections/{name}"

    @web.authenticated
    @authorized
    async def get(self, name: str) -> None:
        library = self.state.store.library
        self.send(200, {"name": name, "documents": await self.run(library.documents, name)})

    @web.authenticated
    @authorized
    async def delete(self, name: str) -> None:
        await self.run(self.state.store.library.delete, name)
        self.send(204)


class SearchHandler(OffgridHandler):
    spec_path = "/collections/{name}/search"

    @web.authenticated
    @authorized
    async def get(self, name: str) -> None:
        query = self.query("q")
        if not query:
            raise InvalidRequestError("Give the search's words as the query argument q (…/search?q=words).")
        if len(query) > MAX_QUERY:
            raise InvalidRequestError(f"q is {len(query)} characters; a search takes at most {MAX_QUERY}.")
        check_text(query, "q")
        k = self.query_int("k", 5, 1, MAX_K)
        # off the store's pool: a collection with an embedding model runs it on the question
        hits = await asyncio.get_running_loop().run_in_executor(
            self.state.tool_pool, lambda: self.state.store.library.search(query, name, k))
        self.send(200, {"collection": name, "query": query, "hits": [asdict(h) for h in hits]})
