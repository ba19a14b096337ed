"""lab serve's running batch (lab_serve/batcher.py): requests of any prompt length join at the step
after their prefill and leave when done, each with the greedy tokens it gets alone; prefill by
chunks while rows stream; a cancelled row freed at once; a failing request fails alone."""

import threading
import time

import pytest
import torch
from serving import make_run

import lab.runs
from lab.inference.compiled import DecodeStep
from lab.inference.sampling import generate
from lab_serve.batcher import Batcher, Job

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_run(tmp_path_factory.mktemp("batching") / "run")
    _, model, _ = lab.runs.load(folder, "cpu")
    return model.eval()


def alone(model, ids, n):
    return generate(model, torch.tensor([ids]), n, temperature=0)[0, len(ids) :].tolist()


class Recorder:
    """Jobs whose tokens, the batcher step each came at, and end reasons are kept."""

    def __init__(self, batcher):
        self.batcher = batcher
        self.tokens, self.steps, self.ends = {}, {}, {}
        self.lock = threading.Condition()
        self.paused, self.go = threading.Event(), threading.Event()

    def job(self, name, ids, n, pause_after=None, **settings):
        """pause_after k: the worker waits after this job's k-th token until `resume()`, so what the
        test submits then arrives at a known step."""
        self.tokens[name], self.steps[name] = [], []

        def on_token(t):
            self.tokens[name].append(t)
            self.steps[name].append(self.batcher.steps)
            if len(self.tokens[name]) == pause_after:
                self.paused.set()
                self.go.wait(30)
            return True

        def on_end(reason):
            with self.lock:
                self.ends[name] = reason
                self.lock.notify_all()

        return Job(ids, n, on_token, on_end, **{"temperature": 0, **settings})

    def wait(self, *names, timeout=60):
        with self.lock:
            assert self.lock.wait_for(lambda: all(n in self.ends for n in names), timeout), self.ends

    def pause(self):
        assert self.paused.wait(30)

    def resume(self):
        self.go.set()

    def wait_tokens(self, name, count, timeout=60):
        with self.lock:
            assert self.lock.wait_for(lambda: len(self.tokens[name]) >= count or name in self.ends, timeout)


def test_requests_of_any_length_join_a_running_batch_and_decode_as_alone(model):
    """A long request decodes; others of three different prompt lengths arrive mid-way, join it (the
    batch grows from 1 to 4 rows), finish at different times (it shrinks): every one gets what it
    gets alone, and the steps are shared."""
    batcher = Batcher(model, max_batch=8, eos_id=None)
    rec = Recorder(batcher)
    first = [5, 6, 7]
    later = {"b": [11] * 9, "c": [3], "d": list(range(20, 35))}
    try:
        batcher.submit([rec.job("a", first, 24, pause_after=4)])
        rec.pause()
        batcher.submit([rec.job(name, ids, 6 + len(ids) % 5) for name, ids in later.items()])
        rec.resume()
        rec.wait("a", *later)
    finally:
        batcher.close()
    assert set(rec.ends.values()) == {"length"}
    assert rec.tokens["a"] == alone(model, first, 24)
    for name, ids in later.items():
        assert rec.tokens[name] == alone(model, ids, 6 + len(ids) % 5), name
        # after its prefill it joined: its tokens came in consecutive steps, all while "a" decoded
        assert rec.steps[name] == list(range(rec.steps[name][0], rec.steps[name][0] + len(rec.steps[name])))
        assert rec.steps[name][-1] <= rec.steps["a"][-1]
    assert batcher.rows / batcher.steps > 1.5  # rows shared steps


def test_a_long_prompt_goes_in_by_chunks_while_rows_keep_streaming(model):
    batcher = Batcher(model, max_batch=4, eos_id=None, chunk=4)
    rec = Recorder(batcher)
    long = list(range(100, 140))  # 39 tokens to prefill: 10 chunks of 4
    try:
        batcher.submit([rec.job("running", [1, 2], 30, pause_after=2)])
        rec.pause()
        batcher.submit([rec.job("long", long, 3)])
        rec.resume()
        rec.wait("running", "long")
    finally:
        batcher.close()
    joined = rec.steps["long"][0]
    during = [s for s in rec.steps["running"] if joined - 10 <= s < joined]
    assert len(during) == 10  # the running row got a token at every step of the long prefill
    assert rec.tokens["long"] == alone(model, long, 3)
    assert rec.tokens["running"] == alone(model, [1, 2], 30)


def test_a_cancelled_request_frees_its_row_for_the_next(model):
    """One row (max_batch 1): the second request waits until the first is cancelled, then gets the
    row at the next step, and decodes as alone."""
    batcher = Batcher(model, max_batch=1, eos_id=None)
    rec = Recorder(batcher)
    try:
        first = rec.job("first", [4, 5], 60, pause_after=3)
        batcher.submit([first, rec.job("second", [8, 9, 10], 5)])
        rec.pause()
        assert rec.tokens["second"] == []  # no row for it yet
        first.cancel()
        rec.resume()
        rec.wait("first", "second")
    finally:
        batcher.close()
    assert rec.ends == {"first": "cancelled", "second": "length"}
    assert len(rec.tokens["first"]) < 60
    assert rec.steps["second"][0] == rec.steps["first"][-1] + 1  # its row at the very next step
    assert rec.tokens["second"] == alone(model, [8, 9, 10], 5)


