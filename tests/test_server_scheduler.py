"""The engine thread's queue (tp_embed/scheduler.py) in-process, with a fake engine that records batches."""

import queue
import threading
import time

import pytest
import torch

from tp_embed.config import ConfigError
from tp_embed.scheduler import EngineDeadError, Job, QueueFullError, Scheduler


class FakeEngine:
    """forward_pooled returns [len, first id] per input, so every row says which input it came from."""
    max_batch_tokens = 10
    max_batch_seqs = 3

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[list[list[int]]] = []
        self.type_starts: list[list[int] | None] = []
        self.item_calls: list[list[list[int]]] = []
        self.heartbeats = 0
        self.stopped = False

    def groups(self):
        return [self]

    def forward_pooled(self, sequences, type_starts=None):
        self.entered.set()
        assert self.gate.wait(10)
        self.batches.append([list(s) for s in sequences])
        self.type_starts.append(type_starts)
        if self.fail:
            raise RuntimeError("Connection reset by peer")
        return torch.tensor([[len(s), s[0]] for s in sequences], dtype=torch.float32)

    def embed_prepared(self, prepared):
        """Multimodal jobs' prepared inputs (here lists of ints): the same rows; [0] is a bad input."""
        self.item_calls.append([list(p) for p in prepared])
        if [0] in prepared:
            raise ValueError("input 0: a bad item")
        return expected_rows(prepared)

    def heartbeat(self):
        self.heartbeats += 1

    def stop_workers(self):
        self.stopped = True


class Harness:
    def __init__(self, engine=None, build=None, **kw):
        self.engine = engine or FakeEngine()
        self.delivered: queue.Queue = queue.Queue()
        self.fatal: list[BaseException] = []
        ready = threading.Event()
        self.scheduler = Scheduler(build or (lambda: self.engine), lambda jobs: [self.delivered.put(j) for j in jobs],
                                   lambda engine: ready.set(), self.fatal.append, **kw)
        self.scheduler.start()
        if build is None:
            assert ready.wait(10)

    def submit(self, sequences) -> Job:
        job = Job(sequences)
        self.scheduler.submit(job)
        return job

    def hold(self) -> Job:
        """Block the engine inside a batch of one 1-token input, so later jobs queue up behind it."""
        self.engine.gate.clear()
        self.engine.entered.clear()
        job = self.submit([[99]])
        assert self.engine.entered.wait(10)
        return job

    def results(self, n: int) -> list[Job]:
        return [self.delivered.get(timeout=10) for _ in range(n)]

    def close(self):
        self.engine.gate.set()
        self.scheduler.stop()
        assert self.scheduler.join(10)


def expected_rows(sequences):
    return torch.tensor([[len(s), s[0]] for s in sequences], dtype=torch.float32)


def test_jobs_share_batches_and_a_large_job_is_split_and_reassembled_in_order():
    h = Harness()
    h.hold()
    small = h.submit([[1, 1], [2, 2, 2]])
    large = [[10 + i] * (1 + i % 4) for i in range(9)]  # 9 inputs, 19 tokens: more than one batch
    big = h.submit(large)
    h.engine.gate.set()
    done = h.results(3)
    assert small in done and big in done
    torch.testing.assert_close(small.outputs, expected_rows(small.sequences))
    torch.testing.assert_close(big.outputs, expected_rows(large))
    batches = h.engine.batches[1:]
    assert [s for b in batches for s in b] == small.sequences + large  # arrival order kept
    assert len(batches[0]) == 3 and batches[0][:2] == small.sequences  # two requests in one batch
    for b in batches:
        assert len(b) <= 3 and sum(map(len, b)) <= 10
    assert h.scheduler.queued_tokens == 0 and h.scheduler.num_active == 0
    h.close()


def test_pair_jobs_carry_their_segment_starts_through_split_batches():
    """A cross-encoder's pairs (Job.type_starts) share batches with single texts, whose one segment is
    their whole length; a pair job split over two batches keeps each slice's starts."""
    h = Harness()
    h.hold()
    single = h.submit([[1, 1]])
    pairs = Job([[5, 5, 5], [6, 6], [7, 7, 7, 7], [8, 8]], type_starts=[1, 2, 3, 1])
    h.scheduler.submit(pairs)
    h.engine.gate.set()
    done = h.results(3)
    assert single in done and pairs in done
    torch.testing.assert_close(pairs.outputs, expected_rows(pairs.sequences))
    batches, starts = h.engine.batches[1:], h.engine.type_starts[1:]
    assert batches[0] == [[1, 1], [5, 5, 5], [6, 6]] and starts[0] == [2, 1, 2]
    assert [s for b in batches[1:] for s in b] == [[7, 7, 7, 7], [8, 8]]
    assert [t for b in starts[1:] for t in b] == [3, 1]
    h.close()


