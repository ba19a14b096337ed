"""`lab compare`: one row per run with what differs in their recipes and what each reached, a figure on
the axis asked for, runs in progress as they stand, and one message (exit 2) for a folder that is not a run."""

import json
import math
import shutil

import numpy as np
import pytest
from test_train import tiny_recipe

from lab.commands.cli import main
from lab.runs.metrics import read_metrics
from lab_compare import stats
from lab_compare.compare import run_table
from lab_compare.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs of different recipes: another lr and another MLP."""
    folder = tmp_path_factory.mktemp("compare")
    recipe = tiny_recipe(folder)
    assert main(["run", recipe, "--set", f"train.out_dir={folder / 'base'}"]) == 0
    assert (
        main(
            [
                "run",
                recipe,
                "--set",
                f"train.out_dir={folder / 'swiglu'}",
                "--set",
                "optimizer.lr=1e-2",
                "--set",
                "model.mlp.name=swiglu",
            ]
        )
        == 0
    )
    return folder


def test_the_table_shows_only_the_settings_that_differ(two_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(two_runs / "base"), str(two_runs / "swiglu")]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith("| run | model.mlp.name | ")
    assert (
        "| optimizer.lr | status | params | tokens | wall s | tokens/s | MFU | first val | final val "
        "| best val | val_bpb |"
    ) in header  # val_bpb: a number the records carry beyond the usual
    # the same in both (batch_size), never a difference (out_dir), or implied by the MLP's name (gelu's approximate)
    assert "batch_size" not in out and "out_dir" not in out and "approximate" not in out
    assert "| 0.003 | done |" in out and "| 0.01 | done |" in out and "| swiglu |" in out
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG and "figure: compare.png" in out


def test_the_json_table_holds_what_each_run_reached(two_runs, tmp_path, capsys):
    assert (
        main(
            [
                "compare",
                str(two_runs / "base"),
                str(two_runs / "swiglu"),
                "--json",
                "-o",
                str(tmp_path / "c.png"),
                "--x",
                "flops",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    records = read_metrics(two_runs / "base" / "metrics.jsonl")
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    base = rows[0]
    assert base["tokens"] == 8 * 4 * 32 and base["status"] == "done"
    assert (base["first_val_loss"], base["final_val_loss"], base["best_val_loss"]) == (
        vals[0],
        vals[-1],
        min(vals),
    )
    assert base["seconds"] == records[-1]["elapsed"] > 0
    assert base["params"] > 0 and rows[1]["params"] > base["params"]  # swiglu's third matrix
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("axis", ["steps", "tokens", "seconds", "flops"])
def test_every_axis_places_every_record(two_runs, axis):
    run = Run.read(two_runs / "base")
    xs = [run.x(r, axis) for r in run.records if "loss" in r]
    assert all(x is not None for x in xs) and xs == sorted(xs)
    if axis == "flops":
        assert xs[-1] == pytest.approx(8 * 4 * 32 * run.flops_per_token)


def test_a_run_in_progress_is_shown_as_it_stands_with_its_extra_numbers(two_runs, tmp_path):
    """A run stopped at step 4 of 8, whose records carry an extra loss term and bits per byte."""
    run = tmp_path / "halfway"
    shutil.copytree(two_runs / "base", run)
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["step"] <= 4]
    for r in records:
        if "loss" in r:
            r["aux_loss"] = 0.01 * r["step"]
        if "val_loss" in r:
            r["val_bpb"] = r["val_loss"] / 3
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    row = run_table([Run.read(run), Run.read(two_runs / "base")])[0]
    assert row["status"] == "at step 4/8" and row["tokens"] == 4 * 4 * 32
    assert row["final_val_loss"] == records[-1]["val_loss"]
    assert row["aux_loss"] == pytest.approx(0.04) and row["val_bpb"] == pytest.approx(
        records[-1]["val_loss"] / 3
    )


def test_a_folder_that_is_not_a_run(two_runs, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    assert main(["compare", str(tmp_path / "notes"), str(two_runs / "base")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: {tmp_path / 'notes'} is not a run folder (no metrics.jsonl or checkpoints)"
    )
    assert "Traceback" not in err and (tmp_path / "notes" / "a.txt").read_text() == "mine"
    assert not (tmp_path / "compare.png").exists()

    assert main(["compare", str(two_runs)]) == 2  # a folder of runs: name them
    assert (
        f"It holds run folders: lab compare {two_runs / 'base'} {two_runs / 'swiglu'}"
        in capsys.readouterr().err
    )
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def welch_reference(a, b):
    """Welch's t and Welch-Satterthwaite degrees of freedom in float64, and the two-sided p-value from
    the Student t density integrated numerically (no scipy)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    x = np.linspace(abs(t), abs(t) + 2000, 2_000_001)
    density = (
        math.gamma((df + 1) / 2)
        / (math.sqrt(df * math.pi) * math.gamma(df / 2))
        * (1 + x**2 / df) ** (-(df + 1) / 2)
    )
    return 2 * np.trapezoid(density, x)


@pytest.mark.parametrize(
    "a, b", [([3.1, 3.3, 3.2], [3.0, 3.05, 2.9]), ([1.0, 2.0, 3.0, 4.0], [2.5, 6.0, 9.0])]
)
def test_welch_p_matches_the_formula(a, b):
    assert stats.welch_p(a, b) == pytest.approx(welch_reference(a, b), rel=1e-4)
    assert math.isnan(stats.welch_p(a, [3.0]))  # one seed: no spread to test against
    mean, std = stats.mean_std(a)
    assert (mean, std) == pytest.approx((np.mean(a), np.std(a, ddof=1)))
