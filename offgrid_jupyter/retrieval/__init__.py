"""Retrieval: learn your files into the store's database, find the chunks that answer a question.

- ``paths.py``: which files a learn takes (confined to a root, walked with a budget);
- ``reader.py``: each file read and chunked in a process of its own, with limits;
- ``chunking.py``: a file cut into chunks that follow its structure;
- ``rag.py``: the library of collections (learning, BM25 search, sources for a prompt);
- ``embeddings.py``: optional vectors from a GGUF, fused with BM25.

This floor sits below the chat floor: it needs of the store only its database (the tables are
made by ``chat/db.py``'s migrations), which is what :class:`Database` says.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable, Protocol


class Database(Protocol):
    """What retrieval needs of the store: its database (the tables are made by chat/db.py's
    migrations), its clock and its file (a key for caches). The store (chat/store.py) is one."""

    path: Any
    clock: Callable[[], float]

    def connection(self) -> sqlite3.Connection: ...

    def transaction(self, fn: Callable[[sqlite3.Connection], Any]) -> Any: ...
