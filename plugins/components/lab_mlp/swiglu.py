"""SwiGLU (Shazeer 2020), LLaMA's feed-forward block: down(silu(gate(x)) * up(x))."""

import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn

from lab.interfaces import dropout, mark_residual
from lab.slots import ComponentConfig


class SwiGLUConfig(ComponentConfig):
    hidden: NonNegativeInt = Field(
        0, description="hidden width; 0: LLaMA's rule from expansion and multiple_of"
    )
    expansion: PositiveFloat = Field(
        4.0, description="the GELU MLP's width multiple that SwiGLU matches in parameters"
    )
    multiple_of: PositiveInt = Field(256, description="round the hidden width up to this, for fast matmuls")


def hidden_width(config: SwiGLUConfig, n_embd: int) -> int:
    """Three matrices instead of two, so LLaMA takes 2/3 of the GELU MLP's width: same parameters."""
    if config.hidden:
        return config.hidden
    width = int(2 * config.expansion * n_embd / 3)
    return config.multiple_of * -(-width // config.multiple_of)  # round up


class SwiGLU(nn.Module):
    def __init__(self, config: SwiGLUConfig, model):
        super().__init__()
        hidden = hidden_width(config, model.n_embd)
        # gate and up as one matrix: one matmul instead of two
        self.fc = nn.Linear(model.n_embd, 2 * hidden, bias=model.bias)
        self.proj = mark_residual(nn.Linear(hidden, model.n_embd, bias=model.bias))
        self.drop = dropout(model.dropout)

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.drop(self.proj(F.silu(gate) * up))
