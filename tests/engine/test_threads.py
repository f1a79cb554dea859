"""ThreadTuner: fewer compute threads only when measured clearly faster, back up when the machine is
quiet again, never probing a prompt chunk. Step times are made up; the clock is fake."""

from __future__ import annotations

from parley.engine.threads import ThreadTuner

DECODE = (1, 0)  # one decode row
CHUNK = (0, 512)  # a prompt chunk


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(tuner: ThreadTuner, clock: Clock, step_ms: dict[int, float], steps: int, shape=DECODE) -> list[int]:
    """`steps` steps of `shape`, each taking step_ms[its thread count]; the counts they ran on."""
    counts = []
    for _ in range(steps):
        count = tuner.threads_for(shape)
        counts.append(count)
        seconds = step_ms[count] / 1000
        clock.now += seconds
        tuner.observe(shape, seconds)
    return counts


def test_a_quiet_machine_keeps_every_thread_and_probes_less_and_less_often():
    clock = Clock()
    tuner = ThreadTuner(2, clock=clock)
    counts = run(tuner, clock, {2: 4.0, 1: 5.0}, 10_000)  # 40 s; one thread 25% slower, as quiet here
    assert tuner.threads == 2
    probes = [i for i in range(1, len(counts)) if counts[i] == 1 and counts[i - 1] == 2]
    assert all(counts[i : i + 4] == [1] * 4 and counts[i + 4] == 2 for i in probes)  # 4 steps each
    gaps = [b - a for a, b in zip(probes, probes[1:])]  # in steps of ~4 ms
    assert gaps[0] < gaps[1] < gaps[2] and all(1990 <= gap <= 2010 for gap in gaps[2:])  # 2, 4, then 8 s apart
    assert probes[0] < 260 and len(probes) <= 8  # the first after 1 s; 0.3% of the steps on one thread


def test_a_busy_machine_gets_fewer_threads_and_the_quiet_one_gets_them_back():
    clock = Clock()
    tuner = ThreadTuner(2, clock=clock)
    run(tuner, clock, {2: 12.0, 1: 5.0}, 300)  # another process on one of the two cores
    assert tuner.threads == 1
    run(tuner, clock, {2: 12.0, 1: 5.0}, 3000)  # it stays: probes of two threads, further and further apart
    assert tuner.threads == 1
    run(tuner, clock, {2: 4.0, 1: 5.0}, 2000)  # it is gone: within 8 s, two threads again
    assert tuner.threads == 2


def test_fewer_threads_must_be_clearly_faster_and_more_need_only_be_as_fast():
    clock = Clock()
    tuner = ThreadTuner(2, clock=clock)
    run(tuner, clock, {2: 5.0, 1: 4.5}, 4000)  # 10% faster on one thread: within the margin
    assert tuner.threads == 2
    run(tuner, clock, {2: 5.0, 1: 4.0}, 2000)  # 20%: taken at the next probe, 8 s at most
    assert tuner.threads == 1
    run(tuner, clock, {2: 3.9, 1: 4.0}, 3000)  # two threads 2.5% faster: not enough to go back
    assert tuner.threads == 1
    run(tuner, clock, {2: 3.7, 1: 4.0}, 3000)  # 7.5%: enough
    assert tuner.threads == 2


def test_prompt_chunks_are_never_probed():
    clock = Clock()
    tuner = ThreadTuner(2, clock=clock)
    assert set(run(tuner, clock, {2: 100.0, 1: 50.0}, 200, CHUNK)) == {2}  # 20 s of chunks
    assert tuner.threads == 2 and CHUNK not in tuner.recent  # nor kept: a server sees many chunk shapes
    counts = run(tuner, clock, {2: 12.0, 1: 5.0}, 16)  # decode steps: a baseline and a probe, twice
    assert counts == ([2] * 4 + [1] * 4) * 2
    assert tuner.threads == tuner.threads_for(CHUNK) == 1  # and chunks run on the count taken


def test_one_slow_baseline_is_not_enough_to_take_fewer_threads():
    """The first decode steps of a request can be slow for reasons of their own: a count fewer must
    win a second probe, against a baseline of its own, before it is taken."""
    clock = Clock()
    tuner = ThreadTuner(2, clock=clock)
    clock.now = 5.0
    counts = []
    for i in range(16):
        count = tuner.threads_for(DECODE)
        counts.append(count)
        seconds = (0.010 if i < 4 else 0.004) if count == 2 else 0.005  # the first four slow
        clock.now += seconds
        tuner.observe(DECODE, seconds)
    assert counts == ([2] * 4 + [1] * 4) * 2 and tuner.threads == 2


def test_a_baseline_must_be_of_the_last_second():
    clock = Clock()
    tuner = ThreadTuner(2, clock=clock)
    run(tuner, clock, {2: 12.0, 1: 5.0}, 4)  # a baseline of (1, 0) ...
    run(tuner, clock, {2: 100.0, 1: 50.0}, 20, CHUNK)  # ... 2 s ago
    assert run(tuner, clock, {2: 12.0, 1: 5.0}, 5) == [2, 2, 2, 2, 1]  # a new one first


def test_a_probe_whose_shape_stops_coming_is_given_up_undecided():
    clock = Clock()
    tuner = ThreadTuner(2, clock=clock)
    run(tuner, clock, {2: 12.0, 1: 5.0}, 100)  # past the first probe's time, with a baseline of (1, 0)
    assert tuner.threads == 1
    tuner = ThreadTuner(2, clock=clock)
    clock.now += 2.0
    run(tuner, clock, {2: 12.0, 1: 5.0}, 4)  # a baseline, then the probe starts on the next step of (1, 0)
    assert run(tuner, clock, {2: 12.0, 1: 5.0}, 2) == [1, 1]
    counts = run(tuner, clock, {2: 12.0, 1: 5.0}, 16, (2, 0))  # the batch grew: never one thread
    assert set(counts) == {2} and tuner.probe is None and tuner.threads == 2


def test_between_one_and_all_threads_probes_go_down_and_up_by_turns():
    clock = Clock()
    tuner = ThreadTuner(4, clock=clock)
    assert set(run(tuner, clock, {4: 4.0, 3: 3.0, 2: 2.5, 1: 2.4}, 4000)) == {4, 3, 2, 1}
    assert tuner.threads == 2  # 3 was clearly faster than 4, and 2 than 3; 1 not clearly faster than 2
    counts = run(tuner, clock, {4: 1.0, 3: 2.0, 2: 3.0, 1: 4.0}, 20_000)  # quiet again: back to all four
    assert tuner.threads == 4 and 1 not in counts[-10_000:]


def test_one_thread_is_never_probed():
    clock = Clock()
    tuner = ThreadTuner(1, clock=clock)
    assert set(run(tuner, clock, {1: 5.0}, 1000)) == {1}
