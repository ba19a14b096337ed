"""Weights laid out for decoding: each linear layer reads its weight the way this machine's BLAS
reads fastest when only a few rows go through it.

A cached decoding step pushes one row per sample through every linear layer, so it is bound by
reading the weights, the LM head's above all (50257 x 256 floats in gpt_small). nn.Linear keeps
its weight as (out, in) and computes x @ W.T; how fast a BLAS streams that transposed matrix at one
row differs by machine: on an AMD EPYC (MKL) it ran at a sixth of the memory's speed, while the
same product against a contiguous (in, out) copy ran near it. Which layout wins is measured here,
per weight shape, on the machine that decodes, and only the winners get a copy.

The winner also depends on the rows: on that AMD EPYC the copy was twice as fast at one row and
slower at eight. So it is measured at each power of two of rows up to `rows` (a server's
--max-batch), and a layer takes the copy only for inputs whose rows round up to a power of two where
it won (a prefill of many rows keeps nn.Linear's path).

The copy is made once, for a model that no longer trains (generation, serving): the parameters,
the state dict and every other path are untouched.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn


class DecodingLinear(nn.Linear):
    """nn.Linear that, for inputs whose rows round up to a power of two in `copy_rows`, multiplies by a
    contiguous (in, out) copy of its weight. Made from an nn.Linear by lay_out_for_decoding, never
    built directly."""

    weight_t: torch.Tensor
    copy_rows: frozenset[int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if power_of_two_at_least(x.numel() // self.in_features) not in self.copy_rows:
            return F.linear(x, self.weight, self.bias)
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def lay_out_for_decoding(model: nn.Module, rows: int = 1, margin: float = 0.9) -> dict[str, str]:
    """Give every nn.Linear of `model` whose transposed-copy product takes less than `margin` x
    nn.Linear's time, at some power of two of rows up to `rows`, a (in, out) copy it uses for inputs
    of those rows. Returns {layer name: "copy" (or "copy at 1, 2 rows") or "as trained"}, for the log.
    Call it on a model that will not train again."""
    choices = {}
    measured = [2**k for k in range(power_of_two_at_least(rows).bit_length())]  # 1, 2, 4 .. >= rows
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        w = module.weight
        wins = frozenset(
            r for r in measured if transposed_is_faster(tuple(w.shape), w.dtype, str(w.device), r, margin)
        )
        if wins:
            module.__class__ = DecodingLinear  # same parameters and state dict; another forward
            module.register_buffer("weight_t", w.detach().t().contiguous(), persistent=False)
            # ignore: a plain frozenset, which nn.Module.__setattr__'s typing does not allow
            module.copy_rows = wins  # type: ignore[assignment]
        if not wins:
            choices[name] = "as trained"
        elif len(wins) == len(measured):
            choices[name] = "copy"
        else:
            choices[name] = f"copy at {', '.join(map(str, sorted(wins)))} rows"
    return choices


def power_of_two_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def transposed_is_faster(
    shape: tuple[int, int], dtype: torch.dtype, device: str, rows: int, margin: float
) -> bool:
    """Times x @ W.T (nn.Linear's layout) against x @ Wt (a contiguous copy) for `rows` rows of a
    weight of this shape; best of several calls each, interleaved so both see the same machine."""
    out_features, in_features = shape
    w = torch.randn(shape, dtype=dtype, device=device)
    wt = w.t().contiguous()
    x = torch.randn(rows, in_features, dtype=dtype, device=device)
    trained, copied = [], []
    for _ in range(7):
        trained.append(_seconds(lambda: F.linear(x, w), device))
        copied.append(_seconds(lambda: x @ wt, device))
    return min(copied) < margin * min(trained)


def _seconds(fn, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start
