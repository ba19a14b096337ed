"""Checkpoints that survive anything: run_dir/checkpoints/step_NNNNNNN/ holds

    model.safetensors   the weights (safetensors: loading them can never run code)
    state.pt            optimizer, step, every process's data position, RNG states (weights_only=True)
    recipe.toml         the resolved recipe that built the model
    COMPLETE            written last

A checkpoint is written into a temporary folder, every file fsynced, COMPLETE added, and the folder
renamed into place (a rename is atomic). A folder without COMPLETE is never read, so a SIGKILL at any
moment leaves the previous checkpoint whole.

COMPLETE holds each file's size and SHA-256, taken when it was saved. Every reader (resume, `lab
generate`, `lab export-hf`, whatever calls lab.runs.load) checks them, and that the weights are finite,
before it trusts a checkpoint: a damaged one (a disk that failed, a copy cut short) is passed over for
the newest intact one with a one-line warning, and if none is intact the message lists what is
damaged and what to do. Old checkpoints are removed COMPLETE first, so one whose deletion was cut
short no longer counts as complete.

A checkpoint does not depend on how many processes wrote it: it holds the whole model (never FSDP2's
shards) and the optimizer's state keyed by parameter name, gathered and scattered with
torch.distributed.checkpoint's state-dict helpers. A run saved by two processes resumes in one, or
eight, and the other way round. The data position is the exception: it is saved per process (rank
r's at index r), and a data source whose position is each process's own continues on the same
number of processes only (see data_states).

state.pt is read with torch.load(weights_only=True), which unpickles only tensors and plain
containers: so the RNG states are stored as tensors and lists, never numpy objects.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lab.errors import LabError
from lab.files import cannot_write, disk_error, fsync, remove_stale_temporaries, sha256, usual_mode
from lab.runs.layout import CHECKPOINTS, MARKER, RECIPE

FILES = ("model.safetensors", "state.pt", RECIPE)  # what a checkpoint cannot do without


def checkpoint_dirs(run_dir) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [d for d in root.glob("step_*") if d.is_dir() and (d / MARKER).exists() and d.name[5:].isdigit()]
    return sorted(found, key=lambda d: int(d.name[5:]))


def latest(run_dir) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def step_of(ckpt_dir) -> int:
    """The step a checkpoint folder holds, from its name (step_NNNNNNN)."""
    return int(Path(ckpt_dir).name[5:])


def save(run_dir, step: int, model, recipe_toml: str, state: dict, keep: int = 2) -> Path:
    """Write a checkpoint atomically; keep the newest `keep` complete ones. model: the model, or its
    full state dict (what `gather` returns on rank 0)."""
    weights = model.state_dict() if isinstance(model, nn.Module) else model
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        clear_debris(run_dir)
        tmp.mkdir()
        write_files(tmp, step, weights, recipe_toml, state)
    except (OSError, RuntimeError, SafetensorError) as e:
        # The half-written files go at once (the disk may be full); the last good checkpoint is untouched.
        shutil.rmtree(tmp, ignore_errors=True)
        needed = tensor_bytes(weights) + tensor_bytes(state)
        error = disk_error(e, root, needed)
        if error is None:
            raise
        raise cannot_write(final, error, needed, what="checkpoint ") from None
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
        old = root / f".old_{final.name}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync(root)
    for stale in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        remove(stale)
    return final


def write_files(folder: Path, step: int, weights: dict, recipe_toml: str, state: dict) -> None:
    save_file(_one_name_per_tensor(weights), str(folder / "model.safetensors"))
    usual_mode(folder / "model.safetensors")
    torch.save(state, folder / "state.pt")
    (folder / RECIPE).write_text(recipe_toml)
    for name in FILES:
        fsync(folder / name)
    (folder / MARKER).write_text(json.dumps({"step": step, "files": manifest(folder)}, indent=1) + "\n")
    fsync(folder / MARKER)
    fsync(folder)


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in a nested dict / list: about what saving it takes on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def clear_debris(run_dir) -> None:
    """Remove what processes killed mid-write left: half-written checkpoints, the old copy of a
    checkpoint saved twice, hidden temporary files. Only the run's writer calls it (it holds the lock)."""
    root = Path(run_dir) / CHECKPOINTS
    for debris in [*root.glob(".tmp_step_*"), *root.glob(".old_step_*")]:
        shutil.rmtree(debris, ignore_errors=True)
    if Path(run_dir).is_dir():
        remove_stale_temporaries(run_dir)


def remove(ckpt) -> None:
    """Delete a checkpoint folder, COMPLETE first: a deletion cut short leaves a folder that no longer
    counts as a checkpoint, never one that counts and lacks its weights."""
    (Path(ckpt) / MARKER).unlink(missing_ok=True)
    fsync(ckpt)
    shutil.rmtree(ckpt, ignore_errors=True)


# Damage ----------------------------------------------------------------------------------------


class Damaged(LabError):
    """A checkpoint whose files are not what was saved."""

    def __init__(self, ckpt, problems: list[str]):
        self.ckpt, self.problems = Path(ckpt), problems
        super().__init__(f"checkpoint {ckpt} is damaged: {'; '.join(problems)}")


def manifest(folder: Path) -> dict:
    """{file: {bytes, sha256}} for every file in a checkpoint folder but COMPLETE."""
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def damage(ckpt) -> list[str]:
    """What is wrong with a complete checkpoint's files, against what COMPLETE recorded when it was
    saved; [] when nothing. (Checkpoints from before COMPLETE held a record: only that the files are
    there; reading them finds the rest.)"""
    ckpt = Path(ckpt)
    try:
        record = json.loads((ckpt / MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return [f"{MARKER} is unreadable"]
    files = record.get("files") if isinstance(record, dict) else {}
    if not isinstance(files, dict):
        return [f"{MARKER} is unreadable"]
    problems = [f"{name} is missing" for name in FILES if not (ckpt / name).is_file()]
    for name, saved in files.items():
        path = ckpt / name
        if not path.is_file():
            problems += [] if name in FILES else [f"{name} is missing"]
        elif path.stat().st_size != saved.get("bytes"):
            problems.append(f"{name} is {path.stat().st_size} bytes, {saved.get('bytes')} were written")
        elif sha256(path) != saved.get("sha256"):
            problems.append(f"{name} differs from what was written (SHA-256)")
    return problems


def newest_intact(run_dir, load=lambda ckpt: None):
    """(checkpoint, load(checkpoint)) for the newest complete checkpoint whose files are as saved
    and that `load` reads without raising Damaged; (None, None) when the run has no checkpoint. Each
    damaged one passed over gets a one-line warning; when all are damaged, a LabError lists them."""
    damaged = []
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        try:
            problems = damage(ckpt)
            if problems:
                raise Damaged(ckpt, problems)
            return ckpt, load(ckpt)
        except Damaged as e:
            damaged.append(e)
            print(f"warning: {e}; falling back to the checkpoint before it", file=sys.stderr)
    if damaged:
        listed = "; ".join(f"{e.ckpt.name}: {', '.join(e.problems)}" for e in damaged)
        raise LabError(
            f"every checkpoint in {run_dir} is damaged ({listed}). Restore the run folder from a "
            f"copy if you have one; to train again from scratch, move {Path(run_dir) / 'checkpoints'} "
            "away (it is kept for inspection) and run the same command"
        )
    return None, None


def _one_name_per_tensor(weights: dict) -> dict:
    """A tied matrix (the embedding that is also the head) is one tensor under two names, and
    safetensors stores a tensor once: keep the first name in sorted order, the one safetensors'
    save_model keeps, so every checkpoint lab ever wrote has the same keys."""
    kept, seen = {}, set()
    for name in sorted(weights):
        t = weights[name]
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and where in seen:
            continue
        seen.add(where)
        kept[name] = t.contiguous()
    return kept


def tied_names(model: nn.Module) -> list[list[str]]:
    """The names that share one parameter, a sorted list per shared parameter."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [sorted(group) for group in names.values() if len(group) > 1]


def read_weights(ckpt_dir, model: nn.Module) -> dict:
    """model.safetensors as a full state dict of model, every name of a tied matrix filled in; a
    file of another model is refused with a clear message."""
    try:
        weights = load_file(str(Path(ckpt_dir) / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise Damaged(
            ckpt_dir, [f"model.safetensors cannot be read ({str(e).splitlines()[0][:80]})"]
        ) from None
    bad = [name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise Damaged(ckpt_dir, [f"model.safetensors holds NaN or infinite values ({', '.join(bad[:3])})"])
    for group in tied_names(model):
        stored = [name for name in group if name in weights]
        for name in group if stored else []:
            weights[name] = weights[stored[0]]
    start_over = "To start over, delete or move that run folder, or set another train.out_dir"
    expected = {
        name: tuple(t.shape) for name, t in model.state_dict().items()
    }  # whole shapes, even of shards
    missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
    if missing or unexpected:
        raise LabError(
            f"the checkpoint in {ckpt_dir} does not fit the recipe's model (missing: {sorted(missing)[:4]}, "
            f"unexpected: {sorted(unexpected)[:4]}). {start_over}"
        )
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise LabError(
                f"the checkpoint in {ckpt_dir} holds a model of another shape than the recipe builds ({name} "
                f"is {tuple(weights[name].shape)} there, {shape} in the recipe's model). {start_over}"
            )
    return weights


def load_weights(ckpt_dir, model: nn.Module) -> None:
    """Load model.safetensors into a model of one process; a model of another shape is refused."""
    model.load_state_dict(read_weights(ckpt_dir, model))


def load_state(ckpt_dir) -> dict:
    """state.pt. Whatever stops torch.load is damage: its own message would suggest weights_only=False,
    which lets a file run code, and a damaged file needs no such thing."""
    try:
        state = torch.load(Path(ckpt_dir) / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and storage errors all mean the same to a user
        raise Damaged(ckpt_dir, [f"state.pt cannot be read ({type(e).__name__})"]) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise Damaged(ckpt_dir, ["state.pt holds no training state"])
    return state


# Whole state from any layout, and back --------------------------------------------------------


def gather(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(weights, optimizer state) of the whole model, keyed by parameter name, however the model is
    laid out: one process, DDP, or FSDP2 shards. Every process must call it (it gathers the shards);
    rank 0 gets the tensors, on the CPU, and the others empty dicts. model: not the DDP wrapper."""
    # Imported here: 0.4 s that `lab generate`, which reads checkpoints with read_weights, never needs.
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, not shards, on the CPU
    weights = get_model_state_dict(model, options=whole)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=whole)
    for group in tied_names(model) if weights else []:
        for name in group[1:]:  # gathering copied the tied matrix once per name: one tensor again
            weights[name] = weights[group[0]]
    return weights, optimizer_state


def restore(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict, optimizer_state: dict | None
) -> None:
    """Load what `gather` returned (or read_weights and state.pt hold) into a model and optimizer of
    any layout. With several processes only rank 0 has read the files (the others pass empty dicts):
    it sends each tensor to the others, which keep their shard of it (FSDP2) or all of it (DDP). So
    only rank 0 needs to see the run folder, and one copy of the state is in CPU memory, not one per
    process. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_model_state_dict(model, weights, options=options)
    if optimizer is not None:  # None: the weights alone, for a fresh optimizer
        set_optimizer_state_dict(
            model, optimizer, _by_name(optimizer_state, model, optimizer), options=options
        )


def _by_name(optimizer_state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Checkpoints written before lab trained on several processes key the optimizer's state by
    parameter index (optimizer.state_dict()); key it by name, as get_optimizer_state_dict does."""
    if not optimizer_state or all(isinstance(key, str) for key in optimizer_state["state"]):
        return optimizer_state
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {names[i]: state for i, state in optimizer_state["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]}
            for group in optimizer_state["param_groups"]
        ],
    }


# The [model] fields that make a model's weights mean what they mean. Others (dropout, loss_chunk)
# change only how it trains, and may change on resume.
SHAPE = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "tie_embeddings")


def check_same_shape(ckpt_dir, recipe, run_dir) -> None:
    """Refuse, before anything is built, a recipe whose model differs in shape from the checkpoint's.
    (read_weights still catches what this misses, e.g. a position component with other weights.)"""
    from lab.recipe import read_toml

    saved = read_toml(str(Path(ckpt_dir) / RECIPE)).get("model", {})
    now = recipe.model.model_dump()
    differ = [
        f"{key} {saved[key]!r} there, {now[key]!r} in the recipe"
        for key in SHAPE
        if key in saved and saved[key] != now[key]
    ]
    if differ:
        raise LabError(
            f"{run_dir} holds a checkpoint of another model shape than {recipe.source} builds "
            f"([model] {'; '.join(differ)}). To start over, move or delete {run_dir}, or set another "
            f"train.out_dir (e.g. --set train.out_dir=runs/{recipe.name}-2)"
        )


def data_states(saved, world_size: int, any_layout: bool, ckpt_dir, source: str, command) -> list[dict]:
    """The data position of each of this run's world_size processes, from a checkpoint's `saved`:
    rank r gets what rank r saved. On another number of processes, a source that can continue on
    any layout (any_layout) gets rank 0's everywhere; any other is refused, before anything is
    written. source: the data source for the message; command(n): the command that runs on n processes."""
    if isinstance(saved, dict):  # written before each process's position was kept: rank 0's alone
        return [saved] * world_size
    if len(saved) == world_size:
        return saved
    if any_layout:
        return [saved[0]] * world_size
    n = len(saved)
    raise LabError(
        f"{ckpt_dir} was saved by {n} process{'es' if n > 1 else ''} and this run has {world_size}, but "
        f"{source} cannot continue on another number of processes: each process's position in the data "
        f"is its own. Continue the run on {n} as it was:\n  {command(n)}\nor start a new run on this "
        f"layout with another train.out_dir (--set train.out_dir=...)"
    )


def rng_state(device: torch.device | None = None) -> dict:
    """Every random generator training draws from (python, numpy, torch, CUDA), as tensors and lists.
    device: the GPU training runs on, whose stream a process of a resumed distributed run continues."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore rng_state(). A distributed run saves rank 0's states and every process restores them
    (each process's GPU continues the stream of rank 0's GPU): see train.Trainer.resume."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)
