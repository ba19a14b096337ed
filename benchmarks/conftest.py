"""Options, fixtures and the end-of-run summary of lab's benchmarks.

    pytest benchmarks/                      # CPU shapes: a few minutes on two cores
    pytest benchmarks/ --lab-size=gpu       # GPU shapes

Each test sets benchmark.group (one shape), and in benchmark.extra_info its "variant" and its group's
"reference". When the run ends every benchmark gets its ratio to that reference (before
pytest-benchmark writes --benchmark-json / --benchmark-save, so the files hold it too), and the
summary is printed side by side.
"""

import functools
import gc
import math
import time

import pytest
import torch

from benchmarks import machine
from benchmarks.report import add_ratios, summary_lines
from lab.engine.peak import device_peak


def pytest_addoption(parser):
    parser.addoption(
        "--lab-size",
        choices=sorted(machine.SIZES),
        default="cpu",
        help="shapes to benchmark: cpu (small, the default) or gpu (GPT-2 small and longer sequences)",
    )


def pytest_configure(config):
    if config.getoption("lab_size") == "gpu" and not torch.cuda.is_available():
        raise pytest.UsageError("--lab-size=gpu picks shapes for a GPU, but torch sees no CUDA device")


@pytest.fixture(scope="session")
def size(pytestconfig) -> machine.Size:
    return machine.SIZES[pytestconfig.getoption("lab_size")]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return machine.device()


@pytest.fixture(scope="session")
def peak(device):
    """peak(dtype) -> lab.engine.peak.Peak, MFU's denominator, as `lab run` logs it: the datasheet's on a
    known GPU, else a large matmul, timed once per run and dtype."""
    return functools.cache(lambda dtype: device_peak(device, dtype))


@pytest.fixture
def timed(benchmark, device, pytestconfig):
    """timed(fn) -> (fn's result, mean seconds per call; None under --benchmark-disable).

    One untimed warm-up call first (allocation, lazy initialisation, kernel choice, compilation),
    then as many timed calls as fill --benchmark-max-time, at least --benchmark-min-rounds. Every
    call here is long enough to time on its own, and waits for the GPU before the clock stops."""
    # float/int: an option left at its default is still pytest-benchmark's default string.
    max_time = float(pytestconfig.getoption("benchmark_max_time"))
    min_rounds = int(pytestconfig.getoption("benchmark_min_rounds"))

    def run(fn):
        fn = machine.synchronized(fn, device)
        if benchmark.disabled:  # pytest-benchmark then just calls it once
            return benchmark.pedantic(fn), None
        started = time.perf_counter()
        fn()
        rounds = max(min_rounds, math.ceil(max_time / (time.perf_counter() - started)))
        result = benchmark.pedantic(fn, rounds=rounds)  # the result of the last round
        return result, benchmark.stats.stats.mean

    return run


@pytest.fixture(autouse=True)
def _release_gpu_memory(device):
    """Each benchmark starts with the GPU memory the previous one left cached given back."""
    yield
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _measured(config) -> list[dict]:
    session = getattr(config, "_benchmarksession", None)  # pytest-benchmark's: every benchmark run
    if session is None:
        return []
    return [b.as_dict(include_data=False) for b in session.benchmarks if b and not b.has_error]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    # as_dict shares each benchmark's extra_info, so the ratios land where the JSON is made from.
    add_ratios(_measured(session.config))
    yield


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    benchmarks = _measured(config)
    if benchmarks:
        terminalreporter.section(
            "lab benchmarks: time/ref = time per call (generation: per token) "
            "over the group's reference's; below 1 is faster"
        )
        for line in summary_lines(benchmarks):
            terminalreporter.write_line(line)
