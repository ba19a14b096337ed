"""RMSNorm (Zhang & Sennrich 2019), as in LLaMA: scale by the root mean square, no centring, no bias."""

import torch
from pydantic import Field, PositiveFloat
from torch import nn

from lab.roles import set_role
from lab.slots import ComponentConfig


class RMSNormConfig(ComponentConfig):
    eps: PositiveFloat = Field(1e-5, description="added to the mean square before the square root")


class RMSNorm(nn.Module):
    def __init__(self, config: RMSNormConfig, model):
        super().__init__()
        self.eps = config.eps
        self.weight = nn.Parameter(torch.ones(model.n_embd))
        set_role(self, "gain")

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        # The mean square in float32: in bf16 it rounds enough to shift every activation.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)
