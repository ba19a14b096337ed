"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"). softmax(q.k) becomes
phi(q).phi(k) with phi = elu + 1, so token i's output is

    y_i = phi(q_i) S_i / phi(q_i) . z_i,   S_i = sum_{j<=i} phi(k_j) v_j^T,   z_i = sum_{j<=i} phi(k_j)

Training computes every i at once, chunk by chunk; decoding keeps S and z as its cache: a state of
fixed size, however long the context.
"""

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from lab.errors import LabError
from lab.interfaces import Attention, dropout, mark_residual
from lab.slots import ComponentConfig


class LinearConfig(ComponentConfig):
    chunk: PositiveInt = Field(
        64, description="tokens per chunk in training: quadratic within, running sums across"
    )
    eps: PositiveFloat = Field(1e-6, description="added to the normaliser")


class LinearState:
    """The cache: sums over every token so far, in float32 (bf16 sums drift over a long context)."""

    def __init__(self, batch, n_head, head_dim, device):
        self.S = torch.zeros(batch, n_head, head_dim, head_dim, device=device)  # sum phi(k) v^T
        self.z = torch.zeros(batch, n_head, head_dim, 1, device=device)  # sum phi(k)


class LinearAttention(Attention):
    def __init__(self, config: LinearConfig, model):
        super().__init__()
        if model.kv_heads != model.n_head or model.qk_norm:
            raise LabError(
                "linear attention has one key/value head per query head and no QK-norm; "
                "unset [model] n_kv_head and qk_norm, or use a softmax attention (sdpa)"
            )
        self.n_head, self.head_dim = model.n_head, model.head_dim
        self.chunk, self.eps = config.chunk, config.eps
        self.qkv = nn.Linear(model.n_embd, 3 * model.n_embd, bias=model.bias)
        self.proj = mark_residual(nn.Linear(model.n_embd, model.n_embd, bias=model.bias))
        self.resid_drop = dropout(model.dropout)

    def forward(self, x, pos, position, cache=None):
        B, T, C = x.shape
        if position.bias(pos[:1], pos[:1]) is not None:
            raise LabError(
                "linear attention has no scores for a position bias (ALiBi) to act on; "
                'use [model.position] name = "learned" or "rope"'
            )
        qkv = self.qkv(x).float().view(B, T, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, T, hs)
        q, k = F.elu(q) + 1, F.elu(k) + 1  # positive features, so the normaliser is positive too
        # Rotary positions rotate the numerator's features only (RoFormer, section 3.3).
        qr, kr = position.rotate(q, k, pos)
        num = causal_sum(qr, kr, v, self.chunk)  # (B, nh, T, hs)
        den = causal_sum(q, k, torch.ones_like(v[..., :1]), self.chunk)  # (B, nh, T, 1)
        if cache is not None:  # add what the earlier tokens summed to, then count the new ones
            num, den = num + qr @ cache.S, den + q @ cache.z
            cache.S = cache.S + kr.transpose(-2, -1) @ v
            cache.z = cache.z + k.sum(2)[..., None]
        y = (num / (den + self.eps)).to(x.dtype).transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))

    def flops(self, batch, seq_len, backward=False):
        """Useful FLOPs of one call: the projections (8*B*T*C^2) and, per token and head, its chunk's
        masked scores and weighted sum (2 * 2*chunk*d, half masked) and the running sums (3 * 2*d*d:
        k^T v, q @ before, and the normaliser's share)."""
        C, d = self.n_head * self.head_dim, self.head_dim
        chunk = min(self.chunk, seq_len)
        projections = 8 * batch * seq_len * C * C
        mixing = batch * seq_len * self.n_head * (2 * chunk * d + 6 * d * d)
        return 3 * (projections + mixing) if backward else projections + mixing

    def new_cache(self, batch, max_len, device, dtype):
        return LinearState(batch, self.n_head, self.head_dim, device)  # fixed size: max_len unused


def causal_sum(q, k, v, chunk):
    """sum_{j<=i} (q_i . k_j) v_j for every i: (B, nh, T, d) -> (B, nh, T, dv). Masked q k^T within a
    chunk, a running sum of k^T v across chunks: memory O(T * chunk), not O(T * d * dv)."""
    B, H, T, _ = q.shape
    chunk = min(chunk, T)  # a decoding step is one chunk of one token
    n = -(-T // chunk)
    q, k, v = (F.pad(t, (0, 0, 0, n * chunk - T)).reshape(B, H, n, chunk, -1) for t in (q, k, v))
    kv = k.transpose(-2, -1) @ v  # (B, nh, n, d, dv): each chunk's sum
    before = kv.cumsum(2) - kv  # the sum over all earlier chunks
    within = ((q @ k.transpose(-2, -1)) * torch.ones(chunk, chunk, device=q.device).tril()) @ v
    return (q @ before + within).reshape(B, H, n * chunk, -1)[:, :, :T]  # padding keys come last: harmless
