"""Inline completion as you type: the request, its prompt, and where a suggestion ends.

A completion is not a chat turn: no template, no session, nothing stored. Its prompt is the code
around the cursor, as the model was trained to continue it:

- **Fill-in-the-middle** when the GGUF names FIM tokens in its metadata (code models: Qwen2.5-Coder,
  StarCoder2, CodeLlama...): ``<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>``, so the
  suggestion fits what follows the cursor.
- **Prefix only** otherwise (the embedded SmolLM2 has none): the cells above and the text before
  the cursor, which the model continues.

The prefix is trimmed from its start and the suffix from its end to fit the engine's completion
budget, so the part near the cursor is always read. A suggestion ends at a sensible boundary
(``trim``): the end of the line when the cursor's line has code (inside brackets, where they
close), else a blank line or where the code goes back out of the block it began in; it never
repeats the text after the cursor.

Measured with ``bench/completion.py`` (2 cores, the default model, 40 lines of notebook above):
the first suggestion in a cell reads them all (about 3 s, as llama-cpp-python alone does); each
later keystroke reads only its new characters (about 0.1 s, 20x faster than without the cache).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError
from ..validation import check_text

MAX_PREFIX = 200_000  # characters a request may send (the prompt keeps only what fits)
MAX_SUFFIX = 50_000
MAX_CONTEXT_CELLS = 100
DEFAULT_TOKENS = 48
MAX_TOKENS = 256
KEEP_CHARS = 6_000  # of the cells above the cursor's cell, nearest kept
TRIM_STEP = 1_024  # characters: the prompt's start moves in steps this big, so keystrokes keep its cache
SUFFIX_SHARE = 4  # at most 1/4 of the prompt's tokens go to the text after the cursor (FIM)


@dataclass
class CompletionRequest:
    prefix: str
    suffix: str = ""
    language: str = "python"
    path: str | None = None
    context: list[str] | None = None  # the sources of the cells above, in order
    max_tokens: int = DEFAULT_TOKENS

    def check(self) -> "CompletionRequest":
        check_text(self.prefix, "prefix")
        check_text(self.suffix, "suffix")
        if len(self.prefix) > MAX_PREFIX or len(self.suffix) > MAX_SUFFIX:
            raise InvalidRequestError(f"prefix and suffix may be at most {MAX_PREFIX:,} and {MAX_SUFFIX:,} characters; "
                                      "send the text near the cursor.")
        for i, cell in enumerate(self.context or []):
            check_text(cell, f"context[{i}]")
        if len(self.context or []) > MAX_CONTEXT_CELLS:
            raise InvalidRequestError(f"context may hold at most {MAX_CONTEXT_CELLS} cells.")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or not 1 <= self.max_tokens <= MAX_TOKENS:
            raise InvalidRequestError(f"max_tokens must be an integer from 1 to {MAX_TOKENS}.")
        return self

    @property
    def mid_line(self) -> bool:
        """The cursor has code after it on its line."""
        return bool(self.suffix.split("\n", 1)[0].strip())

    @property
    def one_line(self) -> bool:
        """Complete the cursor's line only: it has code after the cursor, or code before it that
        does not open a block. Several lines are offered on an empty line or after a ``:``. (A
        completion's tokens cost a chat beside it nearly as much as its own: on two cores a
        two-row decode step took 1.95x a one-row step, so a suggestion is kept to what is shown.)"""
        line = self.prefix.rsplit("\n", 1)[-1].strip()
        return self.mid_line or bool(line and not line.endswith(":"))

    @property
    def indent(self) -> str:
        """The spaces after the last line break when nothing else is on the cursor's line: left out
        of the prompt, which then ends at a line's start as the model saw code in training (ending
        on a bare indentation token it mostly writes a line break), and expected back (``trim``)."""
        tail = self.prefix.rsplit("\n", 1)[-1]
        return tail if "\n" in self.prefix and not tail.strip(" \t") else ""

    def text_before(self) -> str:
        """The cells above (nearest kept) and the text before the cursor (without its indentation)."""
        above = "\n\n".join(c.rstrip() for c in (self.context or []) if c.strip())
        if len(above) > KEEP_CHARS:
            above = above[-KEEP_CHARS:].split("\n", 1)[-1]  # from a line's start
        prefix = self.prefix[: len(self.prefix) - len(self.indent)]
        return f"{above}\n\n{prefix}" if above else prefix

    def stops(self) -> list[str]:
        return ["\n"] if self.one_line else ["\n\n", "\n```"]


def trim(text: str, request: CompletionRequest) -> str:
    """Where a suggestion ends: the line's end when the cursor's line has code (inside brackets,
    where they close); else a blank line, the first line that goes back out of the block the
    suggestion began in, a Markdown fence or a line repeated; never the text after the cursor
    again, nor trailing whitespace."""
    if request.indent:  # the prompt ended at the line's start: the suggestion's first line is the cursor's
        first, *rest = text.split("\n")
        lead = first[: len(first) - len(first.lstrip(" \t"))]
        if not first.strip():
            return ""  # a blank line first: nothing sensible to show
        # indented as the cursor is: the lines after it are as written; else (a small model often drops
        # or changes the indentation) only that first line can be placed with confidence
        text = "\n".join([first[len(lead):], *rest]) if lead == request.indent else first[len(lead):]
    if request.one_line:
        text = text.split("\n", 1)[0]
        following = request.suffix.split("\n", 1)[0].strip()
        if following and following[0] in _CLOSE:  # the cursor is inside brackets: stop where they close
            text = text[:_closing(text, following[0])]
        elif following and text.rstrip().endswith(following):
            text = text.rstrip()[: -len(following)]
        return text.rstrip()
    line_start = request.prefix.rsplit("\n", 1)[-1]  # the cursor's line, up to the cursor
    base = len(line_start) if not line_start.strip() else _indent(line_start)
    inside = line_start.rstrip().endswith(":")  # the cursor's line opens a block: the suggestion is its body
    lines = text.split("\n")
    if not line_start.strip() and not inside:  # a new line: the block is where the suggestion's first line is
        base = len(line_start) + _indent(lines[0])
    kept: list[str] = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```") or (kept and line.strip() == kept[-1].strip()):
            break  # a chat model's Markdown fence, or a small model repeating itself
        if i > 0 and (not line.strip() or (_indent(line) <= base if inside else _indent(line) < base)):
            break  # a blank line, or back out of the block the suggestion began in
        kept.append(line)
    out = "\n".join(kept).rstrip()
    next_line = next((ln for ln in request.suffix.split("\n") if ln.strip()), "").strip()
    if next_line:
        at = out.find(next_line)
        if at >= 0:
            out = out[:at].rstrip()  # the code after the cursor is there already
    return out


_CLOSE = {")": "(", "]": "[", "}": "{"}


def _closing(text: str, close: str) -> int:
    """Where *text* closes the bracket the cursor is in (the one *close* ends), else its length."""
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                return i if ch == close else len(text)
    return len(text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


_SAFE_PATH = re.compile(r"[^\w./ -]")


def cache_key(path: str | None) -> str:
    """The KV cache entry a file's completions share (the next keystroke reads only new text)."""
    return "completion:" + _SAFE_PATH.sub("_", (path or "untitled")[:200])


def prompt_tokens(llm: Any, request: CompletionRequest, budget: int) -> list[int]:
    """The prompt's tokens, at most *budget*: fill-in-the-middle when the model has FIM tokens
    (``llm.fim_tokens()``), else the text before the cursor alone. What does not fit goes from
    the start of the text before (in ``TRIM_STEP`` steps at a line's start, so the next
    keystroke shares the same start and its cache) and from the end of the suffix."""
    start = llm.start_tokens()
    fim = llm.fim_tokens() if request.suffix.strip() else None
    suffix = llm.tokenize(request.suffix)[: max(0, budget // SUFFIX_SHARE)] if fim else []
    room = max(1, budget - len(start) - len(suffix) - (3 if fim else 0))
    text = request.text_before()
    tokens = llm.tokenize(text)
    cut = 0
    while len(tokens) > room and cut < len(text):
        over = (len(tokens) - room) / len(tokens)
        cut += max(TRIM_STEP, int(over * (len(text) - cut)) // TRIM_STEP * TRIM_STEP)
        line = text.find("\n", cut)
        cut = line + 1 if 0 <= line < cut + TRIM_STEP else cut
        tokens = llm.tokenize(text[cut:])
    tokens = tokens[-room:]
    if fim:
        pre, suf, mid = fim
        return [*start, pre, *tokens, suf, *suffix, mid]
    return [*start, *tokens]


def answer(request: CompletionRequest, result: Any, started: float) -> dict[str, Any]:
    """A finished completion as the route answers it (and ``offgrid_jupyter.complete_inline``):
    the trimmed suggestion in ``items`` (none when nothing is left to suggest), the model, how it
    ended, the milliseconds since *started* (``time.monotonic()``), and the token counts."""
    text = trim(result.text, request) if result.finish_reason in ("stop", "length") else ""
    return {"items": [{"insertText": text}] if text.strip() else [], "model": result.model,
            "finish_reason": result.finish_reason, "latency_ms": round((time.monotonic() - started) * 1000, 1),
            "usage": result.usage}