def test_a_request_that_fails_fails_alone(model):
    """A row whose logits are NaN, and a request with sampling settings the sampler refuses, end
    with an error; the batch goes on and the others get what they get alone."""
    batcher = Batcher(model, max_batch=4, eos_id=None)
    rec = Recorder(batcher)
    eager = batcher.step_fn._eager
    poisoned = rec.job("nan", [7, 7, 7, 7], 10)

    def step(tokens, start, caches):
        logits = eager(tokens, start, caches)
        for r, j in enumerate(batcher.batch.jobs):
            if j is poisoned:
                logits[r] = float("nan")
        return logits

    batcher.step_fn._eager = step
    try:
        batcher.submit(
            [
                rec.job("ok", [1, 2, 3], 8),
                poisoned,
                rec.job("bad settings", [5], 8, temperature=-1.0),
                rec.job("also ok", [9], 8, temperature=0.7, seed=3),
            ]
        )
        rec.wait("ok", "nan", "bad settings", "also ok")
    finally:
        batcher.close()
    assert rec.ends["nan"].startswith("error: the model's output is not a number")
    assert rec.ends["bad settings"].startswith("error: temperature must be >= 0")
    assert rec.ends["ok"] == rec.ends["also ok"] == "length"
    assert rec.tokens["ok"] == alone(model, [1, 2, 3], 8)
    assert len(rec.tokens["also ok"]) == 8


def test_an_idle_batcher_lets_its_caches_go(model):
    batcher = Batcher(model, max_batch=4, eos_id=None)
    rec = Recorder(batcher)
    try:
        batcher.submit([rec.job("x", [1, 2], 3)])
        rec.wait("x")
        batcher.submit([])  # wake it once more
        for _ in range(100):
            if batcher.batch.caches is None:
                break
            threading.Event().wait(0.02)
        assert batcher.batch.caches is None and batcher.in_flight() == 0
    finally:
        batcher.close()


# torch.compile on CPU takes tens of seconds; the eager batching tests cover the same tokens
@pytest.mark.slow
def test_the_compiled_step_decodes_the_eager_tokens(model):
    """lab serve's default: the bucket compiles in the background (eager meanwhile); once compiled,
    a request decoded through it gets the eager tokens. One compile: one row, 64 positions."""
    batcher = Batcher(model, max_batch=1, eos_id=None, compile=True, compile_after=3)
    rec = Recorder(batcher)
    try:
        batcher.submit([rec.job("while compiling", [1, 2, 3], 5)])
        rec.wait("while compiling")
        for _ in range(1200):
            if batcher.step_fn.ready:
                break
            threading.Event().wait(0.1)
        assert batcher.step_fn.ready, "the background compile did not finish in 120 s"
        calls: list[int] = []
        compiled = batcher.step_fn.compiled  # None: it disagreed with the eager step and is not used
        if batcher.step_fn.slower:  # no faster than eager on this machine: not used either
            compiled = None
        if compiled is not None:
            batcher.step_fn.compiled = lambda *a: calls.append(1) or compiled(*a)
        batcher.submit([rec.job("compiled", [1, 2, 3], 5)])
        rec.wait("compiled")
    finally:
        batcher.close()
    assert len(calls) == (5 if compiled is not None else 0)
    assert rec.tokens["compiled"] == rec.tokens["while compiling"] == alone(model, [1, 2, 3], 5)


def test_a_step_never_runs_the_compiled_function_while_another_shape_compiles(model):
    """torch.compile is not thread-safe: while the background thread compiles one bucket, a step of
    an already compiled bucket runs eagerly rather than inside the compiled function at the same time
    (a stand-in for the compiled function counts the threads inside it)."""
    step = DecodeStep(model, compile=True, background=True)
    inside, most, by_thread = [0], [0], {"lab compile": 0, "MainThread": 0}
    guard, compiling = threading.Lock(), threading.Event()

    def compiled(tokens, start, caches):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        by_thread[threading.current_thread().name] += 1
        if threading.current_thread().name == "lab compile":
            compiling.set()
            time.sleep(0.6)  # a compile takes a while
        try:
            return step._eager(tokens, start, caches)
        finally:
            with guard:
                inside[0] -= 1
            compiling.clear()

    step.compiled = compiled
    step._time = lambda *inputs: (0.001, 0.002)  # the compiled step is the faster one here
    with torch.inference_mode():
        step.prepare(1, 64)
        wait_until(lambda: len(step.ready) == 1)
        caches = model.new_caches(1, 64)
        tokens, start = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        step.prepare(2, 64)  # compiles in the background for 0.6 s
        wait_until(compiling.is_set)
        while compiling.is_set():
            step(tokens, start, caches)  # the compiled 1-row bucket, meanwhile
        wait_until(lambda: len(step.ready) == 2)
        assert most[0] == 1 and by_thread["MainThread"] == 0
        step(tokens, start, caches)
    assert by_thread["MainThread"] == 1  # the compile done, the compiled step runs again


def wait_until(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("faster", [True, False])
def test_a_compiled_step_is_used_only_where_it_is_faster_than_eager(model, faster):
    """Compiled code is not always faster on a CPU: each shape's compiled step is timed against the
    eager one once it is compiled, and a shape whose compiled step is slower decodes eagerly (the
    report says so). A stand-in compiled function, instant or 30 ms slower than eager, gives the
    eager step's logits."""
    reports: list[str] = []
    step = DecodeStep(model, compile=True, report=reports.append)
    caches = model.new_caches(1, 64)
    tokens, start = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        logits = step._eager(tokens, start, caches)
    calls = []

    def compiled(*inputs):
        calls.append(1)
        if not faster:
            time.sleep(0.03)
        return logits

    step.compiled = compiled
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(step(tokens, start, caches), logits)
    timed = 1 + 5  # the compile's call, then five timed ones
    assert len(calls) == (timed + 2 if faster else timed)  # the two later steps: compiled or eager
    assert ("decoding compiled" if faster else "this shape decodes eagerly") in reports[-1]
    assert "ms compiled" in reports[-1] and "ms eager" in reports[-1]
