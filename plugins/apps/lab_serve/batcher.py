"""Decoding many requests on one model at once: a worker thread per model, requests as rows of batches.

Each request's completion is a Job. The worker takes waiting jobs at a step boundary and starts
them together as the rows of one batch (a Group) with one set of caches: on CPU a decoding step is
bound by reading the weights, which the rows share, so 8 rows cost little more than 1. Every row of
a cache sits at the same position, so prompts of different lengths go in step: a row whose prompt
is longer than the group's shortest is fed its remaining prompt tokens one step at a time while the
others sample. Prompts far longer than the rest make a group of their own, and the worker steps
every group in turn. A job arriving while a group decodes starts in a new group at the next step
boundary (joining a group mid-way would need its cache rows filled: not done).

Generation runs here, off the server's event loop, which stays free to accept and stream. A job
whose client went away, or whose text hit a stop string, is marked done and gets no more tokens; its
row stays in the batch, unused, until the group's other rows finish.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from lab.inference.sampling import sample

log = logging.getLogger("lab_serve")


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


class Group:
    """Jobs decoded as the rows of one batch. Every row of a cache sits at the same position, so
    prompts of different lengths go in step: all are prefilled up to the shortest, then a row still
    inside its prompt is fed its next prompt token where the others are fed their last sample."""

    def __init__(self, model, jobs: list[Job], eos_id: int | None):
        self.model, self.jobs, self.eos_id = model, jobs, eos_id
        self.device = model.tok_emb.weight.device
        self.start = min(len(j.ids) for j in jobs)
        self.caches = None
        self.pos = 0  # tokens in the caches: the index of the token each row chooses next
        self.last = None  # (B, 1) the tokens fed next

    @property
    def finished(self) -> bool:
        return all(j.done for j in self.jobs)

    @torch.inference_mode()
    def step(self) -> None:
        for j in self.jobs:
            if j.cancelled:
                j.finish("cancelled")
        if self.finished:
            return
        if self.caches is None:  # prefill: every prompt's first `start` tokens in one pass
            size = max(len(j.ids) + j.max_tokens for j in self.jobs)
            self.caches = self.model.new_caches(len(self.jobs), size)
            prompt = torch.tensor([j.ids[: self.start] for j in self.jobs], device=self.device)
            logits, _ = self.model(prompt, caches=self.caches, start_pos=0, last_only=True)
        else:
            logits, _ = self.model(self.last, caches=self.caches, start_pos=self.pos, last_only=True)
        self.pos += self.start if self.pos == 0 else 1
        ready = [r for r, j in enumerate(self.jobs) if not j.done and self.pos >= len(j.ids)]
        tokens = [j.ids[self.pos] if self.pos < len(j.ids) else 0 for j in self.jobs]
        if ready:
            for r, t in zip(ready, self.sample(logits[:, -1, :], ready).tolist()):
                tokens[r] = t
                self.jobs[r].take(t, self.eos_id)
        self.last = torch.tensor(tokens, device=self.device)[:, None]

    def sample(self, logits, rows: list[int]) -> torch.Tensor:
        """(B, vocab) -> (len(rows),): each row with its own settings. Rows without a seed that
        share their settings are drawn in one call; a seeded row draws from its own generator."""
        out = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
        together: dict[tuple, list[int]] = {}
        for r in rows:
            j = self.jobs[r]
            key = (j.temperature, j.top_k, j.top_p, id(j) if j.generator is not None else None)
            together.setdefault(key, []).append(r)
        for (temperature, top_k, top_p, _), same in together.items():
            out[same] = sample(logits[same], temperature, top_k, top_p, self.jobs[same[0]].generator)[:, 0]
        return out[rows]

    def fail(self, message: str) -> None:
        for j in self.jobs:
            j.finish(f"error: {message}")


class Batcher:
    """The worker thread of one model."""

    def __init__(self, model, max_batch: int, eos_id: int | None, name: str = "model"):
        self.model, self.max_batch, self.eos_id = model, max(1, max_batch), eos_id
        self.waiting: deque[Job] = deque()
        self.groups: list[Group] = []
        self.wake = threading.Condition()
        self.closed = False
        self.steps = 0  # decoding steps run, and rows they carried: rows / steps is the mean batch
        self.rows = 0
        self.thread = threading.Thread(target=self.run, name=f"lab-serve {name}", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        for j in jobs:
            if j.seed is not None:
                j.generator = torch.Generator(device=self.model.tok_emb.weight.device).manual_seed(j.seed)
        with self.wake:
            self.waiting.extend(jobs)
            self.wake.notify()

    def in_flight(self) -> int:
        """Jobs waiting or decoding."""
        with self.wake:
            return len(self.waiting) + sum(1 for g in self.groups for j in g.jobs if not j.done)

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        for j in list(self.waiting) + [j for g in self.groups for j in g.jobs]:
            j.cancel()

    def run(self) -> None:
        while True:
            with self.wake:
                while not (self.waiting or self.groups or self.closed):
                    self.wake.wait()
                if self.closed:
                    break
                new = list(self.waiting)
                self.waiting.clear()
                self.groups += form_groups(self.model, new, self.max_batch, self.eos_id)
                groups = list(self.groups)
            for g in groups:  # one step of every group in turn
                try:
                    live = sum(not j.done for j in g.jobs)
                    g.step()
                    self.steps, self.rows = self.steps + 1, self.rows + live
                except Exception as e:  # a bug must end its requests, not the worker
                    log.exception("generation failed")
                    g.fail(type(e).__name__)
            with self.wake:
                self.groups = [g for g in self.groups if not g.finished]
        for j in [j for g in self.groups for j in g.jobs] + list(self.waiting):
            j.finish("cancelled")


def form_groups(model, jobs: list[Job], max_batch: int, eos_id, slack: int = 32) -> list[Group]:
    """Up to max_batch jobs a group, whose prompt lengths differ by at most `slack` tokens: a row
    longer than the shortest feeds its extra prompt tokens one step at a time, which delays its
    first token by as many steps, so far longer prompts get a group of their own."""
    groups, current = [], []
    for j in sorted(jobs, key=lambda j: len(j.ids)):  # sorted() is stable: arrival order within a length
        if current and (len(current) == max_batch or len(j.ids) - len(current[0].ids) > slack):
            groups.append(Group(model, current, eos_id))
            current = []
        current.append(j)
    return groups + ([Group(model, current, eos_id)] if current else [])
