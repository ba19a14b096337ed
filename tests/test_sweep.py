"""`lab sweep`: a grid x seeds of ordinary run folders, trained J at a time, skipped when finished,
resumed when interrupted (Ctrl-C included), summarized per variant; past one machine a SLURM job array
or one command per run; and every mistake in the grid one message, exit 2, nothing touched."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tiny import counting_tokens, tiny_recipe

from lab.commands.cli import build_parser, main
from lab.runs.metrics import read_metrics
from lab_compare import sweep

RECIPE = tiny_recipe(
    "tiny",
    """
[schedule]
name = "cosine"
warmup_steps = 1

[train]
batch_size = 4
precision = "fp32"
max_steps = {steps}
eval_interval = 2
eval_batches = 1
log_interval = 2
checkpoint_interval = 2
device = "cpu"

[generate]
num_samples = 1
max_new_tokens = 2
""",
    data="data",
)

GRID = ["--vary", "optimizer.lr=3e-3,1e-2", "--seeds", "2", "--out", "sw"]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A folder with token files and tiny.toml (4 steps) in it, the current folder, as a user works."""
    counting_tokens(tmp_path / "data")
    (tmp_path / "tiny.toml").write_text(RECIPE.format(steps=4))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path


def snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def lab(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lab", *args], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@pytest.mark.slow  # a sweep's runs as subprocesses
def test_a_sweep_trains_every_cell_summarizes_and_skips_them_when_run_again(folder, capsys):
    assert main(["sweep", "tiny.toml", *GRID, "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 variant(s) x 2 seed(s) = 4 runs; 0 finished already, 4 to run, 2 at a time" in out
    cells = [
        "sw/optimizer.lr=3e-3/seed-1337",
        "sw/optimizer.lr=3e-3/seed-1338",
        "sw/optimizer.lr=1e-2/seed-1337",
        "sw/optimizer.lr=1e-2/seed-1338",
    ]
    for cell in cells:  # ordinary run folders, each with its seed and lr
        assert (folder / cell / "generated.txt").exists()
        recipe = (folder / cell / "recipe.toml").read_text()
        assert f"seed = {cell[-4:]}" in recipe and f'out_dir = "{cell}"' in recipe
    assert read_metrics(folder / cells[0] / "metrics.jsonl") != read_metrics(
        folder / cells[1] / "metrics.jsonl"
    )

    summary = json.loads((folder / "sw" / "summary.json").read_text())
    base, other = summary["variants"]
    finals = [read_metrics(folder / c / "metrics.jsonl")[-1]["val_loss"] for c in cells]
    assert base["variant"] == "optimizer.lr=3e-3" and base["baseline"] and base["seeds_done"] == 2
    assert base["final_val_loss_mean"] == pytest.approx(np.mean(finals[:2]))
    assert base["final_val_loss_std"] == pytest.approx(np.std(finals[:2], ddof=1))
    assert other["diff_vs_baseline"] == pytest.approx(np.mean(finals[2:]) - np.mean(finals[:2]))
    assert 0 <= other["p_welch"] <= 1 and {base["rank"], other["rank"]} == {1, 2}
    assert "| rank | variant | seeds | final val loss (mean ± std) | vs baseline | p (Welch) |" in out
    assert (folder / "sw" / "summary.md").read_text().strip() in out
    assert (folder / "sw" / "summary.png").read_bytes()[:4] == b"\x89PNG"

    before = snapshot(folder / "sw" / cells[0])
    assert main(["sweep", "tiny.toml", *GRID, "--jobs", "2"]) == 0  # again: nothing to train
    assert "4 finished already, 0 to run" in capsys.readouterr().out
    assert snapshot(folder / "sw" / cells[0]) == before

    assert main(["compare", "sw", "--json"]) == 0  # the same summary, from the folder alone
    assert json.loads(capsys.readouterr().out)["variants"] == summary["variants"]


@pytest.mark.slow  # a sweep's subprocesses stopped and continued
def test_ctrl_c_stops_the_runs_with_a_checkpoint_and_the_same_command_finishes_them(folder):
    (folder / "tiny.toml").write_text(RECIPE.format(steps=60))  # long enough to be stopped midway
    command = [
        "sweep",
        "tiny.toml",
        "--vary",
        "optimizer.lr=3e-3",
        "--out",
        "sw",
        "--set",
        "train.eval_interval=30",
    ]
    run = folder / "sw/optimizer.lr=3e-3/seed-1337"
    proc = lab(*command)
    deadline = time.monotonic() + 120
    while (
        time.monotonic() < deadline
        and proc.poll() is None
        and not any(r["step"] >= 2 and "loss" in r for r in read_metrics(run / "metrics.jsonl"))
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # as Ctrl-C at the terminal: to the sweep, which hands it to its runs
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "SIGINT: the runs in progress save a checkpoint and stop" in err
    assert "stopped, checkpoint saved" in out and "Continue with the same command" in out
    assert list((run / "checkpoints").iterdir()) and not (run / "generated.txt").exists()
    stopped = max(r["step"] for r in read_metrics(run / "metrics.jsonl"))
    assert 2 <= stopped < 60

    proc = lab(*command)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert f"resuming from step {stopped}" in (folder / "sw/logs/optimizer.lr=3e-3/seed-1337.log").read_text()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == list(range(1, 61))
    assert "| 1 | optimizer.lr=3e-3 (baseline) | 1 |" in out


def test_dry_run_prints_one_command_per_run_for_any_queue(folder, capsys):
    assert main(["sweep", "tiny.toml", *GRID, "--set", "train.log_interval=1", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert lines[3] == (
        "lab run tiny.toml --set train.log_interval=1 --set optimizer.lr=1e-2 --set train.seed=1338 "
        "--set train.out_dir=sw/optimizer.lr=1e-2/seed-1338"
    )
    args = build_parser().parse_args(shlex.split(lines[0])[1:])
    assert args.command == "run" and args.overrides[-1] == "train.out_dir=sw/optimizer.lr=3e-3/seed-1337"
    assert not any(p.is_dir() for p in (folder / "sw").iterdir())  # the grid is written, no run started


@pytest.fixture
def fake_slurm(folder, monkeypatch):
    """No cluster here: a stand-in sbatch keeps the submission file submitit writes and answers as SLURM
    does; an srun is there because submitit looks for it to tell it is on a cluster."""
    pytest.importorskip("submitit")
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\ncp "$1" {folder}/submitted.sh\necho "Submitted batch job 4242"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return folder / "submitted.sh"


def test_slurm_gets_one_job_array_capped_at_jobs(fake_slurm, capsys):
    assert (
        main(
            [
                "sweep",
                "tiny.toml",
                *GRID,
                "--jobs",
                "2",
                "--slurm",
                "--slurm-opt",
                "slurm_partition=gpu",
                "--slurm-opt",
                "timeout_min=30",
            ]
        )
        == 0
    )
    assert "submitted 4 run(s) of sw as job array 4242 (slurm), at most 2 at once" in capsys.readouterr().out
    script = fake_slurm.read_text()
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --time=30" in script


def test_slurm_opt_that_submitit_does_not_know(fake_slurm, capsys):
    assert main(["sweep", "tiny.toml", *GRID, "--slurm", "--slurm-opt", "partitionn=gpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --slurm-opt: ") and "Traceback" not in err


def test_slurm_where_there_is_none(folder, capsys, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))
    assert main(["sweep", "tiny.toml", *GRID, "--slurm"]) == 2
    assert 'Could not detect "srun"' in capsys.readouterr().err


def test_each_concurrent_run_gets_its_share_of_threads_and_gpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(sweep, "visible_gpus", lambda: [])
    assert [e["OMP_NUM_THREADS"] for e in sweep.slots(3)] == ["2", "2", "2"]
    assert "CUDA_VISIBLE_DEVICES" not in sweep.slots(2)[0]
    monkeypatch.setattr(sweep, "visible_gpus", lambda: ["0", "1", "2", "3"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in sweep.slots(2)] == ["0,2", "1,3"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in sweep.slots(6)] == ["0", "1", "2", "3", "0", "1"]


def test_values_split_on_commas_outside_lists_and_quotes():
    assert sweep.split_values("1e-3,3e-3") == ["1e-3", "3e-3"]
    assert sweep.split_values('[0.9,0.95],[0.9, 0.99],"a,b"') == ["[0.9,0.95]", "[0.9, 0.99]", '"a,b"']


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--vary", "optimizer.lrr=1e-3,3e-3"],
            "--vary optimizer.lrr=1e-3: unknown key 'lrr' in tiny.toml [optimizer] for optimizer 'adamw'. Did you mean 'lr'?",
        ),
        (
            ["--vary", "trian.batch_size=2,4"],
            "--vary trian.batch_size=2: unknown table [trian] in tiny.toml. Did you mean 'train'?",
        ),
        (
            ["--vary", "train.batch_size=2,four"],
            "--vary train.batch_size=four: tiny.toml [train] batch_size = 'four'",
        ),
        (["--vary", "model.mlp.name=gelu,swiglo"], "--vary model.mlp.name=swiglo: unknown mlp 'swiglo'"),
        (["--vary", "optimizer.lr="], "--vary optimizer.lr= has no values: the grid is empty"),
        ([], "the grid is empty: give what to vary, e.g. --vary optimizer.lr=1e-3,3e-3"),
        (["--vary", "optimizer=1,2"], "--vary optimizer: 'optimizer' is a table, not a setting"),
        (["--vary", "train.seed=1,2"], "--vary train.seed: the sweep sets it for every run; use --seeds N"),
        (["--vary", "optimizer.lr=1e-3", "--seeds", "0"], "--seeds 0: give at least 1 seed"),
    ],
)
def test_a_bad_grid_is_one_message_and_touches_nothing(folder, capsys, args, message):
    before = snapshot(folder)
    assert main(["sweep", "tiny.toml", *args, "--out", "sw"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}"), err
    assert "Traceback" not in err and snapshot(folder) == before and not (folder / "sw").exists()


def test_a_sweep_folder_of_another_grid_is_refused_untouched(folder, capsys):
    assert main(["sweep", "tiny.toml", *GRID, "--dry-run"]) == 0
    capsys.readouterr()
    before = snapshot(folder)
    assert (
        main(["sweep", "tiny.toml", "--vary", "optimizer.lr=3e-3,3e-2", "--seeds", "2", "--out", "sw"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(
        "error: sw holds another sweep: --vary optimizer.lr=3e-3,1e-2 -> optimizer.lr=3e-3,3e-2."
    )
    assert "--out DIR" in err and snapshot(folder) == before

    (folder / "tiny.toml").write_text(RECIPE.format(steps=5))  # the recipe edited: another grid too
    assert main(["sweep", "tiny.toml", *GRID]) == 2
    assert "holds another sweep: recipe's settings (edited) -> (edited)" in capsys.readouterr().err

    (folder / "mine").mkdir()
    (folder / "mine" / "notes.txt").write_text("keep")
    assert main(["sweep", "tiny.toml", *GRID[:-1], "mine"]) == 2
    assert "mine exists and is not a sweep folder (no sweep.json)" in capsys.readouterr().err
    assert (folder / "mine" / "notes.txt").read_text() == "keep"