def test_waiting_item_jobs_are_embedded_together_within_the_budget():
    """Multimodal jobs queued while a batch runs go to embed_prepared together while their costs fit the
    token budget (10): 4 + 4 in one call, the next 4 in another; each job gets its own rows back. A
    cancelled job is skipped, and a bad input fails the jobs of its call only."""
    h = Harness()
    h.hold()
    a = Job([], 4, items=[[1], [2, 2]])
    b = Job([], 4, items=[[3, 3, 3]])
    gone = Job([], 4, items=[[9]])
    c = Job([], 4, items=[[4]])
    for job in (a, b, gone, c):
        h.scheduler.submit(job)
    h.scheduler.cancel(gone)
    h.engine.gate.set()
    done = h.results(4)
    assert gone not in done and {a, b, c} <= set(done)
    assert h.engine.item_calls == [[[1], [2, 2], [3, 3, 3]], [[4]]]
    for job in (a, b, c):
        assert job.error is None
        torch.testing.assert_close(job.outputs, expected_rows(job.items))
    bad, good = Job([], 6, items=[[0], [5]]), Job([], 6, items=[[6]])
    h.scheduler.submit(bad)
    h.scheduler.submit(good)
    done = h.results(2)
    assert isinstance(bad.error, ValueError) and good.error is None
    torch.testing.assert_close(good.outputs, expected_rows([[6]]))
    assert h.scheduler.queued_tokens == 0 and h.scheduler.num_active == 0
    h.close()


def test_an_input_longer_than_the_budget_gets_a_batch_of_its_own():
    h = Harness()
    h.hold()
    job = h.submit([[1], [5] * 25, [2]])
    h.engine.gate.set()
    h.results(2)
    assert h.engine.batches[1:] == [[[1]], [[5] * 25], [[2]]]
    torch.testing.assert_close(job.outputs, expected_rows(job.sequences))
    h.close()


def test_a_cancelled_job_is_dropped_before_compute():
    h = Harness()
    h.hold()
    gone = h.submit([[7, 7, 7]])
    kept = h.submit([[8]])
    h.scheduler.cancel(gone)
    assert h.scheduler.queued_tokens == 1 + 1  # the held input and `kept`
    h.engine.gate.set()
    done = h.results(2)
    assert gone not in done and kept in done
    assert [7, 7, 7] not in [s for b in h.engine.batches for s in b]
    assert h.delivered.empty() and h.scheduler.queued_tokens == 0
    h.close()


def test_queued_tokens_over_the_limit_are_refused_but_an_empty_queue_admits_anything():
    h = Harness(max_queued_tokens=10)
    h.hold()  # 1 token, counted until it is done
    h.submit([[1] * 9])
    with pytest.raises(QueueFullError) as e:
        h.submit([[2]])
    assert e.value.retry_after >= 1 and "10" in str(e.value)
    h.engine.gate.set()
    h.results(2)
    big = h.submit([[3] * 50])
    assert h.results(1) == [big]
    h.close()


def test_an_idle_engine_sends_heartbeats():
    h = Harness(heartbeat_interval=0.05)
    time.sleep(0.5)
    assert h.engine.heartbeats >= 4
    h.close()


def test_an_engine_failure_fails_every_job_and_is_fatal():
    h = Harness(engine=FakeEngine(fail=True))
    h.hold()
    queued = h.submit([[1, 2]])
    h.engine.gate.set()
    done = h.results(2)
    assert queued in done and all(isinstance(j.error, EngineDeadError) for j in done)
    assert "Connection reset by peer" in str(done[0].error)
    assert h.scheduler.join(10) and h.scheduler.dead and len(h.fatal) == 1
    assert not h.engine.stopped  # no STOP into a broken group
    with pytest.raises(EngineDeadError):
        h.submit([[1]])


def test_stop_finishes_queued_work_then_stops_the_workers():
    h = Harness()
    h.hold()
    job = h.submit([[4, 4]])
    h.scheduler.stop()
    h.engine.gate.set()
    assert job in h.results(2)
    assert h.scheduler.join(10) and h.engine.stopped


def test_a_startup_failure_is_fatal():
    def build():
        raise ConfigError("tp=3 does not divide num_attention_heads=8")
    h = Harness(build=build)
    assert h.scheduler.join(10) and h.scheduler.dead
    assert isinstance(h.fatal[0], ConfigError)


class RacyJob(Job):
    """A job whose first read of an unset `outputs` waits (up to 0.5 s) for a second reader: if two group
    threads assemble parts of it at once, both see None, as an unlucky thread switch would make them."""
    __slots__ = ("_outputs", "barrier")

    def __init__(self, sequences):
        self.barrier = threading.Barrier(2)
        super().__init__(sequences)

    @property
    def outputs(self):
        value = self._outputs
        if value is None:
            try:
                self.barrier.wait(0.5)
            except threading.BrokenBarrierError:
                pass
        return value

    @outputs.setter
    def outputs(self, value):
        self._outputs = value


class TwoGroupEngine(FakeEngine):
    """Two data-parallel groups of one input a batch; their forward passes end together."""
    max_batch_seqs = 1

    def __init__(self, finish_together=None):
        super().__init__()
        self.finish_together = finish_together or threading.Barrier(2)
        self.other = None

    def groups(self):
        if self.other is None:
            self.other = TwoGroupEngine(self.finish_together)
        return [self, self.other]

    def forward_pooled(self, sequences, type_starts=None):
        rows = super().forward_pooled(sequences, type_starts)
        try:
            self.finish_together.wait(2)
        except threading.BrokenBarrierError:
            pass
        return rows


def test_a_job_split_over_two_groups_keeps_both_parts():
    """Data parallelism: the two halves of one job finish on two groups' threads at the same moment, and
    both reach the job's outputs; each half's rows must survive (they were assembled without the lock,
    so both threads could allocate the output tensor and one half was lost)."""
    h = Harness(TwoGroupEngine())
    sequences = [[7, 7], [8, 8, 8]]
    job = RacyJob(sequences)
    h.scheduler.submit(job)
    assert h.results(1) == [job]
    torch.testing.assert_close(job.outputs, expected_rows(sequences))
    h.close()
