"""ALiBi (Press et al. 2022): no position in the embeddings; each head adds -slope * distance to
its scores, so farther keys count less, at a rate that differs per head. No limit on length."""

import math

import torch

from lab.interfaces import Position
from lab.slots import ComponentConfig


class AlibiConfig(ComponentConfig):
    pass


def alibi_slopes(n_head: int) -> torch.Tensor:
    """The paper's slopes: for 2^m heads, 2^(-8/2^m * i) for i = 1..n. Otherwise those of the power
    of two below n, then every other slope of the next power of two up."""

    def geometric(n):
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    below = 2 ** math.floor(math.log2(n_head))
    slopes = geometric(below) + geometric(2 * below)[0::2][: n_head - below]
    return torch.tensor(slopes)


class AlibiPosition(Position):
    def __init__(self, config: AlibiConfig, model):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(model.n_head), persistent=False)

    def init_weights(self):
        self.slopes.copy_(alibi_slopes(self.slopes.numel()))  # e.g. after building on the meta device

    def bias(self, q_pos, k_pos):
        distance = (q_pos[:, None] - k_pos[None, :]).float()  # (Tq, Tk); future keys are masked anyway
        return -self.slopes[:, None, None] * distance  # (nh, Tq, Tk)
