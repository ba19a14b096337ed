"""Document masking: causal attention that does not cross a document boundary inside a row.

Document ids come from the data source (`[data] documents = true`: meta["doc_ids"], reaching this
attention as ForwardContext.meta) or, when the forward has none (decoding, scoring), from the
tokens: a document starts at each end-of-text token. The cache keeps each cached token's document id
beside its key and value, so cached decoding sees exactly what the whole forward sees. On CUDA the
mask is a FlexAttention document block mask (blocks of two documents are skipped), made once per
forward and shared by the layers; elsewhere, and for cached decoding, SDPA with the mask."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, PositiveInt
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from lab.attention import KVCache, SelfAttention, additive_mask, causal_mask


class DocumentsConfig(BaseModel):
    eot_id: int | None = Field(
        None,
        description="the end-of-text token that starts a document, for forwards without the data's "
        "document ids (decoding); unset: the recipe's tokenizer's",
    )
    window: PositiveInt | None = Field(None, description="keys each token sees, itself included; unset: all")
    backend: Literal["auto", "sdpa", "flex"] = Field(
        "auto",
        description="auto: FlexAttention's document block mask on CUDA, masked SDPA elsewhere; flex: "
        "FlexAttention everywhere (on CPU without a backward in torch 2.13: for checking, in eval)",
    )

    def check_recipe(self, recipe):
        if self.eot_id is not None and not 0 <= self.eot_id < recipe.model.vocab_size:
            raise ValueError(
                f"eot_id = {self.eot_id} is outside the vocabulary (0 .. {recipe.model.vocab_size - 1})"
            )
        if self.eot_id is None:
            tokenizer = recipe.parts["tokenizer"].build()
            if tokenizer.eot_id is None:
                raise ValueError(
                    f"tokenizer '{tokenizer.name}' has no end-of-text token to find documents by: set eot_id"
                )
            self.eot_id = tokenizer.eot_id  # resolved once, and written to the run's recipe.toml


class DocumentKVCache(KVCache):
    """Keys and values, and the document id of every cached token (B, max_len)."""

    def __init__(self, batch, n_head, head_dim, max_len, device, dtype):
        super().__init__(batch, n_head, head_dim, max_len, device, dtype)
        self.docs = torch.zeros(batch, max_len, dtype=torch.long, device=device)


class DocumentAttention(SelfAttention):
    grouped_kv = True
    attend_with_context = True  # attend gets the forward's context (the ids, meta) and the cache

    def __init__(self, config: DocumentsConfig, model):
        super().__init__(model)
        self.eot_id = config.eot_id if config.eot_id is not None else 50256  # GPT-2's, when built alone
        self.window, self.backend = config.window, config.backend

    def new_cache(self, batch, max_len, device, dtype):
        return DocumentKVCache(batch, self.n_kv_head, self.head_dim, max_len, device, dtype)

    def query_docs(self, ctx, cache, q_pos) -> torch.Tensor | None:
        """(B, Tq) the document of each query: the data's, or counted from the end-of-text tokens,
        continuing the cached tokens' count."""
        if ctx is None:
            return None
        if "doc_ids" in ctx.meta:
            return ctx.meta["doc_ids"]
        docs = (ctx.ids == self.eot_id).long().cumsum(dim=1)
        start = int(q_pos[0])
        if cache is not None and start > 0:
            docs = docs + cache.docs[:, start - 1 : start]
        return docs

    def attend(self, q, k, v, q_pos, k_pos, bias, ctx=None, cache=None):
        dropout = self.dropout if self.training else 0.0
        gqa = k.size(1) != q.size(1)
        q_docs = self.query_docs(ctx, cache, q_pos)
        k_docs = q_docs
        if cache is not None and q_docs is not None:
            start = int(q_pos[0])
            cache.docs[:, start : start + q.size(2)] = q_docs
            k_docs = cache.docs[:, : k.size(2)]
        flex = (self.backend == "flex" or (self.backend == "auto" and q.is_cuda)) and q.size(2) == k.size(2)
        if flex and dropout == 0.0 and bias is None and q_docs is not None:
            block_mask = shared_block_mask(ctx, q_docs, self.window)
            return _flex_kernel(q.device.type)(q, k, v, block_mask=block_mask, enable_gqa=gqa)
        seen = causal_mask(q_pos, k_pos, self.window)  # (Tq, Tk)
        if q_docs is not None:
            seen = seen & (q_docs[:, :, None] == k_docs[:, None, :])  # (B, Tq, Tk)
            seen = seen[:, None]  # (B, 1, Tq, Tk): every head
        mask = additive_mask(seen, bias, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)


def shared_block_mask(ctx, docs: torch.Tensor, window: int | None):
    """The document block mask of this forward, made once and shared by every layer (ctx.scratch)."""
    key = ("document_block_mask", window)
    if key not in ctx.scratch:
        ctx.scratch[key] = document_block_mask(docs, window)
    return ctx.scratch[key]


@torch.compiler.disable
def document_block_mask(docs: torch.Tensor, window: int | None):
    B, T = docs.shape

    def same_document(b, h, i, j):
        seen = (j <= i) & (docs[b, i] == docs[b, j])
        return seen if window is None else seen & (i - j < window)

    return create_block_mask(same_document, B, None, T, T, device=docs.device)


@lru_cache(maxsize=None)
def _flex_kernel(device_type: str):
    # Compiled, flex is one fused kernel; uncompiled it materialises the scores.
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention
