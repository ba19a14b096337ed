"""The cached decoding step, eager or through torch.compile.

A step of a small model on CPU is ~120 small ops, and PyTorch's per-op dispatch, not the matmuls,
is most of its time at batch 1. torch.compile (Inductor) turns the step into a few generated C++
kernels. It compiles for fixed shapes (`dynamic=False`): the rows of the batch and the length of
the caches, which callers keep to a few buckets (lab serve: powers of two), so each (model, bucket)
compiles once. Compiled code is cached on disk by PyTorch's own caches (Inductor's FX graph cache
and AOTAutograd's cache, in $TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_$USER): a second
process, or a restarted server, skips most of the compile.

The step takes per-row positions, a LongTensor start (rows,), never a Python int: an int would be
compiled in as a constant and recompile every token.
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
import time
from typing import Callable

import torch

log = logging.getLogger("lab")


def compile_cache_dir() -> str:
    """Where PyTorch keeps compiled kernels across processes: $TORCHINDUCTOR_CACHE_DIR, by default
    /tmp/torchinductor_$USER."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


class DecodeStep:
    """step(tokens (rows, 1), start (rows,), caches) -> logits (rows, vocab) of each row's token,
    each row at its own position. compile=True runs it through torch.compile, one compile per shape,
    reported through `report` (stderr by default) with how long it took.

    background=True (a server) never makes a caller wait for a compile: a shape that has run
    `compile_after` eager steps (so not one a batch only passes through while it grows) is compiled
    in a thread of its own, on a copy of the caches, one shape at a time; until it is done its steps
    run eagerly (the same tokens, a little slower). `prepare(rows, length)` starts one at once.

    A compiled step is used where it is right and faster: once compiled, each shape's step is checked
    against the eager step on the same positions (its logits), and timed against it (a few calls of
    each, interleaved); a shape whose compiled step is no faster on this machine decodes eagerly, and
    the report says so with both times (seen on an AMD EPYC Zen 4: Inductor's step slower than eager).

    torch.compile is not thread-safe (pytorch/pytorch#118260, #136833): a compiled function must not
    run in one thread while dynamo compiles in another. So every call into it holds `running`; a step
    that finds it held (a compile is under way) runs eagerly instead of waiting minutes for it."""

    def __init__(
        self,
        model,
        compile: bool = False,
        background: bool = False,
        compile_after: int = 32,
        report: Callable[[str], None] | None = None,
    ):
        self.model, self.background, self.compile_after = model, background, compile_after
        self.eager_steps: dict[tuple, int] = {}
        self.report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self.compiled = None
        self.ready: set[tuple] = set()  # the shapes compiled so far
        self.slower: set[tuple] = set()  # and those whose compiled step was no faster than eager
        self.started: set[tuple] = set()  # and those being compiled (background)
        self.lock = threading.Lock()  # guards the sets, the queue and the worker
        self.running = threading.Lock()  # held by whoever is inside the compiled function
        self.queue: list[tuple] = []  # buckets waiting to compile (background)
        self.worker: threading.Thread | None = None
        self.compile_seconds = 0.0
        if compile:
            # One entry per bucket: rows x cache lengths can pass dynamo's default of 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.compiled = torch.compile(self._eager, dynamic=False)

    def _eager(self, tokens, start, caches):
        return self.model(tokens, caches=caches, start_pos=start, last_only=True)[0][:, -1]

    def __call__(self, tokens: torch.Tensor, start: torch.Tensor, caches: list) -> torch.Tensor:
        tokens = tokens.contiguous()  # a column cut from a longer sequence: its stride would recompile
        shape = (tokens.size(0), *_cache_shape(caches))
        if self.compiled is None:
            return self._eager(tokens, start, caches)
        if self.background and shape not in self.ready:
            self.eager_steps[shape] = self.eager_steps.get(shape, 0) + 1
            if self.eager_steps[shape] == self.compile_after:  # it lasts: worth compiling
                self._enqueue(tokens.clone(), start.clone(), copy.deepcopy(caches), shape)
            return self._eager(tokens, start, caches)
        if shape in self.ready:
            if self.compiled is None or shape in self.slower or not self.running.acquire(blocking=False):
                return self._eager(tokens, start, caches)  # it disagreed, is slower, or another compiles
            try:
                return self.compiled(tokens, start, caches)
            finally:
                self.running.release()
        return self._compile(tokens, start, caches, shape)

    def prepare(self, rows: int, length: int) -> None:
        """Start compiling the step for `rows` rows of caches of `length` positions, in the
        background; a no-op when eager, or when that bucket is compiled or compiling."""
        if self.compiled is None or not self.background:
            return
        device = self.model.tok_emb.weight.device
        with torch.inference_mode():
            caches = self.model.new_caches(rows, length)
        tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        start = torch.zeros(rows, dtype=torch.long, device=device)
        self._enqueue(tokens, start, caches, (rows, *_cache_shape(caches)))

    def _enqueue(self, tokens, start, caches, shape) -> None:
        with self.lock:
            if shape in self.started:
                return
            self.started.add(shape)
            self.queue.append((tokens, start, caches, shape))
            if self.worker is None or not self.worker.is_alive():
                self.worker = threading.Thread(target=self._compile_queued, name="lab compile", daemon=True)
                self.worker.start()

    def _compile_queued(self) -> None:
        """One bucket at a time, the newest first (what the batch is now), in one thread: compiles
        share the CPU with decoding, so never more than one runs."""
        while True:
            with self.lock:
                if not self.queue:
                    self.worker = None
                    return
                item = self.queue.pop()
            try:
                self._compile(*item)
            except Exception:  # the bucket stays eager; the server goes on
                log.exception("compiling the decoding step failed; it runs eagerly")

    @torch.inference_mode()
    def _compile(self, tokens, start, caches, shape) -> torch.Tensor:
        if self.compiled is None:  # an earlier shape's compiled step disagreed: none is used
            with self.lock:
                self.ready.add(shape)
            return self._eager(tokens, start, caches)
        with self.running:
            began = time.perf_counter()
            logits = self.compiled(tokens, start, caches)
            seconds = time.perf_counter() - began
        # The same step eagerly, over the same cache positions: a compiled step that disagrees (seen
        # with ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS capping the CPU's ISA) is not used.
        eager = self._eager(tokens, start, caches)
        off = float((logits.float() - eager.float()).abs().max())
        scale = float(eager.float().abs().max())
        with self.lock:
            self.ready.add(shape)
            self.compile_seconds += seconds
            if not off <= 1e-3 * scale + 1e-4:
                self.compiled = None
        if self.compiled is None:
            self.report(
                f"the compiled decoding step gives other logits than the eager one on this machine "
                f"(max difference {off:.3g} on a scale of {scale:.3g}); decoding eagerly"
            )
            return eager
        compiled_s, eager_s = self._time(tokens, start, caches)
        faster = compiled_s < eager_s
        with self.lock:
            if not faster:
                self.slower.add(shape)
        self.report(
            f"compiled the decoding step for {tokens.size(0)} row(s), caches {_cache_shape(caches)}, "
            f"in {seconds:.1f} s (cached in {compile_cache_dir()}); a step takes {compiled_s * 1e3:.1f} ms "
            f"compiled, {eager_s * 1e3:.1f} ms eager: "
            + (
                "decoding compiled"
                if faster
                else "this shape decodes eagerly (the compiled step is no faster)"
            )
        )
        return logits

    def _time(self, tokens, start, caches, rounds: int = 5) -> tuple[float, float]:
        """Median seconds of a compiled and an eager step on these inputs, calls interleaved so that
        the machine's load falls on both alike. Each call writes the same keys at the same positions."""
        assert self.compiled is not None  # only a compiled step is timed
        compiled, eager = [], []
        for _ in range(rounds):
            with self.running:
                began = time.perf_counter()
                self.compiled(tokens, start, caches)
                compiled.append(time.perf_counter() - began)
            began = time.perf_counter()
            self._eager(tokens, start, caches)
            eager.append(time.perf_counter() - began)
        return sorted(compiled)[rounds // 2], sorted(eager)[rounds // 2]


def _cache_shape(caches: list) -> tuple:
    """The shape of the first tensor of the first cache: what a bucket changes (rows, length)."""
    for value in vars(caches[0]).values():
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
    return ()
