from torch import nn

from lab.interfaces import Position
from lab.slots import ComponentConfig


class LearnedConfig(ComponentConfig):
    pass


class LearnedPosition(Position):
    """One learned vector per position, added to the token embedding. Knows block_size positions."""

    def __init__(self, config: LearnedConfig, model):
        super().__init__()
        self.wpe = nn.Embedding(model.block_size, model.n_embd)
        self.max_len = model.block_size

    def embed(self, x, pos):
        return x + self.wpe(pos)  # (B, T, C) + (T, C)
