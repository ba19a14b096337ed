"""Muon (Keller Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/): SGD with Nesterov
momentum whose update, for each hidden weight matrix, is replaced by the nearest semi-orthogonal
matrix (all singular values ~1), found with a few Newton-Schulz iterations. The embedding, the head
and the vectors (gains, biases) are not hidden matrices: they get AdamW, in the same optimizer.

The math follows the published algorithm (github.com/KellerJordan/Muon): quintic Newton-Schulz with
coefficients (3.4445, -4.7750, 2.0315), 5 steps, after scaling the update to Frobenius norm 1;
Nesterov momentum 0.95; the update scaled by sqrt(max(1, rows / cols)); decoupled weight decay.

Three settings from the NanoGPT speedrun's later records: `orthogonalization = "polar_express"`
(another quintic per iteration, singular values closer to 1), `cautious_weight_decay` (decay only
where the update and the weight agree in sign, lab_optim/adamw.py) and NorMuon (the `normuon`
component: Muon, then each neuron's update divided by the root of its running mean square).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt

from lab.slots import ComponentConfig
from lab_optim.adamw import CAUTIOUS, Beta, adamw_step, decay

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # picked to raise small singular values fast, not to converge
# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932): a different quintic for each
# iteration, each the optimal one for where the singular values are by then, so 5 iterations land them
# much closer to 1 than Newton-Schulz's fixed quintic. These are the paper's coefficients for 5
# iterations (safety factor 2e-2, cushion 2), as the NanoGPT speedrun uses them; a 6th and later
# iteration repeats the last.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
Orthogonalization = Literal["newton_schulz", "polar_express"]


def orthogonalize(
    update: torch.Tensor,
    steps: int = 5,
    dtype: torch.dtype = torch.float32,
    method: Orthogonalization = "newton_schulz",
) -> torch.Tensor:
    """~U V^T of update = U S V^T, for a matrix (rows, cols) or a stack of them (..., rows, cols).
    Newton-Schulz lands the singular values in about [0.7, 1.2] rather than exactly 1, which trains as
    well; Polar Express, at the same cost, much closer to 1."""
    x = update.to(dtype)
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the wide side: X X^T is then the smaller square
        x = x.mT
    norm = x.norm(dim=(-2, -1), keepdim=True)  # spectral norm <= Frobenius norm
    if method == "polar_express":  # its coefficients assume the spectral norm below 1 by the safety factor
        x = x / (norm * (1 + 2e-2) + 1e-6)
    else:
        x = x / (norm + 1e-7)
    for i in range(steps):
        a, b, c = POLAR_EXPRESS[min(i, 4)] if method == "polar_express" else NS_COEFFICIENTS
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x  # a X + b (X X^T) X + c (X X^T)^2 X
    return x if wide else x.mT


def normalize_neurons(direction: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon's step after orthogonalising (Li et al. 2025, arXiv 2510.05491; the NanoGPT speedrun's
    NorMuon record): keep an exponential mean of each neuron's mean squared update (second_moment,
    updated in place), divide each neuron's update by its root, then rescale the whole update back to
    the orthogonalised one's Frobenius norm, so Muon's lr carries over. A neuron is a row of the
    longer side, as the record keeps them: one per row when rows >= cols, else one per column.
    The rescaling also makes a bias correction of the mean unnecessary: it cancels."""
    along = -1 if direction.size(-2) >= direction.size(-1) else -2  # average over the shorter side
    second_moment.lerp_(direction.float().square().mean(dim=along, keepdim=True), 1 - beta2)
    normalized = direction.float() * second_moment.clamp_min(1e-10).rsqrt()
    norms = direction.float().norm(dim=(-2, -1), keepdim=True)
    rescale = norms / normalized.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    return (normalized * rescale).to(direction.dtype)


def neuron_shape(p: torch.Tensor) -> tuple[int, ...]:
    """Shape of NorMuon's second moment for matrix (or stack) p: one entry per neuron (see above)."""
    shape = list(p.shape)
    shape[-1 if p.size(-2) >= p.size(-1) else -2] = 1
    return tuple(shape)


