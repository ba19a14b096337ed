"""Continuous batching: one running batch per model, which requests join and leave at any step.

Each request's completion is a Job. A worker thread per model runs steps. Each step:
1. frees the rows of jobs that ended or whose client went away (at once: the row is free for the
   next request this very step);
2. prefills waiting prompts, alone, in caches of their own, at most `chunk` prompt tokens a step
   while rows decode (so the running requests keep streaming while a long prompt goes in), as much
   as it takes when nothing decodes. A prefilled prompt (all but its last token) is copied into a
   free row of the running batch (lab.attention.copy_cache_rows);
3. decodes one token for every row in one forward, each row at its own position (per-row
   start_pos: docs/writing-plugins.md, "Per-row positions"). A row that just joined is fed its
   prompt's last token and samples its first new one.

Why rows of one batch, whatever their lengths: on CPU a decoding step is bound by reading the
weights, which the rows share, so 16 rows cost little more than 1. Why masks over a padded cache
(each row's keys at its own positions, the causal mask hiding the rest) rather than a paged or
ragged cache: the step stays one batched forward of fixed shapes, which torch.compile can compile
once per bucket, and the keys a row reads past its length cost less than a second forward would
(benchmarks/test_decode_bound.py measures both; README, "Serving").

The running batch's caches come in buckets, powers of two of rows (up to max_batch) and of positions
(up to the model's): a request that needs more rows or positions grows them (to hold the waiting
requests too), and the batch shrinks again when its rows fit a smaller bucket. Each bucket is one
shape for the compiled step, compiled in the background once it has lasted `compile_after` steps.

A request fails alone: a sampling setting the sampler refuses or a row whose logits are not finite
(NaN) ends that job with an error while the others go on. A failure of the step itself (a bug)
ends the jobs in the batch, never the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from lab.attention import copy_cache_rows
from lab.errors import LabError
from lab.inference.compiled import DecodeStep
from lab.inference.sampling import check_sampling, sample

log = logging.getLogger("lab_serve")
MIN_LENGTH = 64  # the smallest bucket of cache positions


@dataclass(eq=False)
class Job:
    """One completion: prompt ids in, tokens out through `on_token(id) -> keep going?`, then
    `on_end(finish_reason)` ("stop", "length", "cancelled" or "error: ...") exactly once."""

    ids: list[int]
    max_tokens: int
    on_token: Callable[[int], bool]
    on_end: Callable[[str], None]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    deadline: float = float("inf")  # time.monotonic() past which the job ends ("length")
    cancelled: bool = False  # set by the server when the client goes away
    made: int = 0
    done: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)

    def cancel(self) -> None:
        self.cancelled = True  # read by the worker at its next step; a bool write is atomic in Python

    def finish(self, reason: str) -> None:
        if not self.done:
            self.done = True
            self.on_end(reason)

    def take(self, token: int, eos_id: int | None) -> None:
        if self.cancelled:
            return self.finish("cancelled")
        if token == eos_id:
            return self.finish("stop")
        self.made += 1
        if not self.on_token(token):
            return self.finish("stop")  # a stop string
        if self.made >= self.max_tokens or time.monotonic() > self.deadline:
            self.finish("length")

    @property
    def positions(self) -> int:
        """Cache positions the job can use: its prompt and its new tokens but the last (never fed)."""
        return len(self.ids) + self.max_tokens - 1


@dataclass
class Prefill:
    """A prompt going in, chunk by chunk, alone: all of it but its last token (fed when it joins)."""

    job: Job
    caches: list
    done: int = 0  # prompt tokens in its caches

    @property
    def left(self) -> int:
        return len(self.job.ids) - 1 - self.done


def bucket(n: int, smallest: int, largest: int) -> int:
    """The smallest power of two times `smallest` that holds n, at most `largest`."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, largest)


class Running:
    """The running batch: caches of `rows` x `length`, and per row its job (None: free), position
    (where its next fed token goes) and next token to feed."""

    def __init__(self, model):
        self.model = model
        self.caches: list | None = None
        self.jobs: list[Job | None] = []
        self.pos: list[int] = []
        self.last: list[int] = []
        self.length = 0

    def job(self, row: int) -> Job:
        """The job of a live row."""
        job = self.jobs[row]
        assert job is not None, f"row {row} is free"
        return job

    @property
    def rows(self) -> int:
        return len(self.jobs)

    def live(self) -> list[int]:
        return [r for r, j in enumerate(self.jobs) if j is not None]

    def free(self, row: int) -> None:
        self.jobs[row], self.pos[row], self.last[row] = None, 0, 0

    def resize(self, rows: int, length: int) -> None:
        """New caches of rows x length holding the live rows, first, in their order."""
        live = self.live()
        caches = self.model.new_caches(rows, length)
        if live and self.caches is not None:
            for dst, src in zip(caches, self.caches):
                copy_cache_rows(dst, src, list(range(len(live))), live)
        pad = rows - len(live)
        self.jobs = [self.jobs[r] for r in live] + [None] * pad
        self.pos = [self.pos[r] for r in live] + [0] * pad
        self.last = [self.last[r] for r in live] + [0] * pad
        self.caches, self.length = caches, length

    def join(self, p: Prefill, row: int) -> None:
        assert self.caches is not None  # seat() resized the batch first
        for dst, src in zip(self.caches, p.caches):
            copy_cache_rows(dst, src, [row], [0])
        self.jobs[row], self.pos[row], self.last[row] = p.job, len(p.job.ids) - 1, p.job.ids[-1]


class Batcher:
    """The worker thread of one model and its running batch."""

    def __init__(
        self,
        model,
        max_batch: int,
        eos_id: int | None,
        name: str = "model",
        compile: bool = False,
        chunk: int = 64,
        compile_after: int = 32,
    ):
        self.model, self.max_batch, self.eos_id, self.chunk = model, max(1, max_batch), eos_id, chunk
        self.device = model.tok_emb.weight.device
        self.max_len = model.position.max_len or model.config.block_size
        self.step_fn = DecodeStep(model, compile=compile, background=True, compile_after=compile_after)
        self.waiting: deque[Job] = deque()  # submitted, not yet prefilling
        self.prefill: Prefill | None = None
        self.taking: Job | None = None  # taken from the queue, being checked before its prefill
        self.batch = Running(model)
        self.wake = threading.Condition()
        self.closed = False
        self.steps = 0  # decoding steps run, and rows they carried: rows / steps is the mean batch
        self.rows = 0
        self.thread = threading.Thread(target=self.run, name=f"lab-serve {name}", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        for j in jobs:
            if j.seed is not None:
                j.generator = torch.Generator(device=self.device).manual_seed(j.seed)
        with self.wake:
            self.waiting.extend(jobs)
            self.wake.notify()

    def in_flight(self) -> int:
        """Jobs waiting, prefilling or decoding."""
        with self.wake:
            # A job is counted once: taken from the queue but not yet prefilling, prefilling, or seated.
            p = self.prefill
            prefilling = p is not None and not p.job.done and all(j is not p.job for j in self.batch.jobs)
            return len(self.waiting) + (self.taking is not None) + prefilling + len(self.batch.live())

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
            jobs = list(self.waiting) + [j for j in self.batch.jobs if j is not None]
        for j in jobs + ([self.prefill.job] if self.prefill else []):
            j.cancel()

    def run(self) -> None:
        while True:
            with self.wake:
                while not (self.waiting or self.prefill or self.batch.live() or self.closed):
                    self.wake.wait()
                if self.closed:
                    break
            try:
                self.step()
            except Exception as e:  # a bug must end its requests, not the worker
                log.exception("generation failed")
                self.fail_all(type(e).__name__)
        self.fail_all("cancelled", error=False)

    def fail_all(self, message: str, error: bool = True) -> None:
        with self.wake:
            jobs = list(self.waiting) + [j for j in self.batch.jobs if j is not None]
            jobs += [self.prefill.job] if self.prefill else []
            self.waiting.clear()
            self.prefill, self.batch = None, Running(self.model)
        for j in jobs:
            j.finish(f"error: {message}" if error else message)

    @torch.inference_mode()
    def step(self) -> None:
        self.drop_ended()
        self.admit()
        if self.batch.live():
            self.decode()
        self.drop_ended()
        self.shrink()

    # -------------------------------------------------------------------------------- the rows

    def drop_ended(self) -> None:
        """Free the row of every job that ended or was cancelled; end cancelled waiting jobs."""
        with self.wake:
            for r, j in enumerate(self.batch.jobs):
                if j is not None and (j.done or j.cancelled):
                    j.finish("cancelled")
                    self.batch.free(r)
            for j in [j for j in self.waiting if j.cancelled]:
                self.waiting.remove(j)
                j.finish("cancelled")
            if self.prefill is not None and self.prefill.job.cancelled:
                self.prefill.job.finish("cancelled")
                self.prefill = None

    def admit(self) -> None:
        """Prefill waiting prompts (up to `chunk` tokens while rows decode) and seat the ready ones."""
        budget = self.chunk if self.batch.live() else float("inf")
        while budget > 0:
            if self.prefill is None and not self.start_prefill():
                return
            p = self.prefill
            assert p is not None  # start_prefill set it
            n = int(min(p.left, budget))
            if n > 0:
                ids = torch.tensor([p.job.ids[p.done : p.done + n]], device=self.device)
                self.model.hidden(ids, caches=p.caches, start_pos=p.done)  # no head: nothing sampled
                p.done += n
                budget -= n
            if p.left == 0:
                self.seat(p)
                with self.wake:
                    self.prefill = None
            if budget == float("inf") and self.prefill is None and len(self.batch.live()) > 0:
                budget = self.chunk  # rows decode now: the next prompts go in by chunks

    def start_prefill(self) -> bool:
        """Take the next waiting job that can run, if a row can be found for it."""
        while True:
            with self.wake:
                if not self.waiting or len(self.batch.live()) >= self.max_batch:
                    return False
                job = self.taking = self.waiting.popleft()
            problem = self.refuse(job)
            if problem:
                job.finish(f"error: {problem}")
                with self.wake:
                    self.taking = None
                continue
            caches = self.model.new_caches(1, max(1, len(job.ids) - 1))  # a 1-token prompt: empty state
            with self.wake:
                self.prefill, self.taking = Prefill(job, caches), None
            return True

    def refuse(self, job: Job) -> str | None:
        """Why this job cannot run (the API checks it all first; this guards the batch)."""
        try:
            check_sampling(job.temperature, job.top_k, job.top_p)
        except LabError as e:
            return str(e)
        if not job.ids:
            return "the prompt is empty"
        if job.positions > self.max_len:
            return f"prompt and max_tokens need {job.positions + 1} positions; the model has {self.max_len}"
        return None

    def seat(self, p: Prefill) -> None:
        """Give a prefilled job a row, growing the batch's rows or positions if it must."""
        b = self.batch
        live = b.live()
        # Growing, make room for the jobs waiting too: they join within a few steps, and a bucket
        # passed through on the way costs a copy of the caches each.
        coming = len(live) + 1 + len(self.waiting)
        rows = b.rows if len(live) < b.rows else bucket(coming, 1, self.max_batch)
        need = max([p.job.positions] + [b.job(r).positions for r in live])
        length = max(b.length, bucket(need, MIN_LENGTH, self.max_len))
        if (rows, length) != (b.rows, b.length):
            b.resize(rows, length)
        row = b.jobs.index(None)
        b.join(p, row)

    def shrink(self) -> None:
        """Move the live rows into a smaller bucket when they fit one."""
        b = self.batch
        live = b.live()
        if not live:
            if b.caches is not None:
                self.batch = Running(self.model)  # idle: the caches' memory goes back
            return
        rows = bucket(len(live), 1, self.max_batch)
        length = bucket(max(b.job(r).positions for r in live), MIN_LENGTH, self.max_len)
        if rows < b.rows or length < b.length:
            b.resize(min(rows, b.rows), min(length, b.length))

    # ------------------------------------------------------------------------------ decoding

    def decode(self) -> None:
        b = self.batch
        live = b.live()
        tokens = torch.tensor(b.last, device=self.device)[:, None]
        start = torch.tensor(b.pos, device=self.device)
        assert b.caches is not None  # a batch with live rows has its caches
        logits = self.step_fn(tokens, start, b.caches)  # (rows, vocab)
        self.steps, self.rows = self.steps + 1, self.rows + len(live)
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        for r in live:
            if not finite[r]:
                b.job(r).finish("error: the model's output is not a number (NaN or inf) for this request")
        for r, token in self.sample(logits, [r for r in live if finite[r]]).items():
            b.pos[r] += 1
            b.last[r] = token
            b.job(r).take(token, self.eos_id)

    def sample(self, logits, rows: list[int]) -> dict[int, int]:
        """{row: token}: each row with its own settings. Rows without a seed that share their settings
        are drawn in one call; a seeded row draws from its own generator. A draw that fails ends its
        own rows' jobs only."""
        out: dict[int, int] = {}
        together: dict[tuple, list[int]] = {}
        for r in rows:
            j = self.batch.job(r)
            key = (j.temperature, j.top_k, j.top_p, id(j) if j.generator is not None else None)
            together.setdefault(key, []).append(r)
        for (temperature, top_k, top_p, _), same in together.items():
            try:
                drawn = sample(logits[same], temperature, top_k, top_p, self.batch.job(same[0]).generator)
            except Exception as e:  # noqa: BLE001 - a request's settings must not stop the batch
                log.exception("sampling failed")
                for r in same:
                    self.batch.job(r).finish(f"error: sampling failed ({type(e).__name__})")
                continue
            out.update(zip(same, drawn[:, 0].tolist()))
        return out
