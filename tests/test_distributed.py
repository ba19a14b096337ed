"""Several processes, one run: `torchrun --nproc_per_node=2 -m lab run` on two CPU processes (gloo)
logs the losses of one process with the same global batch, with DDP and with FSDP2; a checkpoint
written by one layout resumes in another; rank 0 alone prints and writes; a mistake is one message."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import counting_tokens, tiny_recipe

from lab.commands.cli import main
from lab.engine import distributed
from lab.engine.trainer import accumulation, micro_rows
from lab.errors import LabError
from lab.recipe import load_recipe
from lab.roles import build_optimizer
from lab.runs import checkpoint
from lab.runs.metrics import read_metrics
from lab.testing import assert_close_to_scale

pytestmark = pytest.mark.usefixtures("one_thread")

# A global batch of 8 sequences: one process takes it as 2 micro-batches of 4, two processes as one
# each. Dropout 0: the processes' dropout masks would differ from one process's (see Trainer.resume).
# decay_steps: the lr schedule of a leg run to max_steps = 3 is that of the whole run of 6 steps.
RECIPE = tiny_recipe(
    "tiny",
    """
[schedule]
name = "cosine"
warmup_steps = 2
decay_steps = 6

[train]
batch_size = 4
global_batch_size = 8
max_steps = 6
eval_interval = 3
eval_batches = 2
log_interval = 3
checkpoint_interval = 3
device = "cpu"

