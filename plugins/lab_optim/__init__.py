"""AdamW with GPT-2's weight-decay groups."""
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, Field, PositiveFloat

from lab import hookimpl


Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class AdamWConfig(BaseModel):
    lr: PositiveFloat = Field(6e-4, description="peak learning rate (the schedule scales it)")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="Adam's moment decay rates")
    eps: PositiveFloat = Field(1e-8, description="added to the denominator")
    weight_decay: float = Field(0.1, ge=0.0, description="decoupled decay, for tensors of rank >= 2")
    implementation: Literal["auto", "fused", "foreach", "loop"] = Field(
        "auto", description="auto: fused on CUDA, foreach elsewhere"
    )


def adamw(config: AdamWConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    # Matrices (weights, embeddings) decay; vectors (biases, norm gains) do not: decaying a gain
    # toward zero only fights the normalisation.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    impl = config.implementation
    if impl == "auto":
        impl = "fused" if params and params[0].is_cuda else "foreach"
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=config.betas, eps=config.eps,
        fused=True if impl == "fused" else None, foreach=impl == "foreach",
    )


@hookimpl
def lab_components(register):
    register("optimizer", "adamw", adamw, AdamWConfig,
             "AdamW; decay for weights of rank >= 2, none for biases and gains")
