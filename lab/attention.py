"""Tools for writing softmax attention plugins: a K/V cache, causal masks, and a base class that
does the projections, heads, positions and cache so a plugin only writes how q attends to k, v."""

from __future__ import annotations

import torch
from torch import nn

from lab.interfaces import Attention, dropout, mark_residual
from lab.roles import set_role


class KVCache:
    """Keys and values of the tokens seen so far, preallocated to max_len: no reallocation per token.

    Index i along the length holds the key and value of position i. Fed 1-D positions (every row at
    the same place: generation, a prefill), it appends after `length`. Fed per-row positions (B, T)
    (a running batch whose rows are at different places, lab serve), each row writes at its own
    positions and every max_len entry comes back: a key past a row's position is hidden by the causal
    mask, so a row never sees what an earlier occupant of it left there."""

    def __init__(self, batch: int, n_head: int, head_dim: int, max_len: int, device, dtype):
        shape = (batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # a Python int: reading it never syncs with the GPU

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None = None):
        """Store k, v (B, nh, T, hs) at positions pos; return the keys and values to attend to:
        (B, nh, length, hs) after 1-D positions (or none), (B, nh, max_len, hs) after per-row ones.
        nh is the key/value heads: n_kv_head, fewer than the query heads under grouped-query attention."""
        if pos is not None and pos.dim() == 2:  # per-row positions: a scatter, no Python int to read
            at = pos[:, None, :, None].expand(-1, k.size(1), -1, k.size(3))
            self.k.scatter_(2, at, k.to(self.k.dtype))
            self.v.scatter_(2, at, v.to(self.v.dtype))
            return self.k, self.v
        start, end = self.length, self.length + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2)} positions; asked to reach {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may see key j: j <= i (and i - j < window). With per-row
    query positions (B, Tq), (B, Tq, Tk): each row's own."""
    distance = q_pos[..., :, None] - k_pos[..., None, :]
    seen = distance >= 0
    if window is not None:
        seen &= distance < window
    return seen


def additive_mask(seen: torch.Tensor, bias: torch.Tensor | None, dtype) -> torch.Tensor:
    """A bool mask, plus an optional score bias, as one float mask added to the scores (B, nh, Tq, Tk).
    seen (Tq, Tk) or per row (B, Tq, Tk); bias (nh, Tq, Tk) or per row (B, nh, Tq, Tk)."""
    if seen.dim() == 3:
        seen = seen[:, None]  # one mask for every head of a row
    mask = torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(~seen, float("-inf"))
    return mask if bias is None else mask + bias.to(dtype)


def repeat_kv(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, n_kv_head, T, hs) -> (B, n_head, T, hs): each key/value head shared by its group of
    n_head / n_kv_head query heads (grouped-query attention), as separate heads."""
    groups = n_head // x.size(1)
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class SelfAttention(Attention):
    """Multi-head self-attention with GPT-2's layout: one fused qkv projection, one output projection.

    Grouped-query attention ([model] n_kv_head < n_head; 1 is multi-query): the projection makes
    n_head query heads and n_kv_head key and value heads, ordered [q | k | v] (n_embd + 2 * n_kv_head *
    head_dim outputs), and the KV cache holds n_kv_head heads. QK-norm ([model] qk_norm = true) puts an
    RMSNorm with a learned gain over each head's q and k, before the positions rotate them.

    Subclasses implement attend(q, k, v, q_pos, k_pos, bias) -> (B, nh, Tq, hs). k and v come with
    n_head heads, each repeated for its group, unless the subclass sets `grouped_kv = True`: then
    they come with n_kv_head heads (SDPA's enable_gqa takes them so, without the copies). A subclass
    that sets `attend_with_context = True` gets the forward's context and this layer's cache too:
    attend(..., bias, ctx=ctx, cache=cache) (ctx None when called outside a model, e.g. alone in a test).

    The forward's context (lab.interfaces.ForwardContext) reaches two points, for the recipe's
    extensions: `attention_qkv(layer, x, q, k, v, ctx)` after the projections, QK-norm and rotation
    and before the cache (a V changed there is what is cached), and `attention_heads(layer, x, y, ctx)`
    on the heads' outputs before the output projection (a gate). x is the attention's input."""

    grouped_kv = False
    wants_context = True  # forward takes ctx (the model passes it); its extension points use it
    attend_with_context = False

    def __init__(self, model):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = model.n_head, model.kv_heads, model.head_dim
        self.layer = model.layer  # the block's index, which the extension points are handed
        self.kv_dim = self.n_kv_head * self.head_dim
        self.qkv = nn.Linear(model.n_embd, model.n_embd + 2 * self.kv_dim, bias=model.bias)
        self.proj = mark_residual(nn.Linear(model.n_embd, model.n_embd, bias=model.bias))
        if model.qk_norm:
            self.q_norm = set_role(nn.RMSNorm(self.head_dim, eps=1e-6), "gain")
            self.k_norm = set_role(nn.RMSNorm(self.head_dim, eps=1e-6), "gain")
        self.qk_norm = model.qk_norm
        self.dropout = model.dropout
        self.resid_drop = dropout(model.dropout)

    def forward(self, x, pos, position, cache=None, ctx=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([C, self.kv_dim, self.kv_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = position.rotate(q, k, pos)
        if ctx is not None:  # the extensions' point between the projections and the cache
            q, k, v = ctx.attention_qkv(self.layer, x, q, k, v)
        k_pos = pos
        if cache is not None:
            k, v = cache.update(k, v, pos)
            k_pos = torch.arange(k.size(2), device=x.device)  # a cache holds position i at index i
        if not self.grouped_kv:
            k, v = repeat_kv(k, self.n_head), repeat_kv(v, self.n_head)
        more = {"ctx": ctx, "cache": cache} if self.attend_with_context else {}
        y = self.attend(q, k, v, pos, k_pos, position.bias(pos, k_pos), **more)  # (B, nh, T, hs)
        if ctx is not None:
            y = ctx.run("attention_heads", self.layer, x, y)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_drop(self.proj(y))

    def attend(self, q, k, v, q_pos, k_pos, bias):
        raise NotImplementedError

    def flops(self, batch: int, seq_len: int, backward: bool = False) -> float:
        """Useful FLOPs of one call on batch x seq_len tokens (a multiply-add is 2): the projections,
        2*B*T*C*(C + 2*kv_dim) + 2*B*T*C*C, and score_flops; backward is 2x the projections and 2.5x
        the scores (FlashAttention's count: four matmuls plus q@k^T recomputed)."""
        C = self.n_head * self.head_dim
        projections = 2 * batch * seq_len * C * (C + 2 * self.kv_dim) + 2 * batch * seq_len * C * C
        scores = self.score_flops(batch, seq_len)
        return 3 * projections + 3.5 * scores if backward else projections + scores

    def score_flops(self, batch: int, seq_len: int) -> float:
        """q @ k^T and weights @ v over the (query, key) pairs a query sees: causal, T(T+1)/2 pairs,
        4*B*H*D FLOPs each. An attention that sees fewer pairs (a window) overrides this."""
        pairs = seq_len * (seq_len + 1) / 2
        return 4 * batch * self.n_head * self.head_dim * pairs

    def new_cache(self, batch, max_len, device, dtype):
        return KVCache(batch, self.n_kv_head, self.head_dim, max_len, device, dtype)


def copy_cache_rows(dst, src, dst_rows: list[int], src_rows: list[int]) -> None:
    """Copy rows src_rows of the cache `src` into rows dst_rows of `dst`, a cache of the same kind,
    maybe with more rows or a longer max_len: how a server moves a prefilled sequence into its running
    batch, or a running batch into a bigger or smaller one. Works on any cache whose state is tensor
    attributes with the row first, and the positions, where a dimension follows them, from index 0
    (KVCache's k and v; a linear attention's running sums): each is copied into the corner they share."""
    for name, value in vars(src).items():
        if not isinstance(value, torch.Tensor):
            continue  # bookkeeping (KVCache.length) is not per row
        target = getattr(dst, name)
        shared = tuple(slice(0, min(a, b)) for a, b in zip(value.shape[1:], target.shape[1:]))
        target[(dst_rows,) + shared] = value[(src_rows,) + shared].to(target.dtype)
