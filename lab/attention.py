"""Tools for writing softmax attention plugins: a K/V cache, causal masks, and a base class that
does the projections, heads, positions and cache so a plugin only writes how q attends to k, v."""
from __future__ import annotations

import torch
from torch import nn

from lab.interfaces import Attention, mark_residual


class KVCache:
    """Keys and values of the tokens seen so far, preallocated to max_len: no reallocation per token."""

    def __init__(self, batch: int, n_head: int, head_dim: int, max_len: int, device, dtype):
        shape = (batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # a Python int: reading it never syncs with the GPU

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (B, nh, T, hs); return all keys and values so far, (B, nh, length, hs)."""
        start, end = self.length, self.length + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions; asked to reach {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may see key j: j <= i (and i - j < window)."""
    seen = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        seen &= (q_pos[:, None] - k_pos[None, :]) < window
    return seen


def additive_mask(seen: torch.Tensor, bias: torch.Tensor | None, dtype) -> torch.Tensor:
    """A bool mask, plus an optional (nh, Tq, Tk) score bias, as one float mask added to the scores."""
    mask = torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(~seen, float("-inf"))
    return mask if bias is None else mask + bias.to(dtype)


class SelfAttention(Attention):
    """Multi-head self-attention with GPT-2's layout: one qkv projection, one output projection.

    Subclasses implement attend(q, k, v, q_pos, k_pos, bias) -> (B, nh, Tq, hs)."""

    def __init__(self, model):
        super().__init__()
        self.n_head, self.head_dim = model.n_head, model.head_dim
        self.qkv = nn.Linear(model.n_embd, 3 * model.n_embd, bias=model.bias)
        self.proj = mark_residual(nn.Linear(model.n_embd, model.n_embd, bias=model.bias))
        self.dropout = model.dropout
        self.resid_drop = nn.Dropout(model.dropout)

    def forward(self, x, pos, position, cache=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        q, k = position.rotate(q, k, pos)
        k_pos = pos
        if cache is not None:
            k, v = cache.update(k, v)
            k_pos = torch.arange(k.size(2), device=x.device)
        y = self.attend(q, k, v, pos, k_pos, position.bias(pos, k_pos))
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_drop(self.proj(y))

    def attend(self, q, k, v, q_pos, k_pos, bias):
        raise NotImplementedError

    def new_cache(self, batch, max_len, device, dtype):
        return KVCache(batch, self.n_head, self.head_dim, max_len, device, dtype)
