"""Nothing a user made is lost: one run writes a run folder at a time, a damaged checkpoint is found
and passed over for an intact one, and a full or read-only disk stops a run with one message,
leaving the last good checkpoint as it was."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lab import checkpoint
from lab.cli import main
from lab.runlock import LOCK, RunLock
from tiny import tiny_recipe

TINY = tiny_recipe("tiny", """
[schedule]
name = "cosine"
warmup_steps = 2

[train]
batch_size = 2
precision = "fp32"
max_steps = 4
eval_interval = 2
eval_batches = 1
log_interval = 2
checkpoint_interval = 2
out_dir = "{out}"
device = "cpu"

[generate]
num_samples = 1
max_new_tokens = 4
""")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_recipe(folder, out="run", **sets) -> str:
    data = folder / "data"
    data.mkdir(exist_ok=True)
    (np.arange(3000) % 500).astype(np.uint16).tofile(data / "train.bin")
    (np.arange(600) % 500).astype(np.uint16).tofile(data / "val.bin")
    path = folder / f"{out}.toml"
    path.write_text(TINY.format(data=data, out=folder / out))
    return str(path)


def run_lab(capsys, *args):
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


# ------------------------------------------------------------------------------ one writer per folder


def test_a_second_run_on_a_folder_in_use_refuses_at_once_naming_the_first(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    with RunLock(tmp_path / "run", "lab run first.toml"):  # as a run in progress holds it
        status, out, err = run_lab(capsys, "run", recipe)
    assert status == 2 and "Traceback" not in err
    assert f"{tmp_path / 'run'} is in use by process {os.getpid()}" in err
    assert "`lab run first.toml`" in err and "started 20" in err and "train.out_dir" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # it wrote nothing
    assert run_lab(capsys, "run", recipe)[0] == 0  # once the first is done, the folder is free


def test_a_lock_left_by_a_killed_run_never_blocks(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lab.runlock import RunLock\n"
         "with RunLock(sys.argv[1], 'lab run x.toml'):\n    print('held', flush=True); time.sleep(60)",
         str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(Exception, match=f"process {holder.pid}"):
        RunLock(tmp_path / "run", "second").__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / LOCK).exists()  # the file stays, the lock went with the process
    assert run_lab(capsys, "run", write_recipe(tmp_path))[0] == 0


def test_a_run_that_fails_before_writing_leaves_no_folder_behind(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    status, _, err = run_lab(capsys, "run", recipe, "--set", "data.path=nowhere")
    assert status == 2 and "nowhere" in err
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()  # an empty folder the user made stays, and a lock file in it is no obstacle
    assert run_lab(capsys, "run", recipe, "--set", "data.path=nowhere")[0] == 2
    assert os.listdir(tmp_path / "run") == [LOCK]
    assert run_lab(capsys, "run", recipe)[0] == 0


# ------------------------------------------------------------------------------ damaged checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run with checkpoints at steps 2 and 4 (not touched: tests damage copies)."""
    import shutil

    folder = tmp_path_factory.mktemp("trained")
    recipe = write_recipe(folder)
    assert main(["run", recipe]) == 0
    return folder, recipe, shutil.copytree


def copy_run(trained, tmp_path):
    folder, _, copytree = trained
    copytree(folder, tmp_path, dirs_exist_ok=True)
    recipe = write_recipe(tmp_path)  # the same recipe, pointing at this copy
    return tmp_path / "run", recipe


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def scribble(path):
    """Random bytes over the tensors, the size unchanged: only the checksum can tell."""
    data = bytearray(path.read_bytes())
    data[-64:] = os.urandom(64)
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": ("model.safetensors", truncate),
    "scribbled weights": ("model.safetensors", scribble),
    "truncated state": ("state.pt", truncate),
    "scribbled state": ("state.pt", scribble),
    "missing state": ("state.pt", lambda p: p.unlink()),
    "emptied recipe": ("recipe.toml", lambda p: p.write_text("")),
}


@pytest.mark.parametrize("what", DAMAGE)
def test_generate_falls_back_to_the_newest_intact_checkpoint(trained, tmp_path, capsys, what):
    run, _ = copy_run(trained, tmp_path)
    name, harm = DAMAGE[what]
    harm(run / "checkpoints" / "step_0000004" / name)
    status, out, err = run_lab(capsys, "generate", run, "--max-new-tokens", "3", "--num-samples", "1")
    assert status == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "step_0000004 is damaged" in warning[0] and name in warning[0]
    assert "step_0000002 on cpu" in err  # the intact one it used
    assert "weights_only" not in err and "Traceback" not in err


def test_resume_falls_back_to_the_newest_intact_checkpoint(trained, tmp_path, capsys):
    run, recipe = copy_run(trained, tmp_path)
    truncate(run / "checkpoints" / "step_0000004" / "model.safetensors")
    status, out, err = run_lab(capsys, "run", recipe, "--set", "train.max_steps=6")
    assert status == 0, err
    assert "step_0000004 is damaged" in err and "resuming from step 2" in out
    assert checkpoint.load_state(checkpoint.latest(run))["step"] == 6


def test_when_every_checkpoint_is_damaged_each_reader_says_which_and_what_to_do(trained, tmp_path, capsys):
    run, recipe = copy_run(trained, tmp_path)
    for ckpt in checkpoint.checkpoint_dirs(run):
        truncate(ckpt / "state.pt")
    for args in (["generate", run], ["run", recipe, "--set", "train.max_steps=6"],
                 ["export-hf", run, "--out", tmp_path / "hf"]):
        status, _, err = run_lab(capsys, *args)
        assert status == 2 and "Traceback" not in err and "weights_only" not in err
        assert f"every checkpoint in {run} is damaged (step_0000004: state.pt is" in err
        assert "step_0000002: state.pt is" in err and "train again from scratch" in err
    assert len(checkpoint.checkpoint_dirs(run)) == 2  # nothing removed: they are the user's to inspect


def test_a_checkpoint_without_checksums_is_still_checked_when_read(trained, tmp_path, capsys):
    """Checkpoints saved before COMPLETE held checksums: reading them finds the damage."""
    run, recipe = copy_run(trained, tmp_path)
    for ckpt in checkpoint.checkpoint_dirs(run):
        (ckpt / checkpoint.MARKER).write_text(f"{checkpoint.step_of(ckpt)}\n")
    newest = run / "checkpoints" / "step_0000004"
    (newest / "state.pt").write_bytes(b"PK\x03\x04 not a zip")
    status, _, err = run_lab(capsys, "run", recipe, "--set", "train.max_steps=6")
    assert status == 2 and "state.pt cannot be read" in err and "weights_only" not in err
    assert "damaged_step_0000004" in err  # where to move it
    with pytest.raises(checkpoint.Damaged, match="NaN"):
        weights = {"w": torch.tensor([1.0, float("nan")])}
        from safetensors.torch import save_file
        save_file(weights, str(newest / "model.safetensors"))
        checkpoint.read_weights(newest, torch.nn.Module())


def test_deleting_an_old_checkpoint_removes_complete_first(tmp_path, monkeypatch):
    def save_one(step):
        checkpoint.save(tmp_path, step, torch.nn.Linear(2, 2), 'name = "x"\n', {"step": step}, keep=1)

    save_one(1)

    def killed_midway(path, ignore_errors=False):  # deletes one file, then the process dies
        (path / "model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_one(2)
    assert [d.name for d in checkpoint.checkpoint_dirs(tmp_path)] == ["step_0000002"]
    assert checkpoint.damage(checkpoint.latest(tmp_path)) == []
