"""How many threads decode with: measured while decoding, not guessed.

llama.cpp splits each token's work over a team of threads that meet at a
barrier after every graph node. Alone on the machine, one thread per core is
fastest. But when any other process (in a notebook: the kernel itself, busy with
pandas) keeps one core busy, a team of one thread per core waits at every
barrier for the thread that the scheduler has put aside, and decoding collapses:
measured here on 2 cores, 180 tok/s alone became 51 tok/s beside one CPU-bound
process, while one thread gave 166 alone and 160 beside it.

No static count wins both cases, so :class:`ThreadTuner` hill-climbs on the
measured time per token: it keeps the count in use, now and then tries a
neighbour (one thread more or fewer) for a few tokens, and switches when the
neighbour is faster (fewer threads must be 10% faster, more 3%: alone, one
thread fewer is only ~8% slower, and noise must not tip it). A neighbour that
loses is tried again after a doubling pause (0.5 s up to 8 s), and a probe that
is clearly hopeless ends after half its tokens, so probing costs little; when
the count in use suddenly gets slower (another process started), one thread
fewer is tried at once. llama.cpp applies a new count from the next token on
(``llama_set_n_threads``), so a switch costs nothing.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (llama-cpp-python's default is half of them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class ThreadTuner:
    """Chooses the decode thread count from measured token times (engine thread only)."""

    def __init__(self, max_threads: int, *, tune: bool = True, window: int = 8, margin_up: float = 0.03, margin_down: float = 0.10,
                 min_pause: float = 0.5, max_pause: float = 8.0, slowdown: float = 1.3, hopeless: float = 1.5):
        self.max_threads = max(1, int(max_threads))
        # False: always max_threads. Greedy output can differ with the thread count (the sums inside a
        # matrix product are split differently), so whoever needs the same tokens run after run pins it
        self.tune = tune
        self.window, self.slowdown, self.hopeless = window, slowdown, hopeless
        # fewer threads must win clearly (alone, one fewer is only ~8% slower: noise must not tip it)
        self.margin_up, self.margin_down = margin_up, margin_down
        self.min_pause, self.max_pause = min_pause, max_pause
        self.current = self.max_threads
        self.probing: int | None = None
        self.cost: dict[int, float] = {}  # threads -> seconds per token, last measured
        self._reference: float | None = None  # the current count's cost when it was chosen
        self._pause: dict[int, float] = {}
        self._next_probe: dict[int, float] = {}
        self._intervals: list[float] = []
        self._last: float | None = None
        self.switches = 0

    @property
    def threads(self) -> int:
        """The count to decode with now."""
        return self.probing if self.probing is not None else self.current

    def start(self) -> int:
        """A request starts decoding (the gap since the last one is not a token time)."""
        self._last = None
        self._intervals = []
        if self.probing is not None:  # an unfinished probe is forgotten
            self.probing = None
        return self.threads

    def _neighbours(self) -> list[int]:
        return [n for n in (self.current - 1, self.current + 1) if 1 <= n <= self.max_threads]

    def token(self, now: float) -> int | None:
        """A token was sampled at *now* (monotonic seconds); returns a new thread count
        to apply from the next token on, or None to keep the one in use."""
        if not self.tune:
            return None
        if self._last is None:
            self._last = now
            return None
        self._intervals.append(now - self._last)
        self._last = now
        if len(self._intervals) < self.window:
            half = self.window // 2
            if self.probing is not None and len(self._intervals) == half + 1:  # a hopeless probe ends early
                early = sum(self._intervals[1:]) / half
                if early > self.cost.get(self.current, float("inf")) * self.hopeless:
                    self._intervals = []
                    self._finish_probe(early, now)
                    return self.current
            return None
        measured = self._intervals[1:]  # the first interval after a switch pays for the switch
        cost = sum(measured) / len(measured)
        self._intervals = []
        before = self.threads
        if self.probing is not None:
            self._finish_probe(cost, now)
        else:
            self._observe(cost, now)
        after = self.threads
        return after if after != before else None

    def _observe(self, cost: float, now: float) -> None:
        n = self.current
        self.cost[n] = cost
        if self._reference is None or cost < self._reference:
            self._reference = cost
        elif cost > self._reference * self.slowdown:  # got slower: something else is running now,
            self._reference = cost                      # so fewer threads may do better: try at once
            if n > 1:
                self._pause[n - 1] = self.min_pause
                self._next_probe[n - 1] = now
        for m in self._neighbours():
            if now >= self._next_probe.get(m, 0.0):
                self.probing = m
                return

    def _finish_probe(self, cost: float, now: float) -> None:
        m, n = self.probing, self.current
        self.probing = None
        self.cost[m] = cost
        margin = self.margin_down if m < n else self.margin_up
        if cost < self.cost.get(n, float("inf")) * (1 - margin):
            self.current, self._reference = m, cost
            self.switches += 1
            self._pause[n] = self.min_pause  # the old count is a neighbour now: try it again soon
            self._next_probe[n] = now + self.min_pause
        else:
            self._pause[m] = min(self.max_pause, self._pause.get(m, self.min_pause / 2) * 2)
            self._next_probe[m] = now + self._pause[m]

    def state(self) -> dict:
        return {"decode_threads": self.current, "max_threads": self.max_threads, "switches": self.switches,
                "ms_per_token": {n: round(c * 1000, 3) for n, c in sorted(self.cost.items())}}
