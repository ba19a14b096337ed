from typing import Literal

from pydantic import Field, PositiveInt
from torch import nn

from lab.interfaces import dropout, mark_residual
from lab.slots import ComponentConfig


class GeluConfig(ComponentConfig):
    expansion: PositiveInt = Field(4, description="hidden width as a multiple of n_embd")
    approximate: Literal["tanh", "none"] = Field(
        "tanh", description="GPT-2 uses the tanh approximation of GELU"
    )


class GeluMLP(nn.Module):
    def __init__(self, config: GeluConfig, model):
        super().__init__()
        hidden = config.expansion * model.n_embd
        self.fc = nn.Linear(model.n_embd, hidden, bias=model.bias)
        self.act = nn.GELU(approximate=config.approximate)
        self.proj = mark_residual(nn.Linear(hidden, model.n_embd, bias=model.bias))
        self.drop = dropout(model.dropout)

    def forward(self, x):
        return self.drop(self.proj(self.act(self.fc(x))))
