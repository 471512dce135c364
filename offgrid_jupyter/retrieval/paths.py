"""Which files a learn takes: paths, folders and globs, confined to a root, walked with a budget.

A server learns only paths inside its root directory (:func:`inside`: no ``..``, no absolute
path elsewhere, no symbolic link out; a 403 naming the rule). Folders are walked without
following links to folders, globs are matched component by component with ``fnmatch`` (no
catastrophic backtracking, and ``**`` through two links to an ancestor is no longer endless),
a learn may look at ``max_entries`` folder entries and take ``max_files`` files, and what a glob
matches through a link out of the root is neither learned nor named: a refusal never tells
which files exist outside the root, nor where the root is.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
from pathlib import Path
from typing import Iterable

from ..errors import InvalidRequestError, PathRefusedError
from .chunking import KNOWN, Limits

SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".ipynb_checkpoints", ".venv", "venv",
             ".mypy_cache", ".pytest_cache", ".tox", "build", "dist"}


# -- paths -----------------------------------------------------------------------------------------
def inside(root: Path, given: str) -> Path:
    """*given* (relative to *root*, or absolute) resolved, if it stays inside *root*; else a 403
    naming the rule it broke."""
    if not isinstance(given, str) or not given.strip() or "\x00" in given:
        raise InvalidRequestError("A path to learn must be a non-empty string.")
    if ".." in Path(given).parts:
        raise PathRefusedError(f"{given[:200]!r}: paths may not contain '..'; give them relative to the server's "
                               "root directory.")
    root = root.resolve()
    candidate = Path(given) if os.path.isabs(given) else root / given
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        why = "it leads outside the server's root directory through a symbolic link" if \
            candidate.absolute().is_relative_to(root) else "it is outside the server's root directory"
        raise PathRefusedError(f"{given[:200]!r}: {why}; only files under it can be learned.")
    return resolved


class _Budget:
    """How much of the file system one learn may look at (``max_entries``, ``max_files``): a walk
    through links, or a glob over a huge tree, ends with a reason instead of never."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.entries = 0
        self.over: str | None = None

    def spend(self, n: int) -> bool:
        self.entries += n
        if self.entries > self.limits.max_entries and self.over is None:
            self.over = (f"stopped after looking at {self.limits.max_entries:,} folder entries (learn_limits "
                         "max_entries); name a smaller folder or a narrower pattern")
        return self.over is None


def expand(given: Iterable[str], root: Path | None, limits: Limits) -> tuple[list[Path], list[dict[str, str]]]:
    """Files named by *given* (files, folders, globs), and what could not be found (named as given,
    or relative to the root: a refusal never names a file outside it, nor the root itself)."""
    files: list[Path] = []
    failed: list[dict[str, str]] = []
    budget = _Budget(limits)
    for item in given:
        try:
            files += _expand_one(item, root, failed, budget)
        except OSError as exc:  # a name too long, a folder we may not read...
            failed.append({"path": item[:500], "reason": exc.strerror or type(exc).__name__})
        if budget.over:
            failed.append({"path": item[:500], "reason": budget.over})
            break
    seen, out = set(), []
    for f in files:
        key = str(f.resolve())
        if key not in seen:
            seen.add(key)
            out.append(f)
    if len(out) > limits.max_files:
        failed.append({"path": ", ".join(g[:100] for g in given)[:500],
                       "reason": f"{len(out):,} files; the first {limits.max_files:,} were taken (learn_limits "
                                 "max_files): learn the rest in another call"})
        out = out[:limits.max_files]
    return out, failed


def _expand_one(item: str, root: Path | None, failed: list[dict[str, str]], budget: _Budget) -> list[Path]:
    if not isinstance(item, str) or not item.strip() or "\x00" in item:
        raise InvalidRequestError("A path to learn must be a non-empty string without NUL characters.")
    base = (root or Path.cwd()).resolve()
    if glob.has_magic(item):
        parts = Path(item).parts
        fixed = []
        for part in parts:
            if glob.has_magic(part):
                break
            fixed.append(part)
        start = Path(*fixed) if fixed else Path(".")
        start = inside(root, str(start)) if root is not None else (base / start)  # the fixed part must be inside
        matches = list(_glob(start, parts[len(fixed):], budget))
        if root is not None:  # a match that leads outside (a link) is not learned, nor named
            matches = [m for m in matches if m.resolve().is_relative_to(base)]
        if not matches:
            failed.append({"path": item[:500], "reason": "the pattern matches no file"})
    else:
        matches = [inside(root, item) if root is not None else base / item]
    out: list[Path] = []
    for m in matches:
        try:
            mode = m.stat().st_mode
        except FileNotFoundError:
            failed.append({"path": item[:500], "reason": "no such file or directory"})
            continue
        if stat.S_ISDIR(mode):
            out += _walk(m, root, budget)
        elif stat.S_ISREG(mode):
            out.append(m)
        else:
            failed.append({"path": shown(m, root), "reason": "not a regular file (a pipe, socket or device)"})
    return out


def _glob(start: Path, pattern: tuple[str, ...], budget: _Budget) -> Iterable[Path]:
    """Paths under *start* matching *pattern* (components; ``**`` is any number of folders), in
    sorted order. Links to folders are not followed (two links to an ancestor made ``**`` endless),
    names starting with "." match only a component that starts with "." (as glob does), and the
    walk spends *budget*. Each component is matched with fnmatch (no catastrophic backtracking)."""
    if not start.is_dir() or not pattern:
        return
    for dirpath, dirnames, filenames in os.walk(start):  # followlinks=False
        dirnames.sort()
        if not budget.spend(len(dirnames) + len(filenames)):
            return
        rel = Path(dirpath).relative_to(start).parts
        for name in sorted(dirnames + filenames):
            if _matches(rel + (name,), pattern):
                yield Path(dirpath) / name
        if "**" not in pattern:  # no deeper than the pattern reaches
            dirnames[:] = [d for d in dirnames if len(rel) + 1 < len(pattern)]


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether path components *parts* match glob components *pattern* (linear table, no recursion)."""
    n, m = len(parts), len(pattern)
    row = [True] + [False] * n  # row[i]: pattern[:j] matches parts[:i]
    for j in range(1, m + 1):
        pat = pattern[j - 1]
        new = [False] * (n + 1)
        if pat == "**":
            new[0] = row[0]
            for i in range(1, n + 1):
                new[i] = row[i] or (new[i - 1] and not parts[i - 1].startswith("."))
        else:
            for i in range(1, n + 1):
                name = parts[i - 1]
                new[i] = row[i - 1] and fnmatch.fnmatchcase(name, pat) and (
                    not name.startswith(".") or pat.startswith("."))
        row = new
    return row[n]


def _walk(folder: Path, root: Path | None, budget: _Budget) -> list[Path]:
    out = []
    root_resolved = root.resolve() if root is not None else None
    for dirpath, dirnames, filenames in os.walk(folder):  # symbolic links to folders are not followed
        if not budget.spend(len(dirnames) + len(filenames)):
            break
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in KNOWN:
                continue
            try:
                if not stat.S_ISREG(path.stat().st_mode):  # a pipe named notes.md would block its reader
                    continue
            except OSError:  # a link to nothing
                continue
            if root_resolved is not None and not path.resolve().is_relative_to(root_resolved):
                continue  # a symbolic link out of the root
            out.append(path)
    return out


def shown(path: Path, root: Path | None) -> str:
    """How a document's path is kept and cited: relative to the root (a server) or to the working
    directory (a kernel: the notebook's folder), else absolute."""
    base = (root or Path.cwd()).resolve()
    resolved = path.resolve()
    return resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else str(resolved)

