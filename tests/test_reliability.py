"""Nothing a user made is lost: one run writes a run folder at a time, a damaged checkpoint is found
and passed over for an intact one, and a full or read-only disk stops a run with one message,
leaving the last good checkpoint as it was."""

import errno
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_recipe, write_tiny_run

from lab import files
from lab.commands.cli import main
from lab.errors import LabError
from lab.runs import checkpoint
from lab.runs.layout import LOCK
from lab.runs.lock import RunLock

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = tiny_recipe(
    "tiny",
    """
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
""",
)


def write_recipe(folder, out="run") -> str:
    return write_tiny_run(folder, TINY, out=out)


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
        [
            sys.executable,
            "-c",
            "import sys, time; from lab.runs.lock import RunLock\n"
            "with RunLock(sys.argv[1], 'lab run x.toml'):\n    print('held', flush=True); time.sleep(60)",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
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
    for args in (
        ["generate", run],
        ["run", recipe, "--set", "train.max_steps=6"],
        ["export-hf", run, "--out", tmp_path / "hf"],
    ):
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


# ------------------------------------------------------------------------------ full disks, no permission


@pytest.mark.parametrize(
    "code, why",
    [
        (errno.ENOSPC, "the disk is full"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "the file system is read-only"),
    ],
)
def test_a_checkpoint_that_cannot_be_written_is_one_message_and_the_last_good_one_stays(
    tmp_path, capsys, monkeypatch, code, why
):
    recipe = write_recipe(tmp_path)
    assert run_lab(capsys, "run", recipe, "--set", "train.max_steps=2")[0] == 0
    real_save = torch.save

    def fails_half_way(obj, path):  # writes part of the file, then the disk says no
        real_save(obj, path)
        truncate(Path(path))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint.torch, "save", fails_half_way)
    status, out, err = run_lab(capsys, "run", recipe)
    assert status == 2 and "Traceback" not in err
    assert f"cannot write checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_0000004'}: {why}" in err
    assert f"The last good checkpoint, {tmp_path / 'run' / 'checkpoints' / 'step_0000002'}, is kept" in err
    assert f"`lab run {recipe}` to continue" in err
    if code == errno.ENOSPC:
        assert "free, about " in err and " MB needed" in err
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_0000002"]  # no half-written folder
    assert checkpoint.damage(tmp_path / "run" / "checkpoints" / "step_0000002") == []


def test_torch_saves_own_error_on_a_full_disk_is_recognised(tmp_path, monkeypatch):
    """torch.save reports a full disk as '[enforce fail at inline_container.cc] unexpected pos'."""

    def full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(
        files.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100)
    )
    with pytest.raises(LabError, match=r"the disk is full \(100 B free, about 240 B needed\)"):
        checkpoint.save(
            tmp_path, 1, torch.nn.Linear(4, 4), "", {"step": 1, "optimizer": {"m": torch.zeros(40)}}
        )
    assert os.listdir(tmp_path / "checkpoints") == []


