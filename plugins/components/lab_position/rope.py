"""Rotary positions (Su et al. 2021, RoFormer): q and k are rotated by an angle proportional to
their position, so the score q_i . k_j depends only on i - j. Nothing is added to the embeddings
and there are no parameters, so any length works."""

import torch
from pydantic import Field, PositiveFloat

from lab.errors import LabError
from lab.interfaces import Position
from lab.slots import ComponentConfig


class RopeConfig(ComponentConfig):
    theta: PositiveFloat = Field(10000.0, description="base of the angle frequencies; larger reaches farther")
    fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="share of each head's dims that rotate (GPT-NeoX rotates 0.25)"
    )


class RotaryPosition(Position):
    def __init__(self, config: RopeConfig, model):
        super().__init__()
        self.theta = config.theta
        self.dims = int(model.head_dim * config.fraction) // 2 * 2  # rotated in pairs
        if self.dims == 0:
            raise LabError(
                f"[model.position] fraction = {config.fraction} of head_dim {model.head_dim} "
                "rotates no dims; raise fraction or head_dim (n_embd / n_head)"
            )
        # Not a learned weight and not saved: recomputed from theta, on whatever device the model is.
        self.register_buffer("inv_freq", torch.empty(self.dims // 2), persistent=False)
        self.init_weights()

    def init_weights(self):
        self.inv_freq.copy_(self.theta ** -(torch.arange(0, self.dims, 2, dtype=torch.float32) / self.dims))

    def rotate(self, q, k, pos):
        angles = pos.float()[:, None] * self.inv_freq[None, :]  # (T, dims/2)
        cos, sin = angles.cos(), angles.sin()
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x, cos, sin):
        # Pairs (i, i + dims/2) as in GPT-NeoX / HF LLaMA; angles in float32 even for bf16 inputs,
        # since a bf16 angle is off by whole radians at long positions.
        rot, rest = x[..., : self.dims].float(), x[..., self.dims :]
        a, b = rot.chunk(2, dim=-1)
        rot = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return torch.cat((rot.to(x.dtype), rest), dim=-1)
