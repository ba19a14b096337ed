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
