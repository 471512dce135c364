"""Profiles: named presets a session is created with (seed 002's ``profile_name``).

A profile sets a session's system prompt (when the session has none of its own), its
sampling defaults (a cell's or a request's own values still win), an optional model, and
the tools and maximum rounds the tools issue will use. Profiles live in the store's
``profiles`` table, so the magics, the panel, the server and every kernel read the same
ones; profiles written in configuration (``c.OffgridApp.profiles``,
``c.OffgridMagics.profiles``) are put there when the extension starts (source
``config``), ``%offgrid profile add`` puts them there at run time (source ``user``).
A turn reads its session's profile when it starts, so changing a profile changes the
sessions that use it from their next turn on.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError, UnknownProfileError
from ..inference.generation import GenerationParams
from ..validation import check_name, check_text
from .rounds import MAX_ROUNDS_LIMIT

if TYPE_CHECKING:
    from .store import Store

SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "repeat_penalty", "seed")
MAX_CONTEXT_CELLS = 200  # what the kernel keeps (kernel/cells.py)


@dataclass
class Profile:
    name: str
    system_prompt: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # sampling defaults
    model: str | None = None
    tools: list[str] = field(default_factory=list)
    max_rounds: int = 4
    source: str = "user"  # user | config
    context_cells: int | str | None = None  # earlier cells a turn attaches: N, "all", or None (the caller's)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_profile(name: str, spec: dict[str, Any], source: str = "user") -> Profile:
    """*spec* as a Profile, every field checked (a 400 naming the field otherwise)."""
    check_name(name)
    if not isinstance(spec, dict):
        raise InvalidRequestError(f"Profile {name!r} must be an object of its settings.")
    known = {"system_prompt", "model", "tools", "max_rounds", "context_cells", *SAMPLING}
    unknown = set(spec) - known
    if unknown:
        raise InvalidRequestError(f"Profile {name!r} has unknown setting(s) {', '.join(sorted(unknown))}: "
                                  f"use {', '.join(sorted(known))}.")
    for key in ("system_prompt", "model"):
        if spec.get(key) is not None:
            if not isinstance(spec[key], str):
                raise InvalidRequestError(f"Profile {name!r}: {key} must be text.")
            check_text(spec[key], key)
    tools = spec.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, str) and t.isidentifier() for t in tools):
        raise InvalidRequestError(f"Profile {name!r}: tools must be a list of tool names (identifiers).")
    rounds = spec.get("max_rounds", 4)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS_LIMIT:
        raise InvalidRequestError(f"Profile {name!r}: max_rounds must be an integer from 1 to {MAX_ROUNDS_LIMIT}.")
    cells = spec.get("context_cells")
    if cells is not None and cells != "all" and (isinstance(cells, bool) or not isinstance(cells, int)
                                                 or not 0 <= cells <= MAX_CONTEXT_CELLS):
        raise InvalidRequestError(f"Profile {name!r}: context_cells must be a number of cells from 0 to "
                                  f"{MAX_CONTEXT_CELLS}, or \"all\".")
    params = {k: spec[k] for k in SAMPLING if spec.get(k) is not None}
    try:
        GenerationParams(**params).validate()
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"Profile {name!r}: {exc}") from None
    return Profile(name, spec.get("system_prompt"), params, spec.get("model"), list(tools), rounds, source, cells)


class Profiles:
    """The store's profiles (``store.profiles``)."""

    def __init__(self, store: "Store"):
        self.store = store

    def put(self, profile: Profile) -> Profile:
        doc = json.dumps({"params": profile.params, "tools": profile.tools, "context_cells": profile.context_cells})
        self.store.transaction(lambda c: c.execute(
            "INSERT INTO profiles (name, system_prompt, model, max_rounds, settings, source, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET system_prompt = excluded.system_prompt, "
            "model = excluded.model, max_rounds = excluded.max_rounds, settings = excluded.settings, "
            "source = excluded.source, updated_at = excluded.updated_at",
            (profile.name, profile.system_prompt, profile.model, profile.max_rounds, doc, profile.source,
             self.store.clock())))
        return profile

    def define(self, profiles: dict[str, dict[str, Any]], source: str = "config") -> list[Profile]:
        """Put every profile of a configuration mapping (all checked before any is written)."""
        if not isinstance(profiles, dict):
            raise InvalidRequestError("profiles must be a mapping of name -> settings.")
        checked = [check_profile(name, spec, source) for name, spec in profiles.items()]
        return [self.put(p) for p in checked]

    def get(self, name: str) -> Profile:
        row = self.store.connection().execute("SELECT * FROM profiles WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(p.name for p in self.list()) or "none yet"
            raise UnknownProfileError(f"No profile {str(name)[:80]!r} (known: {known}). "
                                      "`%offgrid profile add NAME ...` or c.OffgridApp.profiles defines one.")
        return _profile(row)

    def list(self) -> list[Profile]:
        return [_profile(r) for r in self.store.connection().execute("SELECT * FROM profiles ORDER BY name")]

    def delete(self, name: str) -> None:
        self.get(name)
        self.store.transaction(lambda c: c.execute("DELETE FROM profiles WHERE name = ?", (name,)))


def _profile(row: sqlite3.Row) -> Profile:
    settings = json.loads(row["settings"] or "{}")
    return Profile(row["name"], row["system_prompt"], settings.get("params") or {}, row["model"],
                   settings.get("tools") or [], row["max_rounds"], row["source"], settings.get("context_cells"))
