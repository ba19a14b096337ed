"""Training on several processes, with PyTorch's own engine: torchrun starts them, torch.distributed
joins them, DDP or FSDP2 averages their gradients.

    torchrun --nproc_per_node=N -m lab run RECIPE

starts N copies of `lab run` and tells each its RANK, LOCAL_RANK and WORLD_SIZE in the environment.
Every process builds the same model from the same seed, trains on its own rows of each step's global
batch (see train.micro_rows) on its own device (GPU LOCAL_RANK of its node, or the CPU), and the
gradients are averaged across processes during backward: by DDP, where every process holds the whole
model, or by FSDP2, where each holds a shard of every parameter and gathers a block's weights just
before the block runs. Rank 0 alone reads and writes the run folder, so the processes of other nodes
need not see it.

Without torchrun's variables there is one process: no process group, no wrapper, and every helper
here hands its input straight back.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lab.errors import LabError, SaidByRank0


@dataclass(frozen=True)
class Layout:
    """This process's place in the run: rank `rank` of `world_size`, `local_rank` of the
    `local_world_size` processes on its node."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def layout() -> Layout:
    """From the variables torchrun sets; none set: the one process of a plain `lab run`."""
    env = os.environ
    return Layout(
        int(env.get("RANK", 0)),
        int(env.get("LOCAL_RANK", 0)),
        int(env.get("WORLD_SIZE", 1)),
        int(env.get("LOCAL_WORLD_SIZE", 1)),
    )


def process_device(device: torch.device, layout: Layout, where: str) -> torch.device:
    """The device this process trains on: one GPU per process (cuda:LOCAL_RANK), or the CPU.
    where: the recipe's device setting, for messages."""
    if layout.world_size == 1:
        return device
    if device.type == "cuda":
        if device.index is not None:  # every process would train on that one GPU
            raise LabError(
                f"{where}: under torchrun each process takes GPU LOCAL_RANK of its node; set "
                'train.device = "cuda" (or "auto") and choose the GPUs with CUDA_VISIBLE_DEVICES'
            )
        # Checked against the node's process count, not this process's rank: all of them say so, rank 0 too.
        if max(layout.local_world_size, layout.local_rank + 1) > torch.cuda.device_count():
            raise LabError(
                f"torchrun started {layout.local_world_size} processes on this node, one per GPU, but "
                f"it has {torch.cuda.device_count()} GPU(s); set --nproc_per_node to at most "
                f"{torch.cuda.device_count()}"
            )
        return torch.device("cuda", layout.local_rank)
    if device.type != "cpu":
        raise LabError(
            f"{where}: several processes train on CUDA GPUs (NCCL) or on the CPU (gloo), "
            f'not on {device.type}; set train.device = "cuda" or "cpu"'
        )
    return device


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes: the device decides, the user never has to."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    has = dist.is_nccl_available if backend == "nccl" else dist.is_gloo_available
    if not (dist.is_available() and has()):
        raise LabError(
            f"training on {device.type} with several processes needs torch.distributed's {backend} "
            f"backend, which this build of torch ({torch.__version__}) lacks; install a torch build "
            f"that has it (the Linux builds do), or train in one process with plain `lab run`"
        )
    return backend


@contextmanager
def process_group(layout: Layout, device: torch.device):
    """Join the run's other processes for the duration; with one process there is nothing to join."""
    if layout.world_size == 1:
        yield
        return
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives, and broadcast_object_list, use the current GPU
    try:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    except ValueError as e:  # RANK and WORLD_SIZE set by hand, without torchrun's MASTER_ADDR / MASTER_PORT
        raise LabError(
            f"cannot join the other processes ({e}); start a run on several processes with "
            "torchrun --nproc_per_node=N -m lab run RECIPE"
        ) from None
    try:
        yield
    finally:
        dist.destroy_process_group()


# The model ------------------------------------------------------------------------------------


def parallelize(model: nn.Module, how: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model as training calls it: wrapped by DDP, or itself sharded in place by FSDP2."""
    if how == "fsdp":
        return shard(model, device, dtype)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """FSDP2: each process keeps a shard of every parameter (they become DTensors: build the
    optimizer after this), and gathers a unit's whole weights just before the unit runs."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.5 had FSDP2 under a private name only
        raise LabError(
            f'train.parallel = "fsdp" needs FSDP2 from torch 2.6 or later (this is torch '
            f'{torch.__version__}); upgrade torch, or set train.parallel = "ddp"'
        ) from None
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and dtype == torch.bfloat16:
        # Gather weights in bf16 (half the traffic; the matmuls run in bf16 anyway) but average the
        # gradients in fp32, so small gradients summed over many processes are not rounded away.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = cast(nn.ModuleList, model.blocks)  # GPT's blocks
    for block in blocks:  # a unit per block: gathered just before it runs, freed after
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root unit holds the rest. The token embedding and the head are one tied matrix, and both
    # modules are in this unit, so it is one parameter sharded once, and its two gradients add up.
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def gradient_sync(model: nn.Module, sync: bool):
    """For one micro-step's forward and backward. Gradients need averaging across processes only
    once per optimizer step: on the micro-steps before the last, each process just accumulates its own."""
    if isinstance(model, DDP):
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # a model sharded by FSDP2
        model.set_requires_gradient_sync(sync)  # type: ignore[operator]  # FSDP2's, found by hasattr
    return nullcontext()


# Talking between processes (each a no-op with one process) -------------------------------------


def mean(value: torch.Tensor) -> torch.Tensor:
    """A scalar averaged over the processes (gloo has no AVG: sum, then divide)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when it is True on one."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def share(obj):
    """Rank 0's obj, on every process: small things only (a path, a step, RNG states), as it is pickled."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list | None:
    """Every process's obj, in rank order, on rank 0 (None elsewhere): small things only (a data
    source's position), as it is pickled."""
    if not dist.is_initialized():
        return [obj]
    objects = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, objects, dst=0)
    return objects


def scatter(objects: list | None):
    """objects[r] from rank 0 to rank r (what gather collected, handed back): objects matters on rank
    0 only. Small things only, as they are pickled."""
    if not dist.is_initialized():
        assert objects is not None  # one process: it is rank 0, which has them
        return objects[0]
    box = [None]
    dist.scatter_object_list(box, objects if dist.get_rank() == 0 else None, src=0)
    return box[0]


def on_main(fn, *args):
    """fn(*args) run by rank 0 alone: its result there, None elsewhere. A LabError it raises is raised
    on every process, so they all stop together instead of waiting for rank 0 forever (rank 0 says why)."""
    result, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn(*args)
        except LabError as e:
            error = e
    message = share(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise SaidByRank0(message)
    return result


def main_first(fn, *args):
    """fn(*args) on rank 0, then on the others: what rank 0 makes on first use (the shipped corpus's
    token cache) the others on its machine then find ready, instead of all making it at once."""
    result = on_main(fn, *args)
    if dist.is_initialized() and dist.get_rank() != 0:
        result = fn(*args)
    return result


def launcher() -> str:
    """How this process was started, for the commands messages suggest: '' (plain `lab run`) or torchrun."""
    here = layout()
    if here.world_size == 1:
        return ""
    nodes = here.world_size // here.local_world_size
    return f"torchrun {f'--nnodes={nodes} ' if nodes > 1 else ''}--nproc_per_node={here.local_world_size} -m "


def torchrun_command(command: str, processes: int) -> str:
    """`lab run ...` as started on that many processes of one node."""
    return command if processes == 1 else f"torchrun --nproc_per_node={processes} -m {command}"
