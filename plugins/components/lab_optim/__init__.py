"""AdamW, its weight-decay groups made from the parameters' roles (lab/roles.py); Muon."""

from typing import Annotated, Literal

import torch
from pydantic import Field, PositiveFloat

from lab import hookimpl
from lab.slots import ComponentConfig
from lab_optim.muon import MuonConfig, muon

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class AdamWConfig(ComponentConfig):
    lr: PositiveFloat = Field(6e-4, description="peak learning rate (the schedule scales it)")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="Adam's moment decay rates")
    eps: PositiveFloat = Field(1e-8, description="added to the denominator")
    weight_decay: float = Field(0.1, ge=0.0, description="decoupled decay, for every role but no_decay_roles")
    no_decay_roles: list[str] = Field(
        ["vector", "gain", "bias"], description="parameter roles that get no weight decay (lab.roles.ROLES)"
    )
    implementation: Literal["auto", "fused", "foreach", "loop"] = Field(
        "auto", description="auto: fused on CUDA, foreach elsewhere"
    )


def adamw(config: AdamWConfig, params, model) -> torch.optim.AdamW:
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
    impl = config.implementation
    if impl == "auto":
        impl = "fused" if params and params[0].param.is_cuda else "foreach"
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        fused=True if impl == "fused" else None,
        foreach=impl == "foreach",
    )


@hookimpl
def lab_components(register):
    register(
        "optimizer",
        "adamw",
        adamw,
        AdamWConfig,
        "AdamW; weight decay for every parameter role but vectors, gains and biases",
    )
    register(
        "optimizer",
        "muon",
        muon,
        MuonConfig,
        "Muon (orthogonalised momentum) for hidden matrices, AdamW for embedding, head and vectors",
    )