class Muon(torch.optim.Optimizer):
    """One optimizer over every parameter: groups with use_muon=True take Muon steps (lr, momentum,
    nesterov, ns_steps, orthogonalization, weight_decay, cautious; with normalize=True NorMuon's, with
    beta2), the others AdamW steps (lr, betas, eps, weight_decay, cautious)."""

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
                    adamw_step(p, self.state[p], group)
        return loss

    def _muon(self, p, group):
        state, grad, beta = self.state[p], p.grad, group["momentum"]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
            if group.get("normalize"):
                state["second_moment"] = torch.zeros(neuron_shape(p), dtype=torch.float32, device=p.device)
        momentum = state["momentum_buffer"]
        momentum.mul_(beta).add_(grad, alpha=1 - beta)
        step = grad + beta * (momentum - grad) if group["nesterov"] else momentum  # Nesterov: one step ahead
        method = group.get("orthogonalization", "newton_schulz")
        direction = orthogonalize(step, group["ns_steps"], self.ns_dtype, method).to(grad.dtype)
        if group.get("normalize"):
            direction = normalize_neurons(direction, state["second_moment"], group["beta2"])
        # Tall matrices (more outputs than inputs) get a larger step: as published.
        direction = direction * max(1.0, grad.size(-2) / grad.size(-1)) ** 0.5
        decay(p, direction, group["lr"], group["weight_decay"], group.get("cautious", False))
        p.add_(direction, alpha=-group["lr"])


class MuonConfig(ComponentConfig):
    works_on_shards: ClassVar[bool] = False  # orthogonalises whole matrices: FSDP2's shards will not do
    extra_settings: ClassVar[list[dict]] = [  # lab.testing's conformance checks run these too
        {"orthogonalization": "polar_express", "weight_decay": 0.1, "cautious_weight_decay": True}
    ]
    lr: PositiveFloat = Field(
        0.02, description="Muon's lr for hidden matrices, in units of spectral norm per step"
    )
    momentum: float = Field(0.95, ge=0.0, lt=1.0, description="Muon's momentum")
    nesterov: bool = Field(True, description="Nesterov momentum, as published")
    ns_steps: PositiveInt = Field(5, description="orthogonalisation iterations")
    orthogonalization: Orthogonalization = Field(
        "newton_schulz",
        description="newton_schulz: Muon's fixed quintic; polar_express: Polar Express's per-iteration "
        "quintics (Amsel et al. 2025), singular values closer to 1 at the same cost",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled decay of the Muon matrices")
    cautious_weight_decay: bool = Field(False, description=CAUTIOUS + "; every group's decay")
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
        description="precision of the orthogonalisation; auto: bf16 on CUDA (as published), fp32 "
        "elsewhere (CPUs without bf16 matmul units run it slower than fp32)",
    )


class NorMuonConfig(MuonConfig):
    extra_settings: ClassVar[list[dict]] = [
        {"orthogonalization": "newton_schulz", "weight_decay": 0.1, "adamw_weight_decay": 0.1}
    ]
    orthogonalization: Orthogonalization = Field(
        "polar_express", description=MuonConfig.model_fields["orthogonalization"].description
    )
    beta2: float = Field(
        0.95, ge=0.0, lt=1.0, description="decay rate of NorMuon's per-neuron mean squared update"
    )
    cautious_weight_decay: bool = Field(True, description=CAUTIOUS + "; every group's decay (as the record)")


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
        "cautious": config.cautious_weight_decay,
    }
    matrices = {
        "use_muon": True,
        "lr": config.lr,
        "momentum": config.momentum,
        "nesterov": config.nesterov,
        "ns_steps": config.ns_steps,
        "orthogonalization": config.orthogonalization,
        "weight_decay": config.weight_decay,
        "cautious": config.cautious_weight_decay,
    }
    if isinstance(config, NorMuonConfig):
        matrices.update(normalize=True, beta2=config.beta2)
    settings = {
        "muon": matrices,
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
