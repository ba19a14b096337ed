from pydantic import Field, PositiveFloat
from torch import nn

from lab.roles import set_role
from lab.slots import ComponentConfig


class LayerNormConfig(ComponentConfig):
    eps: PositiveFloat = Field(1e-5, description="added to the variance before the square root")


def layernorm(config: LayerNormConfig, model) -> nn.LayerNorm:
    # model.bias = false drops the bias too, as in nanoGPT: slightly faster, no worse
    return set_role(nn.LayerNorm(model.n_embd, eps=config.eps, bias=model.bias), "gain", "weight")
