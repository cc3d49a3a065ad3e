"""The engine thread: the one thread on rank 0 that issues collectives, and the queue that feeds it.

HTTP handlers `submit` tokenized requests (`Job`s). The engine thread packs the inputs of the waiting jobs,
in arrival order, into one ragged batch of at most `max_batch_tokens` tokens and `max_batch_seqs` inputs
(a job larger than one batch is split over several and reassembled by index), runs it through every
rank with `engine.forward_pooled`, and hands each finished job its pooled float32 rows [n, hidden] through
`deliver` (once per batch, for every job that batch finished). Handlers tokenize the next requests while a
batch runs, so tokenization overlaps the forward pass.

Idle, the thread sends a heartbeat every `heartbeat_interval` seconds so that no worker waits in a
broadcast past the collective timeout. An exception in the thread means the ranks are out of step (a
worker died, a collective timed out): every job fails with EngineDeadError and `on_fatal` is called; the
process must exit, since the process group cannot be trusted again.
"""

import collections
import logging
import math
import threading
import time
from typing import Callable

import torch

from tp_embed.packing import Packer

logger = logging.getLogger("tp_embed")


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an error; nothing more can be computed."""


class ShuttingDownError(RuntimeError):
    """The server is stopping and admits no new work."""


class QueueFullError(RuntimeError):
    def __init__(self, queued_tokens: int, request_tokens: int, limit: int, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"the server is busy: {queued_tokens} tokens are queued and this request adds "
                         f"{request_tokens}, over the limit of {limit} (--max-queued-tokens); retry after "
                         f"{retry_after} s")


class Job:
    """One request's token sequences on their way through the queue.

    `outputs` is float32 [len(sequences), hidden] once `error` is None and the job is delivered; for a job whose
    `output` asks a token head (tp_embed/token_heads.py), a list of float32 [len(sequence), width], one per sequence.
    `future` belongs to the caller (the HTTP handler's asyncio future); the scheduler never touches it.
    """

    __slots__ = ("sequences", "num_tokens", "next_seq", "num_done", "outputs", "error", "cancelled",
                 "released", "future", "items", "type_starts", "started", "output")

    def __init__(self, sequences: list[list[int]], num_tokens: int | None = None, future=None,
                 items: list | None = None, type_starts: list[int] | None = None, output: int = 0):
        # a multimodal job carries its items prepared by the model's processor (engine.prepare_items)
        # instead of token sequences, and num_tokens their cost; group 0's engine thread embeds waiting
        # item jobs together with engine.embed_prepared (the processor packs the batches)
        self.items = items
        self.sequences = sequences
        # a cross-encoder's pairs: where each sequence's second segment starts (Batch.from_token_ids)
        self.type_starts = type_starts
        self.num_tokens = num_tokens if num_tokens is not None else sum(map(len, sequences))
        self.next_seq = 0  # first sequence not yet put into a batch
        self.num_done = 0
        self.outputs: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.released = False  # its tokens no longer count against max_queued_tokens
        self.future = future
        self.started: int | None = None  # time.time_ns() when its first batch started (request tracing)
        self.output = output  # token_heads.POOLED, or the token head its batches run (never mixed in a batch)


class Scheduler:
    def __init__(self, build_engine: Callable[[], object], deliver: Callable[[list[Job]], None],
                 on_ready: Callable[[object], None], on_fatal: Callable[[BaseException], None],
                 max_queued_tokens: int | None = None, heartbeat_interval: float = 5.0, metrics=None):
        """build_engine runs on the engine thread (it initialises the process group and loads the shard);
        deliver, on_ready and on_fatal are called from the engine thread and must be thread-safe."""
        self.build_engine, self.deliver, self.on_ready, self.on_fatal = build_engine, deliver, on_ready, on_fatal
        self.max_queued_tokens = max_queued_tokens
        self.heartbeat_interval = heartbeat_interval
        self.metrics = metrics
        self.engine = None
        self.ready = False
        self.dead = False
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._item_jobs: collections.deque[Job] = collections.deque()  # multimodal, for group 0
        self._active: set[Job] = set()  # admitted, neither finished nor failed
        self._queued_tokens = 0
        self._stopping = False
        self._tokens_per_s = 0.0  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._run, name="tp-embed-engine", daemon=True)

    # ---- called from other threads ----

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFullError, ShuttingDownError or EngineDeadError instead."""
        with self._cond:
            if self.dead:
                raise EngineDeadError("the engine has stopped after an error")
            if self._stopping or not self.ready:
                raise ShuttingDownError("the server is not accepting requests")
            limit = self.max_queued_tokens
            if limit is not None and self._queued_tokens and self._queued_tokens + job.num_tokens > limit:
                raise QueueFullError(self._queued_tokens, job.num_tokens, limit, self._retry_after())
            self._queued_tokens += job.num_tokens
            (self._item_jobs if job.items is not None else self._waiting).append(job)
            self._active.add(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop a job whose client is gone or whose time ran out; inputs not yet computed never will be."""
        with self._cond:
            if job in self._active:
                job.cancelled = True
                self._active.discard(job)
                self._release(job)

    def stop(self) -> None:
        """Finish what is queued, send STOP to the workers and end the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def fail_all(self, error: BaseException) -> None:
        """Fail every queued and in-flight job (a batch already running still runs, its result unused)."""
        with self._cond:
            jobs = self._fail_locked(error)
        if jobs:
            self.deliver(jobs)

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def queue_depth(self) -> int:
        """Jobs admitted with inputs still to be put into a batch."""
        return len(self._waiting) + len(self._item_jobs)

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    # ---- the engine thread ----

    def _run(self) -> None:
        try:
            self.engine = self.build_engine()
        except BaseException as e:  # a startup error: nothing was admitted yet
            self.dead = True
            self.on_fatal(e)
            return
        with self._cond:
            self.ready = not self._stopping
        # one lane per data-parallel group: this thread drives group 0, one more thread each other group
        lanes = self.engine.groups()
        others = [threading.Thread(target=self._run_lane, args=(lane, g), name=f"tp-embed-group-{g}", daemon=True)
                  for g, lane in enumerate(lanes) if g > 0]
        self.on_ready(self.engine)
        for thread in others:
            thread.start()
        self._run_lane(self.engine, 0)
        for thread in others:
            thread.join()

    def _run_lane(self, engine, group: int) -> None:
        """Run batches on one group until the queue is drained at shutdown, then stop its ranks. A free
        group takes the next batch, so work goes to the least-loaded group."""
        try:
            self._loop(engine, group)
            engine.stop_workers()
        except BaseException as e:
            logger.exception("engine thread of group %d failed; failing every request and exiting", group)
            with self._cond:
                self.dead = True
                self._stopping = True
                jobs = self._fail_locked(EngineDeadError(f"the engine failed: {type(e).__name__}: {e}"))
                self._cond.notify_all()
            if jobs:
                self.deliver(jobs)
            self.on_fatal(e)

    def _loop(self, engine, group: int = 0) -> None:
        last_collective = time.monotonic()
        while True:
            with self._cond:
                mine = self._item_jobs if group == 0 else ()
                if not self._waiting and not mine and not self._stopping:
                    self._cond.wait(self.heartbeat_interval)
                if self.dead or (self._stopping and not self._waiting and not mine):
                    return
                item_jobs = self._take_item_jobs(engine.max_batch_tokens) if group == 0 else []
                batch = [] if item_jobs else self._pack(engine.max_batch_tokens, engine.max_batch_seqs)
            if item_jobs:
                self._run_items(engine, item_jobs)
                last_collective = time.monotonic()
                continue
            if not batch:
                if time.monotonic() - last_collective >= self.heartbeat_interval:
                    engine.heartbeat()
                    last_collective = time.monotonic()
                continue
            self._run_batch(engine, batch, group)
            last_collective = time.monotonic()

    def _run_batch(self, engine, batch: list[tuple[Job, int, int]], group: int) -> None:
        """Run one packed batch of job slices on a group and deliver the jobs it finishes."""
        sequences = [s for job, start, end in batch for s in job.sequences[start:end]]
        num_tokens = sum(map(len, sequences))
        started = time.time_ns()
        for job, start, _ in batch:
            if start == 0:
                job.started = started
        t0 = time.perf_counter()
        output = batch[0][0].output
        if output:
            rows = engine.forward_tokens(sequences, output)
        else:
            rows = engine.forward_pooled(sequences, self._type_starts(batch))
        seconds = time.perf_counter() - t0
        rate = num_tokens / max(seconds, 1e-6)
        self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * rate if self._tokens_per_s else rate
        if self.metrics is not None:
            self.metrics.observe_batch(len(batch), len(sequences), num_tokens, seconds, group)
        # under the lock: with data parallelism two groups' threads may each hold part of one job, and
        # both would otherwise allocate its outputs (one losing the other's rows) or miscount num_done
        with self._cond:
            finished = self._finish_locked(self._distribute(batch, rows, output))
        if finished:
            self.deliver(finished)

    @staticmethod
    def _distribute(batch: list[tuple[Job, int, int]], rows: torch.Tensor, output: int) -> list[Job]:
        """Each job slice's rows of a batch into its outputs (a token head's rows split per sequence); the jobs
        now complete. Called with the lock held."""
        finished, row = [], 0
        for job, start, end in batch:
            if output:
                lengths = [len(s) for s in job.sequences[start:end]]
                if job.outputs is None:
                    job.outputs = [None] * len(job.sequences)
                job.outputs[start:end] = rows[row:row + sum(lengths)].split(lengths)
                row += sum(lengths)
            elif start == 0 and end == len(job.sequences):
                job.outputs = rows[row:row + end - start]  # the whole job in this batch: a view, no copy
                row += end - start
            else:
                if job.outputs is None:
                    job.outputs = torch.empty(len(job.sequences), rows.shape[1], dtype=rows.dtype)
                job.outputs[start:end] = rows[row:row + end - start]
                row += end - start
            job.num_done += end - start
            if job.num_done == len(job.sequences):
                finished.append(job)
        return finished

    @staticmethod
    def _type_starts(batch: list[tuple[Job, int, int]]) -> list[int] | None:
        """The batch's segment starts when a job in it has pairs (a single text is one segment)."""
        if all(job.type_starts is None for job, _, _ in batch):
            return None
        return [t for job, start, end in batch
                for t in (job.type_starts[start:end] if job.type_starts is not None
                          else map(len, job.sequences[start:end]))]

    def _take_item_jobs(self, max_tokens: int) -> list[Job]:
        """Whole multimodal jobs from the head of their queue while their prepared inputs cost at most
        max_tokens together (always at least one job). Called with the lock held."""
        jobs, packer = [], Packer(max_tokens, max_seqs=len(self._item_jobs))
        while self._item_jobs:
            job = self._item_jobs[0]
            if not job.cancelled:
                if not packer.fits(job.num_tokens):
                    break
                jobs.append(job)
                packer.add(job.num_tokens)
            self._item_jobs.popleft()
        return jobs

    def _run_items(self, engine, jobs: list[Job]) -> None:
        """Embed the prepared inputs of several multimodal jobs in one call (the processor packs them into
        batches) and hand each job its rows. A ValueError is raised before anything reaches the workers,
        so the ranks stay in step; it fails these jobs."""
        started = time.time_ns()
        for job in jobs:
            job.started = started
        t0 = time.perf_counter()
        try:
            pooled, error = engine.embed_prepared([p for job in jobs for p in job.items]), None
        except ValueError as e:
            pooled, error = None, e
        seconds = time.perf_counter() - t0
        row = 0
        with self._cond:
            for job in jobs:
                if error is not None:
                    job.error = error
                else:
                    job.outputs = pooled[row:row + len(job.items)]
                    row += len(job.items)
            finished = self._finish_locked(jobs)
        if self.metrics is not None and error is None:
            self.metrics.observe_batch(len(jobs), row, sum(job.num_tokens for job in jobs), seconds, 0)
        if finished:
            self.deliver(finished)

    def _finish_locked(self, jobs: list[Job]) -> list[Job]:
        """Of jobs whose outputs or error are set, those still active (not cancelled meanwhile): no longer
        active, their tokens released; the caller delivers them. Called with the lock held."""
        finished = [job for job in jobs if job in self._active]
        for job in finished:
            self._active.discard(job)
            self._release(job)
        return finished

    def _pack(self, max_batch_tokens: int, max_batch_seqs: int) -> list[tuple[Job, int, int]]:
        """Take (job, start, end) slices from the head of the queue until the batch is full (by `Packer`'s
        rule: an input longer than the token budget gets a batch of its own). Called with the lock held."""
        batch, packer = [], Packer(max_batch_tokens, max_batch_seqs)
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                continue
            if batch and job.output != batch[0][0].output:
                break  # one kind of output a batch: the next batch starts with this job
            sequences, start = job.sequences, job.next_seq
            end = start
            while end < len(sequences) and packer.fits(len(sequences[end])):
                packer.add(len(sequences[end]))
                end += 1
            if end > start:
                batch.append((job, start, end))
                job.next_seq = end
            if end < len(sequences):
                break  # the batch is full; the rest of this job goes into the next one
            self._waiting.popleft()
        return batch

    def _release(self, job: Job) -> None:
        if not job.released:
            job.released = True
            self._queued_tokens -= job.num_tokens

    def _fail_locked(self, error: BaseException) -> list[Job]:
        jobs = list(self._active)
        for job in jobs:
            job.error = error
            self._release(job)
        self._active.clear()
        self._waiting.clear()
        self._item_jobs.clear()
        return jobs

    def _retry_after(self) -> int:
        """Seconds until the queue has likely drained, from the measured throughput."""
        if self._tokens_per_s <= 0:
            return 1
        return max(1, min(60, math.ceil(self._queued_tokens / self._tokens_per_s)))
