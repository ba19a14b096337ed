"""Extensions that change how the residual stream is wired, after the NanoGPT speedrun's records
(KellerJordan/modded-nanogpt) and nanochat. Each is written only through lab's documented contracts
(lab.interfaces.Extension and ForwardContext): no globals, no hooks on torch modules, no reliance on
the order in which the model calls its components beyond the documented hook points."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field, NonNegativeInt, PositiveInt
from torch import nn

from lab.extras import add_loss
from lab.interfaces import Extension, mark_residual
from lab.roles import set_role

# --- value embeddings ------------------------------------------------------------------------------


class ValueEmbeddingsConfig(BaseModel):
    tables: PositiveInt = Field(3, description="embedding tables of the values, each shared by two layers")
    layers: list[int] | None = Field(
        None,
        description="the table each layer adds to its values (-1: none), one entry per layer; "
        "unset: the speedrun's pattern, table j in layer j and in layer n_layer - tables + j",
    )

    def check_recipe(self, recipe):
        n = recipe.model.n_layer
        pattern = table_pattern(self, n)
        if len(pattern) != n:
            raise ValueError(f"layers has {len(pattern)} entries; give one per layer ([model] n_layer = {n})")
        bad = [t for t in pattern if not -1 <= t < self.tables]
        if bad:
            raise ValueError(f"layers names tables {bad}; tables are 0 .. {self.tables - 1}, or -1 for none")


def table_pattern(config: ValueEmbeddingsConfig, n_layer: int) -> list[int]:
    if config.layers is not None:
        return list(config.layers)
    pattern = [-1] * n_layer
    for j in range(min(config.tables, n_layer)):
        pattern[j] = pattern[n_layer - min(config.tables, n_layer) + j] = j
    return pattern


class ValueEmbeddings(Extension):
    """Value embeddings (the speedrun's, after the value residual of Zhou et al. 2024): a token's own
    embedding added to its attention values, v = a_l v + b_l E_t[token], with tables E_t shared
    by the layers that name them and learned per-layer weights (a_l, b_l), 0.5 each at the start.
    Acts between the projections and the cache, so the cache keeps the mixed values."""

    def __init__(self, config: ValueEmbeddingsConfig, model):
        super().__init__()
        self.pattern = table_pattern(config, model.n_layer)
        self.n_kv_head, self.head_dim = model.kv_heads, model.head_dim
        dim = self.n_kv_head * self.head_dim
        self.tables = set_role(
            nn.ModuleList(nn.Embedding(model.vocab_size, dim) for _ in range(config.tables)), "embedding"
        )
        self.mix = nn.Parameter(torch.full((model.n_layer, 2), 0.5))
        set_role(self, "vector", "mix")

    def attention_qkv(self, layer, x, q, k, v, ctx):
        table = self.pattern[layer]
        if table < 0:
            return q, k, v
        # One lookup per table and forward, shared by the layers that use it.
        key = ("value_embeddings", table)
        if key not in ctx.scratch:
            B, T = ctx.ids.shape
            looked_up = self.tables[table](ctx.ids).view(B, T, self.n_kv_head, self.head_dim)
            ctx.scratch[key] = looked_up.transpose(1, 2)  # (B, n_kv, T, hs), as v
        a, b = self.mix[layer]
        return q, k, (a * v + b * ctx.scratch[key]).to(v.dtype)


# --- U-net skips --------------------------------------------------------------------------------------


class UNetConfig(BaseModel):
    pass


class UNetSkips(Extension):
    """U-net skip connections (the speedrun's): the first half of the blocks keep their outputs,
    and block n-1-i of the second half gets block i's output added to its input with a learned
    weight (1 at the start). The outputs are kept in the forward's scratch, so decoding a token
    carries nothing from one step to the next."""

    def __init__(self, config: UNetConfig, model):
        super().__init__()
        self.n_layer, self.n_skip = model.n_layer, model.n_layer // 2
        self.weights = nn.Parameter(torch.ones(self.n_skip))

    def block_output(self, i, x, ctx):
        if i < self.n_skip:
            ctx.scratch["unet", i] = x
        return x

    def block_input(self, i, x, ctx):
        source = self.n_layer - 1 - i  # the mirror block of the first half
        if i >= self.n_layer - self.n_skip and source < self.n_skip:
            return x + self.weights[source] * ctx.scratch["unet", source]
        return x


# --- smear ------------------------------------------------------------------------------------------


class SmearConfig(BaseModel):
    gate_dims: PositiveInt = Field(12, description="embedding dimensions the gate reads")


class Smear(Extension):
    """Smear (the speedrun's): each token's embedding takes in some of the previous token's,
    x_t + lambda * sigmoid(w . x_t[:gate_dims]) * x_{t-1}, lambda learned (0 at the start). When
    decoding, the previous token's embedding is per-sequence state: kept beside the caches."""

    def __init__(self, config: SmearConfig, model):
        super().__init__()
        self.dims, self.n_embd = min(config.gate_dims, model.n_embd), model.n_embd
        self.gate = set_role(nn.Linear(self.dims, 1, bias=False), "vector")
        self.lam = nn.Parameter(torch.zeros(1))

    def new_state(self, batch, max_len, device, dtype):
        return {"previous": torch.zeros(batch, 1, self.n_embd, device=device, dtype=dtype)}

    def embed(self, x, ctx):
        state = ctx.state(self)
        previous = x[:, :-1]
        if state is not None and ctx.start_pos > 0:  # the token before this forward's first
            previous = torch.cat([state["previous"].to(x.dtype), previous], dim=1)
        if state is not None:
            state["previous"] = x[:, -1:].detach()
        shift = x.size(1) - previous.size(1)  # 1 when the first token has no previous one
        gate = torch.sigmoid(self.gate(x[:, shift:, : self.dims]))
        smeared = x[:, shift:] + self.lam * gate * previous
        return torch.cat([x[:, :shift], smeared], dim=1)


# --- per-head attention gate ------------------------------------------------------------------------


class GateConfig(BaseModel):
    gate_dims: NonNegativeInt = Field(12, description="input dimensions each gate reads; 0: all of them")


class AttentionGate(Extension):
    """A per-head sigmoid gate on attention's output (the speedrun's sparse attention gate; Qiu et al.
    2025, gated attention): head h's output at token t is scaled by sigmoid(W_l x_t[:gate_dims])_h
    before the output projection, x_t the attention's input. One gate per layer."""

    def __init__(self, config: GateConfig, model):
        super().__init__()
        self.dims = config.gate_dims or model.n_embd
        self.gates = set_role(
            nn.ModuleList(
                nn.Linear(min(self.dims, model.n_embd), model.n_head, bias=False)
                for _ in range(model.n_layer)
            ),
            "vector",
        )

    def attention_heads(self, layer, x, y, ctx):
        gate = torch.sigmoid(self.gates[layer](x[..., : self.dims]))  # (B, T, nh)
        return y * gate.transpose(1, 2).unsqueeze(-1).to(y.dtype)  # y (B, nh, T, hs)


# --- multi-token prediction ---------------------------------------------------------------------------


class MTPConfig(BaseModel):
    depth: PositiveInt = Field(1, description="extra tokens predicted: head d predicts the token d + 1 ahead")
    weight: float = Field(0.3, ge=0, description="weight of each extra head's loss in the total")


class MultiTokenPrediction(Extension):
    """Multi-token prediction (Gloeckle et al. 2024; DeepSeek-V3): head d reads the final hidden state
    through a small residual layer of its own, h + W_d rmsnorm(h), and predicts the token d + 1 places
    ahead through the model's own LM head and fused loss. Its loss is an extra term (loss.mtp_d),
    made only when the forward has targets: decoding never pays for it."""

    training_only = True  # the model computes the same function without it: export leaves it out

    def __init__(self, config: MTPConfig, model):
        super().__init__()
        self.weight = config.weight
        self.norms = nn.ModuleList(set_role(nn.RMSNorm(model.n_embd), "gain") for _ in range(config.depth))
        self.projs = nn.ModuleList(
            mark_residual(nn.Linear(model.n_embd, model.n_embd, bias=False)) for _ in range(config.depth)
        )

    def head(self, h, ctx):
        if ctx.targets is None:
            return h
        for d, (norm, proj) in enumerate(zip(self.norms, self.projs), start=1):
            ahead = torch.full_like(ctx.targets, -1)  # token t + 1 + d: the targets d further on
            ahead[:, :-d] = ctx.targets[:, d:]
            loss = ctx.cross_entropy(h + proj(norm(h)), ahead)
            add_loss(self, f"mtp_{d}", loss, weight=self.weight)
        return h


# --- z-loss --------------------------------------------------------------------------------------------


class ZLossConfig(BaseModel):
    weight: float = Field(1e-4, ge=0, description="weight of mean(lse^2) in the total (PaLM: 1e-4)")


class ZLoss(Extension):
    """z-loss (PaLM, Chowdhery et al. 2022): weight * mean over the scored tokens of log(Z)^2, Z the
    softmax's partition function, which keeps the logits from drifting. Computed on each chunk's
    log-sum-exp inside the fused loss: the full logits are never made."""

    training_only = True

    def __init__(self, config: ZLossConfig, model):
        super().__init__()
        self.weight = config.weight

    def chunk_loss(self, chunk, ctx):
        return {"z": (chunk.lse.float().square(), self.weight)}
