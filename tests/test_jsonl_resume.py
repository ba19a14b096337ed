"""The jsonl source end to end: a run stopped by Ctrl-C or SIGTERM, or killed with SIGKILL, on one
process or two (torchrun, CPU, gloo), continues with the same command and logs the same losses, bit
for bit, as a run that never stopped: every process's position in its share of the documents is
saved and handed back. A run cannot move to another number of processes: one message, no checkpoint
touched."""

import json
import os
import random
import signal
import socket
import subprocess
import sys

import pytest
from test_resume import finish, losses, wait_for_step
from tiny import tiny_recipe

from lab.runs import checkpoint

# runs stopped by signals, one and two processes; test_jsonl and the data_resume conformance check are the
# fast tier's
pytestmark = pytest.mark.slow

# Dropout on, so a resume that forgot the RNG state would show; the data crosses the end of the
# files (an epoch) during the run, so a resume also has to know the pass it is in.
RECIPE = tiny_recipe(
    "jsonl",
    """
[schedule]
name = "cosine"
warmup_steps = 3

[train]
batch_size = 2
grad_accum = 2
max_steps = 30
eval_interval = 4
eval_batches = 2
log_interval = 4
checkpoint_interval = 5
out_dir = "{out}"
device = "cpu"

[generate]
num_samples = 1
max_new_tokens = 4
""",
    model_extra="dropout = 0.1\n",
).replace(
    'name = "memmap"\npath = "{data}"',
    'name = "jsonl"\npath = ["docs.jsonl", "notes.txt"]\nval_fraction = 0.2',
)
WORDS = "the a lab model token stream resume process batch step loss of to and in".split()


def write_data(folder) -> None:
    rng = random.Random(0)
    with open(folder / "docs.jsonl", "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))}) + "\n")
    (folder / "notes.txt").write_text("".join(" ".join(rng.choices(WORDS, k=8)) + "\n" for _ in range(40)))


def start(folder, out, processes, max_steps=30) -> subprocess.Popen:
    """`lab run`, or torchrun with two CPU processes, in its own session: SIGKILL takes all of it."""
    command = [sys.executable, "-m", "lab", "run", "jsonl.toml"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAB_CACHE": str(folder / "cache")}
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command[1:3] = [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "lab",
        ]
        env["GLOO_SOCKET_IFNAME"] = next(name for _, name in socket.if_nameindex() if name.startswith("lo"))
    (folder / "jsonl.toml").write_text(
        RECIPE.format(out=out).replace("max_steps = 30", f"max_steps = {max_steps}")
    )
    return subprocess.Popen(
        command,
        cwd=folder,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def kill_all(proc) -> None:
    """SIGKILL to every process of the run: torchrun's workers first (they run in sessions of their
    own, and would finish the run without torchrun), then the process we started."""
    children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
    for pid in map(int, children):
        os.kill(pid, signal.SIGKILL)
    proc.kill()


@pytest.fixture(scope="module", params=[1, 2], ids=["one_process", "two_processes"])
def straight(request, tmp_path_factory):
    """(processes, folder with the data, the losses of the run made without a stop)."""
    folder = tmp_path_factory.mktemp(f"jsonl{request.param}")
    write_data(folder)
    code, out, err = finish(start(folder, "straight", request.param))
    assert code == 0, err
    assert [s for s, what, _ in losses(folder, "straight") if what == "loss"] == list(range(1, 31))
    return request.param, folder, losses(folder, "straight")


@pytest.mark.parametrize(
    "sig, status",
    [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, None)],
    ids=["ctrl_c", "sigterm", "sigkill"],
)
def test_a_stopped_run_continues_with_the_same_losses(straight, sig, status):
    processes, folder, expected = straight
    out = f"stopped_{sig.name}"
    proc = start(folder, out, processes)
    wait_for_step(folder, out, 7, proc)  # past the checkpoint at 5: with SIGKILL, steps 6.. are redone
    kill_all(proc) if sig == signal.SIGKILL else proc.send_signal(sig)
    code, _, err = finish(proc)
    if status is not None:
        assert code != 0 and ("finishing this step and saving a checkpoint" in err), err
    step = checkpoint.load_state(checkpoint.latest(folder / out))["step"]
    assert 5 <= step < 30
    assert len(checkpoint.load_state(checkpoint.latest(folder / out))["data"]) == processes  # each its own

    code, stdout, err = finish(start(folder, out, processes))
    assert code == 0, err
    assert f"resuming from step {step}" in stdout
    assert losses(folder, out) == expected


def test_another_number_of_processes_is_refused_and_the_checkpoint_kept(straight):
    processes, folder, _ = straight
    saved = checkpoint.latest(folder / "straight")
    files = {str(p): p.stat().st_mtime_ns for p in (folder / "straight" / "checkpoints").rglob("*")}
    code, _, err = finish(start(folder, "straight", 3 - processes, max_steps=40))
    assert (code == 2) if processes == 2 else (code != 0)  # torchrun reports a process's failure its own way
    message = (
        f"{saved.relative_to(folder)} was saved by {processes} process{'es' if processes > 1 else ''} "
        f"and this run has {3 - processes}, but data source 'jsonl' (package 'lab') cannot continue on "
        "another number of processes"
    )
    assert message in err and err.count("error: ") == 1, err  # rank 0's message alone
    assert "lab/engine/trainer.py" not in err and "lab/runs/checkpoint.py" not in err  # no traceback of lab's
    assert processes == 1 or "Traceback" not in err
    assert {str(p): p.stat().st_mtime_ns for p in (folder / "straight" / "checkpoints").rglob("*")} == files
