"""Attention written out: scores, mask, softmax, weighted sum. Slow, obvious, the reference."""

import math

import torch.nn.functional as F

from lab.attention import SelfAttention, additive_mask, causal_mask
from lab.slots import ComponentConfig


class ManualConfig(ComponentConfig):
    pass


class ManualAttention(SelfAttention):
    def __init__(self, config: ManualConfig, model):
        super().__init__(model)

    def attend(self, q, k, v, q_pos, k_pos, bias):
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, Tq, Tk)
        scores = scores + additive_mask(causal_mask(q_pos, k_pos), bias, scores.dtype)
        weights = F.softmax(scores, dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        return weights @ v  # (B, nh, Tq, hs)
