"""Scoring a model: bits per byte, the log-likelihood of long text in strided windows, and
multiple-choice items by the log-likelihood of each choice. `lab run` uses it for its val bits per
byte and the [eval] table; `lab eval` (plugins/lab_eval) and the lm-evaluation-harness adapter use
it on a trained run.

Bits per byte compares models whose tokenizers differ: the loss in bits, over the UTF-8 bytes of
the text the scored tokens spell, bpb = (sum of token losses in nats) / ln 2 / bytes.
"""
from __future__ import annotations

import math

import torch


def bits_per_byte(loss_nats: float, tokens: int, num_bytes: int) -> float:
    """Mean loss per token (nats) over `tokens` tokens that spell `num_bytes` bytes -> bits per byte."""
    return loss_nats / math.log(2) * tokens / num_bytes


def utf8_bytes(tokenizer, ids) -> int:
    """Bytes of the UTF-8 text that token ids decode to. ids: a list, or a tensor of any shape whose
    last dimension is a sequence (each row is decoded on its own)."""
    if isinstance(ids, torch.Tensor):
        return sum(len(tokenizer.decode(row).encode("utf-8")) for row in ids.reshape(-1, ids.size(-1)).tolist())
    return len(tokenizer.decode(list(ids)).encode("utf-8"))
