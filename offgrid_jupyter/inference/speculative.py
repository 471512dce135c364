"""Prompt-lookup decoding: a sequence's next tokens drafted from its own context, checked in one step.

Why: a fix, an edit, code written from a DataFrame's columns and an answer over retrieved text
mostly copy tokens that are already in the prompt. When the last few tokens generated also occur
earlier in the context, the tokens that followed them there are a good guess for what comes next
(llama.cpp's "lookup" decoding; no draft model). The guesses go into the same ``llama_decode`` as
the last sampled token, with logits for every row, and the sequence's own sampler then samples row
after row, keeping drafts while the token it samples *is* the draft. Every kept token was sampled
by the same sampler from the logits plain decoding would have given it, in the same order, so the
output is token for token what plain decoding gives: greedy or not (a random draw is made once per
emitted token, exactly as without drafts), with a grammar or not. A rejected draft costs only its
rows, which leave the cache at once.

A draft row is not free: on the 2-core test machine, with the default 135M model, each row of
a decode step costs 0.6-0.9 of a one-row step (measured: 1 row 7.3 ms, 2 rows 13.9, 9 rows 41.1; a
small model decodes compute-bound, and its output layer alone is a fifth of it), whereas with a
model that decodes memory-bound (bigger, or on more cores) a row costs a few percent. So drafting
is priced, not assumed: the batcher measures what a draft row costs relative to a step
(``row_cost``), each sequence estimates how likely its next draft token is kept (kept tokens over
kept plus misses, from a prior of 0.8), and a draft is made only as long as its expected kept tokens
per unit of step time beat plain decoding's one token per step. Where rows are dear (here), a
sequence drafts only while it copies almost everything; free chat, whose guesses miss, stops
drafting after a miss or two.
"""

from __future__ import annotations

NGRAMS = (3, 2)  # the suffix lengths looked up, longest first (1 token matches too often to guess well)
MAX_DRAFT = 16  # tokens drafted per step at most
MIN_GAIN = 1.05  # expected tokens per step's time a draft must promise over plain decoding's 1
PRIOR_KEPT, PRIOR_MISSES = 4.0, 1.0  # the estimate a sequence starts from: a draft token is kept 80% of the time


def best_length(kept: float, row_cost: float, most: int) -> int:
    """The draft length (0: none) with the most expected tokens per unit of step time, when each
    draft token is kept with probability *kept* (while the ones before it were) and each row
    costs *row_cost* of a step; 0 unless it beats plain decoding by ``MIN_GAIN``."""
    best, best_gain = 0, MIN_GAIN
    expected, p = 1.0, 1.0
    for k in range(1, most + 1):
        p *= kept
        expected += p
        gain = expected / (1.0 + k * row_cost)
        if gain > best_gain:
            best, best_gain = k, gain
    return best


class Drafter:
    """The n-gram index of one sequence's context and the drafting policy (engine thread only).

    ``index[n][gram]`` is the position following the last earlier occurrence of the *n* tokens
    *gram*; the context's own last n-gram is indexed only once the token after it is known, so a
    lookup of the suffix finds an earlier occurrence, never itself."""

    __slots__ = ("tokens", "index", "sources", "kept", "misses", "drafted", "accepted")

    def __init__(self, tokens: list[int], sources: list[list[int]] | tuple = ()):
        self.tokens: list[int] = []
        self.index: dict[int, dict[tuple, int]] = {n: {} for n in NGRAMS}
        # other texts the reply may copy, as it would write them (a JSON reply writes the prompt's code
        # escaped): looked up when the context has no match; (source, position after the n-gram)
        self.sources: dict[int, dict[tuple, tuple[list[int], int]]] = {n: {} for n in NGRAMS}
        for source in sources:
            for n in NGRAMS:
                grams = self.sources[n]
                for p in range(n, len(source)):
                    grams[tuple(source[p - n:p])] = (source, p)
        self.kept, self.misses = PRIOR_KEPT, PRIOR_MISSES  # draft tokens kept, drafts cut short
        self.drafted = self.accepted = 0
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        tokens = self.tokens
        p = len(tokens)
        for n in NGRAMS:
            if p >= n:
                self.index[n][tuple(tokens[p - n:p])] = p
        tokens.append(token)

    def propose(self, room: int, row_cost: float) -> list[int]:
        """Up to *room* tokens that may follow the context, as many as pay for their rows at
        *row_cost* (none without a match)."""
        k = best_length(self.kept / (self.kept + self.misses), row_cost, min(MAX_DRAFT, room))
        if k <= 0:
            return []
        tokens = self.tokens
        for n in NGRAMS:
            if len(tokens) > n:
                gram = tuple(tokens[-n:])
                j = self.index[n].get(gram)
                if j is not None:
                    return tokens[j:j + k]
                found = self.sources[n].get(gram)
                if found is not None:
                    return found[0][found[1]:found[1] + k]
        return []

    def feedback(self, drafted: int, kept: int) -> None:
        """*kept* of the *drafted* tokens were sampled as drafted."""
        self.drafted += drafted
        self.accepted += kept
        self.kept += kept
        self.misses += kept < drafted
