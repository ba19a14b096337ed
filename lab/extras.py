"""Extra loss terms and logged scalars from any component, during a forward.

A component calls, inside its forward,

    add_loss(self, "balance", value, weight=0.01)   # a scalar tensor; the trainer adds weight * value
    log_scalar(self, "router_entropy", value)       # a number or scalar tensor, only logged

and needs no change to its forward's signature. The model collects what its components add during
one forward (terms of one name are summed over the layers that add them; scalars of one name are
averaged); the trainer backpropagates cross-entropy + sum(weight * term), scaled by 1 / grad_accum
like the loss, and averages every term and scalar over the micro-batches and processes into
metrics.jsonl (`loss.NAME`, `NAME`) and the log line. A scalar's name may not be one metrics.jsonl
keeps for lab's own numbers (lab.runs.metrics.is_lab_field: step, tokens, val_...): the trainer
stops at the first step with a message naming the component. Validation reports the cross-entropy as the
val loss, with the terms beside it (`val_loss.NAME`).

Outside a model's forward (a component used on its own, as the conformance checks do) both calls do
nothing, unless the component is inside `collecting(module)`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from lab.errors import LabError


class Extras:
    """What the components of one model added during its latest forward."""

    def __init__(self):
        self.begin()

    def begin(self) -> None:
        self.terms: dict[str, torch.Tensor] = {}
        self.weights: dict[str, float] = {}
        self.scalars: dict[str, list] = {}
        self.owners: dict[str, str] = {}  # name -> "mlp 'moe' from package 'lab-moe'", for messages

    def add_loss(self, owner: str, name: str, value, weight: float) -> None:
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise LabError(
                f"{owner} added the extra loss '{name}' as {shape}, not a scalar tensor; "
                "reduce it to one number (e.g. .mean()) before add_loss"
            )
        value = value.float().reshape(())
        self.terms[name] = self.terms[name] + value if name in self.terms else value
        self.weights[name] = float(weight)
        self.owners[name] = owner

    def log_scalar(self, owner: str, name: str, value) -> None:
        value = (
            value.detach().float().reshape(())
            if isinstance(value, torch.Tensor)
            else torch.tensor(float(value))
        )
        self.scalars.setdefault(name, []).append(value)
        self.owners.setdefault(name, owner)

    def loss(self):
        """sum(weight * term): what the trainer adds to the cross-entropy (0 when nothing was added)."""
        return sum(self.weights[n] * t for n, t in self.terms.items())

    def values(self) -> dict[str, torch.Tensor]:
        """Every term ("loss.NAME") and scalar ("NAME") of the latest forward, detached, for the log."""
        out = {f"loss.{n}": t.detach() for n, t in self.terms.items()}
        out.update({n: torch.stack(v).to(next(iter(v)).device).mean() for n, v in self.scalars.items()})
        return out


def attach(model: nn.Module, extras: Extras) -> Extras:
    """Let every module of `model` reach `extras`, each labelled with the component it belongs to
    (Part.build labels what it builds: `lab_component`)."""

    def label(module, owner):
        owner = getattr(module, "lab_component", None) or owner
        module.__dict__["_lab_extras"] = (extras, owner)
        for child in module.children():
            label(child, owner)

    label(model, f"{type(model).__name__}")
    return extras


def add_loss(module: nn.Module, name: str, value: torch.Tensor, weight: float = 1.0) -> None:
    """Add weight * value (a scalar tensor) to the training loss of this forward; logged as loss.NAME."""
    found = getattr(module, "_lab_extras", None)
    if found is not None:
        found[0].add_loss(found[1], name, value, weight)


def log_scalar(module: nn.Module, name: str, value) -> None:
    """Log a number from this forward (averaged over the layers that log it, the micro-batches and
    the processes), as NAME in metrics.jsonl."""
    found = getattr(module, "_lab_extras", None)
    if found is not None:
        found[0].log_scalar(found[1], name, value)


@contextmanager
def collecting(module: nn.Module):
    """Collect what `module` (a component used on its own, e.g. in a test) adds while inside:
    `with collecting(mlp) as extras: mlp(x)`, then `extras.terms`, `extras.scalars`."""
    extras = attach(module, Extras())
    try:
        yield extras
    finally:
        for sub in module.modules():
            sub.__dict__.pop("_lab_extras", None)


def micro_backward(forward, model, x, y, accum: int, autocast=None, meta=None) -> dict:
    """Forward and backward of one of `accum` micro-batches: the gradient of (cross-entropy + the
    components' sum(weight * term)) / accum, as one big batch gives (DDP and FSDP2 then average it over
    the processes: the mean over the global batch). meta: the data source's per-row metadata.
    Returns the detached loss and extras."""
    with autocast or nullcontext():
        _, loss = forward(x, y, meta=meta) if meta else forward(x, y)
    extras = model.extras  # what the components added during this forward
    ((loss + extras.loss()) / accum).backward()
    return {"loss": loss.detach(), **extras.values()}
