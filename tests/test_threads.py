"""The decode thread tuner, as logic: a fake clock stands in for llama.cpp's token times.
(The real effect is measured by bench/engine.py: contention_ratio and decode_ratio.)"""

from offgrid_jupyter.inference.threads import ThreadTuner


class Machine:
    """Token times per thread count; the tuner's choices decide which one applies."""

    def __init__(self, tuner, times):
        self.tuner, self.times, self.now = tuner, times, 0.0
        self.used = []

    def decode(self, tokens):
        self.tuner.start()
        for _ in range(tokens):
            n = self.tuner.threads
            self.used.append(n)
            self.now += self.times[n]
            self.tuner.token(self.now)

    def share(self, n, last):
        recent = self.used[-last:]
        return recent.count(n) / len(recent)


def test_alone_it_keeps_every_core_and_probing_costs_little():
    m = Machine(ThreadTuner(2), {2: 0.0055, 1: 0.0061})  # measured alone: 2 threads are faster
    m.decode(3000)
    assert m.tuner.current == 2 and m.share(2, 2000) > 0.98


def test_beside_a_busy_process_it_moves_to_fewer_threads_quickly_then_back():
    times = {2: 0.0055, 1: 0.0061}
    m = Machine(ThreadTuner(2), times)
    m.decode(200)
    times[2] = 0.020  # another process starts: the two-thread team waits at every barrier
    m.decode(60)
    assert m.tuner.current == 1  # within a few windows
    m.decode(3000)
    assert m.share(1, 2500) > 0.97  # re-probing the slow count stays rare
    times[2] = 0.0055  # the other process ends
    m.decode(3000)
    assert m.tuner.current == 2


def test_more_cores_climb_one_thread_at_a_time():
    times = {8: 0.010, 7: 0.004, 6: 0.0045, 5: 0.005, 4: 0.006, 3: 0.007, 2: 0.008, 1: 0.012}
    m = Machine(ThreadTuner(8), times)
    m.decode(3000)
    assert m.tuner.current == 7


def test_a_new_request_does_not_count_the_pause_between_requests():
    tuner = ThreadTuner(2)
    tuner.start()
    tuner.token(0.0)
    tuner.token(0.005)
    tuner.start()
    assert tuner.token(100.0) is None and tuner._intervals == []
