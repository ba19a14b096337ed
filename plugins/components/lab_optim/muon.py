"""Muon (Keller Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/): SGD with Nesterov
momentum whose update, for each hidden weight matrix, is replaced by the nearest semi-orthogonal
matrix (all singular values ~1), found with a few Newton-Schulz iterations. The embedding, the head
and the vectors (gains, biases) are not hidden matrices: they get AdamW, in the same optimizer.

The math follows the published algorithm (github.com/KellerJordan/Muon): quintic Newton-Schulz with
coefficients (3.4445, -4.7750, 2.0315), 5 steps, after scaling the update to Frobenius norm 1;
Nesterov momentum 0.95; the update scaled by sqrt(max(1, rows / cols)); decoupled weight decay.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt

from lab.slots import ComponentConfig

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # picked to raise small singular values fast, not to converge


def orthogonalize(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """~U V^T of update = U S V^T, for a matrix (rows, cols) or a stack of them (..., rows, cols).
    The singular values land in about [0.7, 1.2] rather than exactly 1, which trains as well."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the wide side: X X^T is then the smaller square
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x  # a X + b (X X^T) X + c (X X^T)^2 X
    return x if wide else x.mT


def muon_direction(grad, momentum, beta: float, nesterov: bool, steps: int, dtype) -> torch.Tensor:
    """Update the momentum buffer in place and return the orthogonalised, shape-scaled direction."""
    momentum.mul_(beta).add_(grad, alpha=1 - beta)
    step = grad + beta * (momentum - grad) if nesterov else momentum  # Nesterov: look one step ahead
    direction = orthogonalize(step, steps, dtype).to(grad.dtype)
    # Tall matrices (more outputs than inputs) get a larger step: as published.
    return direction * max(1.0, grad.size(-2) / grad.size(-1)) ** 0.5


class Muon(torch.optim.Optimizer):
    """One optimizer over every parameter: groups with use_muon=True take Muon steps (lr, momentum,
    nesterov, ns_steps, weight_decay), the others AdamW steps (lr, betas, eps, weight_decay)."""

    def __init__(self, groups: list[dict], ns_dtype: torch.dtype = torch.float32):
        self.ns_dtype = ns_dtype
        super().__init__(groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_muon"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p, group):
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        direction = muon_direction(
            p.grad,
            state["momentum_buffer"],
            group["momentum"],
            group["nesterov"],
            group["ns_steps"],
            self.ns_dtype,
        )
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-group["lr"])

    def _adamw(self, p, group):
        """torch.optim.AdamW's step, written out (amsgrad off)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))


class MuonConfig(ComponentConfig):
    works_on_shards: ClassVar[bool] = False  # orthogonalises whole matrices: FSDP2's shards will not do
    lr: PositiveFloat = Field(
        0.02, description="Muon's lr for hidden matrices, in units of spectral norm per step"
    )
    momentum: float = Field(0.95, ge=0.0, lt=1.0, description="Muon's momentum")
    nesterov: bool = Field(True, description="Nesterov momentum, as published")
    ns_steps: PositiveInt = Field(5, description="Newton-Schulz iterations")
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled decay of the Muon matrices")
    muon_roles: list[str] = Field(
        ["matrix"],
        description="parameter roles Muon steps (rank >= 2 only); every other parameter gets AdamW",
    )
    embedding_lr: PositiveFloat = Field(
        0.01, description="AdamW lr of the token embedding (and the head when tied)"
    )
    head_lr: PositiveFloat = Field(0.004, description="AdamW lr of an untied LM head")
    adamw_lr: PositiveFloat = Field(
        0.004, description="AdamW lr of the other parameters: gains, biases, positions, routers..."
    )
    adamw_betas: tuple[Beta, Beta] = Field(
        (0.8, 0.95), description="AdamW's moment decay rates (modded-nanogpt's)"
    )
    adamw_eps: PositiveFloat = Field(1e-10, description="AdamW's denominator floor")
    adamw_weight_decay: float = Field(0.0, ge=0.0, description="decoupled decay of the AdamW groups")
    ns_dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="precision of Newton-Schulz; auto: bf16 on CUDA (as published), fp32 elsewhere "
        "(CPUs without bf16 matmul units run it slower than fp32)",
    )


def muon(config: MuonConfig, params, model) -> Muon:
    """Muon for the hidden matrices, AdamW for the rest, grouped by role, each group named for the log."""
    muon_roles = set(config.muon_roles)
    groups = {"muon": [], "embedding": [], "head": [], "adamw": []}
    for p in params:
        if p.role in muon_roles and p.param.dim() >= 2:
            groups["muon"].append(p.param)
        else:
            groups[p.role if p.role in ("embedding", "head") else "adamw"].append(p.param)
    adamw = {
        "use_muon": False,
        "betas": config.adamw_betas,
        "eps": config.adamw_eps,
        "weight_decay": config.adamw_weight_decay,
    }
    settings = {
        "muon": {
            "use_muon": True,
            "lr": config.lr,
            "momentum": config.momentum,
            "nesterov": config.nesterov,
            "ns_steps": config.ns_steps,
            "weight_decay": config.weight_decay,
        },
        "embedding": {**adamw, "lr": config.embedding_lr},
        "head": {**adamw, "lr": config.head_lr},
        "adamw": {**adamw, "lr": config.adamw_lr},
    }
    on_cuda = any(p.param.is_cuda for p in params)
    dtype = (
        torch.bfloat16
        if config.ns_dtype == "bf16" or (config.ns_dtype == "auto" and on_cuda)
        else torch.float32
    )
    return Muon(
        [{"name": name, "params": ps, **settings[name]} for name, ps in groups.items() if ps], ns_dtype=dtype
    )