def test_numpys_full_disk_error_without_an_errno_is_recognised(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    message = str(files.cannot_write(tmp_path / "train.bin", OSError("301962 requested and 0 written")))
    assert message.startswith(f"cannot write {tmp_path / 'train.bin'}: the disk is full (0 B free)")


def test_stale_temporaries_of_killed_runs_are_removed_at_the_next_start(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    assert run_lab(capsys, "run", recipe, "--set", "train.max_steps=2")[0] == 0
    run = tmp_path / "run"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    litter = [
        run / "checkpoints" / f".tmp_step_0000003_{dead}",
        run / "checkpoints" / f".old_step_0000002_{dead}",
        run / f".metrics.jsonl.{dead}.abcd1234.tmp",
        run / ".loss.png.tmp",
    ]
    for path in litter:
        path.mkdir() if "step" in path.name else path.write_text("half")
    assert run_lab(capsys, "run", recipe)[0] == 0
    assert not any(path.exists() for path in litter)


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB tmpfs: room for one checkpoint of the tiny model (about 20 MB: the weights and Adam's
    moments of a 50257-token embedding), not for two. Mounting needs root (CAP_SYS_ADMIN)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the tests above fake the same errors")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.slow  # mounts a tmpfs; the tests above fake the same errors
def test_a_real_full_disk_stops_the_run_and_the_next_one_continues(tmp_path, capsys, small_disk):
    recipe = write_recipe(tmp_path, out="disk/run")
    status, out, err = run_lab(capsys, "run", recipe)
    assert status == 2 and "Traceback" not in err
    assert (
        f"cannot write checkpoint {small_disk / 'run' / 'checkpoints' / 'step_0000004'}: the disk is full"
        in err
    )
    free, needed = map(float, re.search(r"\(([\d.]+) MB free, about ([\d.]+) MB needed\)", err).groups())
    assert free < 30 < free + needed  # the tmpfs's free space, not another disk's
    ckpts = small_disk / "run" / "checkpoints"
    assert os.listdir(ckpts) == ["step_0000002"] and checkpoint.damage(ckpts / "step_0000002") == []
    subprocess.run(["mount", "-o", "remount,size=80m", str(small_disk)], check=True)  # space freed
    status, out, err = run_lab(capsys, "run", recipe)
    assert status == 0 and "resuming from step 2" in out, err
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    status, out, err = run_lab(capsys, "run", recipe, "--set", "train.max_steps=6")
    assert status == 2 and "read-only" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ the rest of the command line


@pytest.mark.parametrize(
    "change, message",
    [
        ("latin-1", "is not UTF-8 text (bad byte at offset"),
        (("model", 3), "'model' must be a table ([model]), got 3"),
        (("optimizer", "lr", math.inf), "[optimizer] lr = inf: a number must be finite"),
        (("optimizer", "betas", [0.9, math.nan]), "[optimizer] betas = [0.9, nan]: a number must be finite"),
        (("optimizer", "betas", [0.9, 1.5]), "[optimizer] betas.1 = 1.5"),
        (("generate", "temperature", math.nan), "[generate] temperature = nan: a number must be finite"),
    ],
    ids=["latin1", "model-not-a-table", "lr-inf", "betas-nan", "betas-above-1", "temperature-nan"],
)
def test_recipe_files_that_are_wrong_in_new_ways(tmp_path, capsys, change, message):
    import tomli_w

    path = tmp_path / "r.toml"
    if change == "latin-1":
        path.write_bytes(
            TINY.format(data=tmp_path, out=tmp_path / "run").encode() + "# café\n".encode("latin-1")
        )
    else:
        path.write_text(tomli_w.dumps(changed(tmp_path, change)))
    status, _, err = run_lab(capsys, "recipe", path)
    assert status == 2 and message in err and "Traceback" not in err, err


def changed(tmp_path, change) -> dict:
    """The tiny recipe with (table, ..., key, value) set."""
    import tomllib

    recipe = tomllib.loads(TINY.format(data=tmp_path, out=tmp_path / "run"))
    *tables, key, value = change
    table = recipe
    for name in tables:
        table = table[name]
    table[key] = value
    return recipe


def test_generate_refuses_bad_flags_in_one_line(tmp_path, capsys, trained):
    run, _ = copy_run(trained, tmp_path)
    (tmp_path / "binary").write_bytes(bytes(range(256)))
    for args, message in (
        (["--temperature", "nan"], "temperature must be >= 0"),
        (["--temperature", "inf"], "temperature must be >= 0"),
        (["--prompt-file", tmp_path / "binary"], "is not UTF-8 text (bad byte at offset 128)"),
        (["--prompt", "caf\udce9"], "the prompt is not valid UTF-8 text"),
        (["--temperature", "1e-320"], "temperature 1e-320 is too small to sample with"),
        (["--seed", str(10**30)], "--seed must be between"),
    ):
        status, _, err = run_lab(capsys, "generate", run, *args)
        assert status == 2 and message in err and err.count("\n") == 1, err
    # 1e-320 is 0 in float32: the likeliest token still stays, rather than none (and a NaN)
    assert run_lab(capsys, "generate", run, "--top-p", "1e-320", "--max-new-tokens", "2")[0] == 0


def test_warmup_longer_than_the_run_is_a_warning_with_the_fix(tmp_path, capsys):
    status, _, err = run_lab(capsys, "run", write_recipe(tmp_path), "--set", "schedule.warmup_steps=50")
    assert status == 0
    assert (
        "warning: [schedule] warmup_steps = 50 is more than train.max_steps = 4: the learning rate never "
        "reaches [optimizer] lr. To reach it, set schedule.warmup_steps to at most 4"
    ) in err


def test_token_ids_beyond_the_vocabulary_are_caught_as_batches_are_read(tmp_path, capsys):
    """meta.json says the largest id is 499, and the source trusts it rather than scan the files;
    a file changed afterwards is caught by the batch that reads the bad id, not by an IndexError."""
    import json

    recipe = write_recipe(tmp_path)
    data = tmp_path / "data"
    (np.arange(3000) % 500).astype(np.uint16).tofile(data / "train.bin")
    (data / "meta.json").write_text(
        json.dumps(
            {
                "tokenizer": "gpt2",
                "vocab_size": 50257,
                "dtype": "uint16",
                "train_tokens": 3000,
                "val_tokens": 600,
                "max_token_id": 499,
            }
        )
    )
    tokens = np.memmap(data / "train.bin", dtype=np.uint16, mode="r+")
    tokens[:] = 60000  # beyond GPT-2's 50257, in every window
    tokens.flush()
    status, _, err = run_lab(capsys, "run", recipe)
    assert status == 2 and "Traceback" not in err
    assert f"{data / 'train.bin'} holds token id 60000, beyond the model's vocabulary of 50257 tokens" in err


def test_prepare_refuses_to_overwrite_files_it_did_not_write(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("Hello there.\nGeneral Kenobi.\n" * 50)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.bin").write_bytes(b"my own file")
    status, _, err = run_lab(capsys, "prepare", tmp_path / "text.txt", "--out", mine)
    assert status == 2 and "holds train.bin that lab prepare did not write" in err
    assert (mine / "train.bin").read_bytes() == b"my own file"
    # Its own output it overwrites: preparing again is how a corpus is updated.
    assert run_lab(capsys, "prepare", tmp_path / "text.txt", "--out", tmp_path / "prepared")[0] == 0
    assert run_lab(capsys, "prepare", tmp_path / "text.txt", "--out", tmp_path / "prepared")[0] == 0


def test_prepare_removes_the_temporaries_of_a_killed_prepare(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("Hello there.\nGeneral Kenobi.\n" * 50)
    out = tmp_path / "prepared"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale, live = out / f".train.bin.{dead}.abcd1234.tmp", out / f".val.bin.{os.getppid()}.abcd1234.tmp"
    stale.write_bytes(b"\0" * 100)
    live.write_bytes(b"\0" * 100)  # a prepare still running (its process is alive): left alone
    assert run_lab(capsys, "prepare", tmp_path / "text.txt", "--out", out)[0] == 0
    assert not stale.exists() and live.exists()


def test_import_hf_refuses_an_out_that_is_a_file_and_weights_that_are_not_tensors(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}')
    (tmp_path / "file").write_text("x")
    status, _, err = run_lab(capsys, "import-hf", hf, "--out", tmp_path / "file")
    assert status == 2 and "--out" in err and "is a file" in err
    for weights, message in (
        ({"wte.weight": 3}, "'wte.weight' is a int, not a tensor"),
        ([1, 2], "holds a list, not a dict of tensors"),
    ):
        torch.save(weights, hf / "pytorch_model.bin")
        status, _, err = run_lab(capsys, "import-hf", hf, "--out", tmp_path / "run")
        assert status == 2 and message in err and "Traceback" not in err, err
