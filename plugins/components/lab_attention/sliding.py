"""Sliding-window causal attention (Longformer, Mistral): each token sees itself and the
window - 1 tokens before it. On CUDA the window runs as a FlexAttention block mask, which skips the
blocks outside the window; elsewhere (FlexAttention on CPU has no backward in torch 2.13) and for
cached decoding, it is SDPA with the window as a mask.

A recipe may warm the window up, as the NanoGPT speedrun does (short windows first, the whole one
later): `[schedule.window]` names a schedule whose value at each step is the share of `window` used
(rounded up to whole tokens)."""

import math
from functools import lru_cache
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from lab.attention import SelfAttention, additive_mask, causal_mask
from lab.slots import ComponentConfig


class SlidingConfig(ComponentConfig):
    scheduled: ClassVar[tuple[str, ...]] = ("window",)  # [schedule.window] drives the window's share
    window: PositiveInt = Field(256, description="keys each token sees, itself included")
    backend: Literal["auto", "sdpa"] = Field(
        "auto", description="auto: FlexAttention on CUDA, masked SDPA elsewhere; sdpa: always masked SDPA"
    )

    def check_recipe(self, recipe):
        """A window as long as the context is plain causal attention, more slowly: surely a mistake."""
        if self.window >= recipe.model.block_size:
            raise ValueError(
                f"window = {self.window} is not shorter than [model] block_size = "
                f"{recipe.model.block_size}, so every token sees its whole context: set window "
                f'below {recipe.model.block_size}, or use full attention (name = "sdpa")'
            )


class SlidingAttention(SelfAttention):
    def __init__(self, config: SlidingConfig, model):
        super().__init__(model)
        self.window, self.backend = config.window, config.backend
        self.full_window = config.window

    def set_scheduled(self, quantity: str, share: float) -> None:
        """[schedule.window]: see share of the window, at least one token (the trainer calls this before
        each step and each evaluation)."""
        if quantity == "window":
            self.window = max(1, math.ceil(self.full_window * share))

    def score_flops(self, batch, seq_len):
        """Query i sees min(i + 1, window) keys."""
        w = min(self.window, seq_len)
        pairs = w * (w + 1) / 2 + (seq_len - w) * w
        return 4 * batch * self.n_head * self.head_dim * pairs

    def attend(self, q, k, v, q_pos, k_pos, bias):
        dropout = self.dropout if self.training else 0.0
        # Flex when q and k are the same tokens (no cache, or the prefill): positions then line up
        # with indices. It has no attention dropout.
        if self.backend == "auto" and q.is_cuda and q.size(2) == k.size(2) and dropout == 0.0:
            return flex_sliding(q, k, v, self.window, bias)
        mask = additive_mask(causal_mask(q_pos, k_pos, self.window), bias, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def flex_sliding(q, k, v, window: int, bias=None):
    """q, k, v (B, nh, T, hs) of the same T tokens -> (B, nh, T, hs), with an optional (nh, T, T) bias."""
    block_mask = _block_mask(q.size(2), window, str(q.device))
    score_mod = None if bias is None else (lambda score, b, h, i, j: score + bias[h, i, j])
    return _flex_kernel(q.device.type)(q, k, v, score_mod=score_mod, block_mask=block_mask)


@torch.compiler.disable  # built once per length, outside any compiled graph
@lru_cache(maxsize=8)
def _block_mask(T: int, window: int, device: str):
    def sliding(b, h, i, j):
        return (j <= i) & (i - j < window)

    return create_block_mask(sliding, None, None, T, T, device=device)


@lru_cache(maxsize=None)
def _flex_kernel(device_type: str):
    # Compiled, flex is one fused kernel; uncompiled (what runs on CPU) it materialises the scores.
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention
