"""Mixture of experts (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2021; Mixtral): a
router sends each token to its top_k of n_experts MLPs and mixes their outputs by the router's
probabilities. Parameters grow with n_experts, the compute per token only with top_k.

Every token reaches its top_k experts: none is dropped for capacity. The experts are computed one
expert at a time over the tokens routed to it (a loop over experts, never over tokens). The router is
kept balanced by Switch's load-balancing loss, n_experts * sum_e f_e * P_e (f_e: share of the
routed slots that went to expert e, P_e: mean router probability of e), which is 1 when balanced,
and optionally ST-MoE's router z-loss, mean(logsumexp(router logits)^2), both added to the training
loss through lab.extras.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch import nn

from lab.extras import add_loss, log_scalar
from lab.interfaces import dropout
from lab.roles import declare_role, set_role
from lab.slots import ComponentConfig

ROUTER = declare_role("router", "a mixture of experts' router: which experts each token goes to")


class MoEConfig(ComponentConfig):
    # lab.testing checks these too, beside the defaults: Switch's top-1 with a z-loss, every expert.
    extra_settings: ClassVar[list[dict]] = [
        {"n_experts": 4, "top_k": 1, "normalize": False, "z_loss_coef": 1e-3, "activation": "relu2"},
        {"n_experts": 4, "top_k": 4},
    ]
    n_experts: PositiveInt = Field(8, description="experts per layer")
    top_k: PositiveInt = Field(2, description="experts each token is sent to")
    expansion: PositiveFloat = Field(
        2.0,
        description="each expert's hidden width as a multiple of n_embd "
        "(2 with top_k 2: the active parameters of a 4x dense MLP)",
    )
    activation: Literal["gelu", "relu2"] = Field("gelu", description="the experts' nonlinearity")
    balance_coef: float = Field(0.01, ge=0.0, description="weight of the load-balancing loss (Switch: 0.01)")
    z_loss_coef: float = Field(0.0, ge=0.0, description="weight of the router z-loss (ST-MoE: 0.001); 0: off")
    normalize: bool = Field(True, description="renormalise the top_k probabilities to sum to 1 (Mixtral)")

    @model_validator(mode="after")
    def _k_within_experts(self):
        if self.top_k > self.n_experts:
            raise ValueError(
                f"top_k ({self.top_k}) must be at most n_experts ({self.n_experts}): a token "
                f"cannot go to more experts than there are; set top_k <= {self.n_experts}"
            )
        return self


class MoE(nn.Module):
    def __init__(self, config: MoEConfig, model):
        super().__init__()
        E, C = config.n_experts, model.n_embd
        H = max(1, round(config.expansion * C))
        self.n_experts, self.top_k, self.hidden = E, config.top_k, H
        self.config = config
        self.n_layer, self.zero_init = model.n_layer, model.zero_init_residual
        self.router = set_role(nn.Linear(C, E, bias=False), ROUTER)
        # Each expert's matrices laid out as nn.Linear's, (out, in): expert e is
        # act(x @ w_fc[e].T) @ w_proj[e].T, and an optimizer sees (E, out, in) stacks of matrices.
        self.w_fc = nn.Parameter(torch.empty(E, H, C))
        self.w_proj = nn.Parameter(torch.empty(E, C, H))
        self.drop = dropout(model.dropout)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """GPT-2's: N(0, 0.02), the output projections scaled down by sqrt(2 * n_layer) (or zero)."""
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.normal_(self.w_fc, std=0.02)
        if self.zero_init:
            nn.init.zeros_(self.w_proj)
        else:
            nn.init.normal_(self.w_proj, std=0.02 / math.sqrt(2 * self.n_layer))

    def active_params(self) -> int:
        """Parameters one token goes through: the router and top_k experts."""
        return self.router.weight.numel() + self.top_k * (self.w_fc[0].numel() + self.w_proj[0].numel())

    def route(self, x):
        """x (N, C) -> (logits (N, E), probs (N, E), weights (N, k), experts (N, k))."""
        logits = self.router(x).float()  # routing decisions in fp32, also under autocast
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.config.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights, experts

    def expert(self, e: int, x):
        h = x @ self.w_fc[e].to(x.dtype).t()
        h = F.gelu(h, approximate="tanh") if self.config.activation == "gelu" else F.relu(h).square()
        return h @ self.w_proj[e].to(x.dtype).t()

    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)
        logits, probs, weights, experts = self.route(flat)
        # The routed (token, slot) pairs grouped by expert, each group in token order: one sort, and
        # one read of the counts on the host for every expert (not a nonzero, and a sync, per expert).
        slots = experts.flatten()  # slot i is token i // top_k's
        order = slots.argsort(stable=True)
        counts = torch.bincount(slots, minlength=self.n_experts)
        out = torch.zeros_like(flat)
        for e, routed in enumerate(
            order.split(counts.tolist())
        ):  # each expert takes all its tokens in one matmul
            if routed.numel():
                token = routed // self.top_k
                y = self.expert(e, flat[token]) * weights.flatten()[routed, None].to(flat.dtype)
                out.index_add_(0, token, y)
        self.add_router_losses(logits, probs, experts, counts)
        return self.drop(out.view(B, T, C))

    def add_router_losses(self, logits, probs, experts, counts) -> None:
        """Summed over the layers by lab.extras; logged as loss.balance and loss.router_z."""
        add_loss(self, "balance", self.balance_loss(probs, experts), weight=self.config.balance_coef)
        if self.config.z_loss_coef:
            add_loss(self, "router_z", self.z_loss(logits), weight=self.config.z_loss_coef)
        # The busiest expert's share of the routed slots: 1 / n_experts when balanced.
        log_scalar(self, "expert_max_share", counts.max() / experts.numel())

    def balance_loss(self, probs, experts):
        """Switch's: E * sum_e (share of routed slots to e) * (mean probability of e). 1 when uniform."""
        counts = torch.zeros(self.n_experts, device=probs.device).scatter_add_(
            0, experts.flatten(), torch.ones(experts.numel(), device=probs.device)
        )
        share = counts / experts.numel()
        return self.n_experts * (share * probs.mean(dim=0)).sum()

    @staticmethod
    def z_loss(logits):
        return torch.logsumexp(logits, dim=-1).square().mean()
