"""AdamW with its weight-decay groups made from the parameters' roles (lab/roles.py), and the pieces
Muon and NorMuon share with it: AdamW's step written out, and decoupled weight decay, cautious or not.

Cautious weight decay (Chen et al. 2025, "Cautious Weight Decay", arXiv 2510.12402; the NanoGPT
speedrun's NorMuon record uses it): decay a coordinate only where the update and the parameter agree
in sign, i.e. where the step already moves the parameter toward zero. Where they disagree, plain
decay would pull against the step the optimizer chose.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat

from lab.slots import ComponentConfig

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]

CAUTIOUS = (
    "cautious weight decay: decay a coordinate only where the update and the parameter agree in sign "
    "(Chen et al. 2025, arXiv 2510.12402)"
)


def decay(p: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float, cautious: bool) -> None:
    """Decoupled weight decay of p, in place, before p -= lr * update: p -= lr * wd * p, everywhere or,
    cautious, only where update * p >= 0 (update: what is subtracted from p, so the step and the
    decay both move p toward zero there)."""
    if weight_decay == 0:
        return
    if cautious:
        p.sub_(p * (update * p >= 0), alpha=lr * weight_decay)
    else:
        p.mul_(1 - lr * weight_decay)


def adamw_step(p: torch.Tensor, state: dict, group: dict) -> None:
    """torch.optim.AdamW's step on p (amsgrad off), written out; group["cautious"]: cautious decay."""
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    beta1, beta2 = group["betas"]
    state["step"] += 1
    t = state["step"].item()
    state["exp_avg"].lerp_(p.grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
    step_size = group["lr"] / (1 - beta1**t)
    cautious = group.get("cautious", False)
    # The update's sign is the first moment's: only cautious decay needs it, so only then is it made.
    decay(p, state["exp_avg"] if cautious else p, group["lr"], group["weight_decay"], cautious)
    p.addcdiv_(state["exp_avg"], denom, value=-step_size)


class LoopAdamW(torch.optim.Optimizer):
    """AdamW one parameter at a time (adamw_step): what `adamw` builds with cautious weight decay,
    which torch.optim.AdamW does not have."""

    def __init__(self, groups: list[dict], **defaults):
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    adamw_step(p, self.state[p], group)
        return loss


class AdamWConfig(ComponentConfig):
    extra_settings: ClassVar[list[dict]] = [{"cautious_weight_decay": True}]  # lab.testing checks these too
    lr: PositiveFloat = Field(6e-4, description="peak learning rate (the schedule scales it)")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="Adam's moment decay rates")
    eps: PositiveFloat = Field(1e-8, description="added to the denominator")
    weight_decay: float = Field(0.1, ge=0.0, description="decoupled decay, for every role but no_decay_roles")
    no_decay_roles: list[str] = Field(
        ["vector", "gain", "bias"], description="parameter roles that get no weight decay (lab.roles.ROLES)"
    )
    cautious_weight_decay: bool = Field(False, description=CAUTIOUS + "; runs AdamW's loop implementation")
    implementation: Literal["auto", "fused", "foreach", "loop"] = Field(
        "auto", description="auto: fused on CUDA, foreach elsewhere (loop with cautious_weight_decay)"
    )


def adamw(config: AdamWConfig, params, model) -> torch.optim.Optimizer:
    # Matrices and embeddings decay; vectors (biases, norm gains) do not: decaying a gain toward zero
    # only fights the normalisation. On GPT-2 these are the groups of nanoGPT's rank rule.
    no_decay = set(config.no_decay_roles)
    groups = [
        {
            "name": "decay",
            "params": [p.param for p in params if p.role not in no_decay],
            "weight_decay": config.weight_decay,
        },
        {"name": "no_decay", "params": [p.param for p in params if p.role in no_decay], "weight_decay": 0.0},
    ]
    settings = {"lr": config.lr, "betas": config.betas, "eps": config.eps}
    if config.cautious_weight_decay:
        return LoopAdamW(groups, **settings, cautious=True)
    impl = config.implementation
    if impl == "auto":
        impl = "fused" if params and params[0].param.is_cuda else "foreach"
    return torch.optim.AdamW(
        groups, **settings, fused=True if impl == "fused" else None, foreach=impl == "foreach"
    )
