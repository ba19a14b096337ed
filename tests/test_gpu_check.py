"""benchmarks/gpu_check.py never passes on a machine that could not run it."""

import importlib.util
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_fails_and_says_cuda_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load().main([]) == 1
    err = capsys.readouterr().err
    assert "CUDA is missing" in err and "Nothing was checked" in err


def test_a_failed_row_fails_the_run(monkeypatch, capsys):
    gpu_check = load()
    monkeypatch.setitem(
        gpu_check.CHECKS,
        "conformance",
        lambda device, shapes, args: [gpu_check.Row("conformance", False, "broken on purpose")],
    )
    assert gpu_check.main(["--device", "cpu", "--only", "conformance"]) == 1
    assert "| conformance | FAIL | broken on purpose |" in capsys.readouterr().out