[generate]
num_samples = 1
max_new_tokens = 4
""",
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    data = folder / "data"
    counting_tokens(data)
    (folder / "tiny.toml").write_text(RECIPE.format(data=data))
    return folder


def lab_run(folder, out, *sets) -> None:
    """`lab run` in this process: one process."""
    args = ["run", str(folder / "tiny.toml"), "--set", f"train.out_dir={folder / out}"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0


def torchrun(folder, out, *sets) -> subprocess.CompletedProcess:
    """The README's command, two CPU processes talking over loopback only."""
    with socket.socket() as s:  # a free port for rank 0's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "lab",
        "run",
        "tiny.toml",
        "--set",
        f"train.out_dir={out}",
    ]
    loopback = next(name for _, name in socket.if_nameindex() if name.startswith("lo"))  # lo, or lo0 on macOS
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": loopback}
    return subprocess.run(
        command + [a for s in sets for a in ("--set", s)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def records(run) -> dict:
    """{(step, 'loss' | 'val_loss' | 'grad_norm'): value} of a run folder's metrics.jsonl."""
    return {
        (r["step"], key): r[key]
        for r in read_metrics(run / "metrics.jsonl")
        for key in ("loss", "val_loss", "grad_norm")
        if key in r
    }


def assert_same_losses(run, reference, grad_norm_rel=1e-4):
    got, expected = records(run), records(reference)
    assert got.keys() == expected.keys()
    assert sorted({step for step, key in got if key == "loss"}) == list(range(1, 7))
    for (step, key), value in expected.items():
        rel = grad_norm_rel if key == "grad_norm" else 1e-4
        assert got[step, key] == pytest.approx(value, rel=rel), (step, key)


@pytest.fixture(scope="module")
def one_process(folder):
    """The reference: one process, grad_accum 2 (from the global batch), 6 steps straight."""
    lab_run(folder, "one")
    return folder / "one"


@pytest.mark.slow  # torchrun, two processes
def test_two_ddp_processes_log_one_process_losses_and_the_run_resumes_in_one(folder, one_process):
    done = torchrun(folder, "ddp", "train.max_steps=3")
    assert done.returncode == 0, done.stderr
    out = done.stdout  # both processes' output, through torchrun: rank 0 alone prints
    assert out.count("run tiny") == 1 and "x 1 accum x 2 processes (ddp) = 256 tokens per step" in out
    assert out.count("| val loss") == 2 and out.count("saved ddp/checkpoints/step_0000003") == 1
    assert out.count("--- sample 1 ---") == 1 and (folder / "ddp" / "generated.txt").exists()
    assert (folder / "ddp" / "loss.png").exists()

    lab_run(folder, "ddp", "train.max_steps=6")  # the same run, continued by one process (grad_accum 2)
    assert_same_losses(folder / "ddp", one_process)


@pytest.mark.slow  # torchrun, two processes
def test_a_one_process_run_continues_on_two_fsdp2_processes_with_accumulation(folder, one_process):
    """batch_size 2: one process accumulates 4 micro-batches, each of two processes 2 (gradient sync
    skipped on the first). FSDP2 shards the tied embedding / head with the rest of the root module."""
    common = ["train.batch_size=2"]
    lab_run(folder, "one_b2", *common)  # the reference (validation takes batch_size rows per val step)
    lab_run(folder, "fsdp", *common, "train.max_steps=3")
    done = torchrun(folder, "fsdp", *common, "train.parallel=fsdp")
    assert done.returncode == 0, done.stderr
    assert "x 2 accum x 2 processes (fsdp)" in done.stdout and "resuming from step 3" in done.stdout
    # Torch's CPU norm kernel rounds a long vector's sum of squares at ~1e-4: the norm of two shards
    # differs from the norm of the whole by that much (the losses and weights match far closer).
    assert_same_losses(folder / "fsdp", folder / "one_b2", grad_norm_rel=1e-3)
    # FSDP2 saved the whole model, the tied matrix once, as one process saves it.
    sharded = load_file(checkpoint.latest(folder / "fsdp") / "model.safetensors")
    whole = load_file(checkpoint.latest(folder / "one_b2") / "model.safetensors")
    assert sharded.keys() == whole.keys() and "head.weight" in sharded and "tok_emb.weight" not in sharded
    for name, tensor in whole.items():  # relative to each tensor's scale: weights of any size
        assert_close_to_scale(sharded[name], tensor, 1e-4, name)


@pytest.mark.slow  # torchrun, two processes
def test_a_global_batch_that_does_not_split_is_one_message_from_rank_0(folder):
    done = torchrun(folder, "bad", "train.global_batch_size=6")
    assert done.returncode != 0
    # One message, rank 0's, and no traceback of lab's (torchrun then reports the failure its own way).
    assert done.stderr.count("error: ") == 1 and "lab/engine/trainer.py" not in done.stderr
    assert (
        "tiny.toml [train] global batch 6 cannot be split into micro-batches of 4 over 2 process(es); "
        "set global_batch_size to a multiple of 8 (e.g. 8), or batch_size to a divisor of 3 (e.g. 3)"
        in done.stderr
    )
    assert not (folder / "bad").exists()


# ----------------------------------------------------------------------------- the pieces, in-process


@pytest.mark.parametrize("batch_size, accum, world", [(8, 1, 1), (4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4)])
def test_every_layout_takes_the_same_global_batch(batch_size, accum, world):
    rows = [
        row
        for rank in range(world)
        for micro in range(accum)
        for row in micro_rows(micro, batch_size, rank, world)
    ]
    assert sorted(rows) == list(range(8))


def test_global_batch_size_decides_grad_accum(folder):
    recipe = load_recipe(folder / "tiny.toml", ["train.batch_size=2", "train.global_batch_size=16"])
    assert [accumulation(recipe, world) for world in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(
        LabError,
        match="global batch 16 cannot be split into micro-batches of 2 over 3 "
        r"process\(es\); set global_batch_size to a multiple of 6 \(e.g. 18\), or start a "
        "number of processes that divides 16",
    ):
        accumulation(recipe, 3)
    assert accumulation(load_recipe(folder / "tiny.toml", ["train.global_batch_size=0"]), 2) == 1


@pytest.mark.skipif(torch.distributed.is_nccl_available(), reason="needs a torch without NCCL")
def test_gpus_without_nccl_is_one_clear_message():
    with pytest.raises(
        LabError,
        match="training on cuda with several processes needs torch.distributed's nccl "
        "backend, which this build of torch",
    ):
        distributed.backend_for(torch.device("cuda"))
    assert distributed.backend_for(torch.device("cpu")) == "gloo"


def test_one_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    layout = distributed.layout()
    assert layout == distributed.Layout() and layout.main
    assert distributed.process_device(torch.device("cuda", 1), layout, "") == torch.device("cuda", 1)
    with distributed.process_group(layout, torch.device("cpu")):
        assert not torch.distributed.is_initialized()
        assert distributed.share("x") == "x" and distributed.on_main(lambda: 3) == 3


def test_checkpoints_from_before_name_the_optimizer_state(folder):
    """Older checkpoints keyed the optimizer's state by parameter index; they still resume."""
    from lab.model import GPT

    recipe = load_recipe(folder / "tiny.toml")
    model = GPT(recipe)
    optimizer = build_optimizer(recipe.parts["optimizer"], model)
    model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    old = optimizer.state_dict()
    fresh = build_optimizer(recipe.parts["optimizer"], model)
    checkpoint.restore(model, fresh, model.state_dict(), old)
    for p in model.parameters():
        torch.testing.assert_close(fresh.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])
