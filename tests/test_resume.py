"""Resume is exact: a run stopped with Ctrl-C or SIGTERM, or killed with SIGKILL, then started again with the same
command, logs the same loss at every step, bit for bit, as a run that was never stopped. And a
checkpoint is whole or absent, whatever moment the process dies."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tiny import counting_tokens, tiny_recipe

from lab.runs import checkpoint
from lab.runs.metrics import read_metrics

# Dropout on, so a resume that forgot the RNG state would show; a slow-enough step count that the
# test can signal the run mid-way.
RECIPE = tiny_recipe(
    "resume",
    """
[schedule]
name = "cosine"
warmup_steps = 3

[train]
batch_size = 2
grad_accum = 2
max_steps = 16
eval_interval = 4
eval_batches = 1
log_interval = 4
checkpoint_interval = 5
out_dir = "{out}"
device = "cpu"     # the same numbers on every machine

[generate]
num_samples = 1
max_new_tokens = 4
""",
    data="data",
    model_extra="dropout = 0.1\n",
)


def write_recipe(folder, out) -> str:
    data = folder / "data"
    counting_tokens(data)
    (folder / f"{out}.toml").write_text(RECIPE.format(out=out))
    return f"{out}.toml"


def lab_run(folder, recipe) -> subprocess.Popen:
    """`python -m lab run RECIPE` in folder, as a user would start it. One thread: a tiny model's ops
    are too small to share, and on a busy machine every op would wait for the second thread."""
    return subprocess.Popen(
        [sys.executable, "-m", "lab", "run", recipe],
        cwd=folder,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "LAB_CACHE": str(folder / "cache")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def wait_for_step(folder, out, step, proc) -> None:
    """Block until the run has logged `step` optimizer steps."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        records = read_metrics(folder / out / "metrics.jsonl")
        if any(r["step"] >= step and "loss" in r for r in records):
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never reached step {step}: {finish(proc)}")


def losses(folder, out) -> list:
    """(step, what, value) for every record, in order: train losses and val losses."""
    return [
        (r["step"], key, r[key])
        for r in read_metrics(folder / out / "metrics.jsonl")
        for key in ("loss", "val_loss")
        if key in r
    ]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The same recipe run from start to end without a stop."""
    folder = tmp_path_factory.mktemp("straight")
    recipe = write_recipe(folder, "run")
    code, out, err = finish(lab_run(folder, recipe))
    assert code == 0, err
    return losses(folder, "run")


@pytest.mark.slow  # subprocess training; test_moe and test_train resume in process
def test_the_straight_run_logs_every_step_once(straight):
    assert [s for s, what, _ in straight if what == "loss"] == list(range(1, 17))
    assert [s for s, what, _ in straight if what == "val_loss"] == [0, 4, 8, 12, 16]


@pytest.mark.slow  # signals to a training subprocess
@pytest.mark.parametrize(
    "sig, status, notice",
    [
        (signal.SIGINT, 130, "Ctrl-C: finishing this step and saving a checkpoint"),
        (signal.SIGTERM, 143, "SIGTERM: finishing this step and saving a checkpoint"),  # a scheduler's stop
    ],
    ids=["ctrl_c", "sigterm"],
)
def test_a_stop_signal_saves_says_how_to_continue_and_resumes_exactly(
    tmp_path, straight, sig, status, notice
):
    recipe = write_recipe(tmp_path, "run")
    proc = lab_run(tmp_path, recipe)
    wait_for_step(tmp_path, "run", 3, proc)
    proc.send_signal(sig)
    code, out, err = finish(proc)
    assert code == status, err
    stopped = checkpoint.latest(tmp_path / "run")
    step = checkpoint.load_state(stopped)["step"]
    assert 3 <= step < 16 and stopped.name == f"step_{step:07d}"  # the step it was on, saved
    assert f"stopped at step {step}; checkpoint saved in {stopped.relative_to(tmp_path)}" in out
    assert f"Continue with:\n  lab run {recipe}\n" in out
    assert notice in err

    code, out, err = finish(lab_run(tmp_path, recipe))
    assert code == 0, err
    assert f"resuming from step {step}" in out
    assert losses(tmp_path, "run") == straight


@pytest.mark.slow  # a killed training subprocess
def test_sigkill_then_the_same_command_resumes_exactly(tmp_path, straight):
    recipe = write_recipe(tmp_path, "run")
    proc = lab_run(tmp_path, recipe)
    wait_for_step(tmp_path, "run", 7, proc)  # past the checkpoint at 5: steps 6.. are lost and redone
    proc.kill()
    finish(proc)
    assert losses(tmp_path, "run")[-1][0] >= 7

    code, out, err = finish(lab_run(tmp_path, recipe))
    assert code == 0, err
    assert "resuming from step 5" in out or "resuming from step 10" in out
    assert losses(tmp_path, "run") == straight


# ---------------------------------------------------------------------------- checkpoints themselves


def save_one(run_dir, step, model):
    state = {"step": step, "rng": checkpoint.rng_state(), "optimizer": {}, "data": {}}
    return checkpoint.save(run_dir, step, model, 'name = "x"\n', state)


def test_checkpoint_and_metrics_files_get_the_umask_mode(tmp_path, umask_027, file_modes):
    """Written under temporary names (mkstemp, safetensors: owner only), they end as readable as
    any file the user makes: a shared machine's teammates can read the run."""
    from lab.runs.metrics import MetricsLog

    ckpt = save_one(tmp_path, 3, torch.nn.Linear(4, 4))
    log = MetricsLog(tmp_path, keep_through=-1)
    log.write({"step": 1, "loss": 2.0})
    log.close()
    assert set(file_modes(ckpt).values()) == {umask_027}
    assert file_modes(tmp_path)["metrics.jsonl"] == umask_027


def test_a_save_that_dies_midway_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    save_one(tmp_path, 10, model)

    def dies(*args):
        raise KeyboardInterrupt  # as if killed between writing the files and renaming the folder

    monkeypatch.setattr(checkpoint.os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        save_one(tmp_path, 20, model)
    monkeypatch.undo()
    debris = [d.name for d in (tmp_path / "checkpoints").iterdir() if d.name.startswith(".tmp_step_0000020")]
    assert debris  # the half-made checkpoint is there...
    assert checkpoint.latest(tmp_path).name == "step_0000010"  # ...and never read
    checkpoint.load_weights(checkpoint.latest(tmp_path), torch.nn.Linear(4, 4))
    assert checkpoint.load_state(checkpoint.latest(tmp_path))["step"] == 10
    save_one(tmp_path, 30, model)  # the next save clears the debris
    assert sorted(d.name for d in (tmp_path / "checkpoints").iterdir()) == ["step_0000010", "step_0000030"]


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import random

    torch.manual_seed(1)
    path = save_one(tmp_path, 1, torch.nn.Linear(2, 2))
    expected = (random.random(), np.random.rand(), torch.rand(2).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    checkpoint.set_rng_state(checkpoint.load_state(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == expected


@pytest.mark.parametrize("sig, second", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_a_second_stop_signal_quits_at_once(sig, second):
    from lab.engine.trainer import StopOnSignal

    with StopOnSignal(say=False) as stop:
        os.kill(os.getpid(), sig)
        assert stop.requested and stop.exit_status == 128 + sig
        with pytest.raises(second):
            os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is not stop.handle  # the handlers before it are back
