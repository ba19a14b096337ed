"""The GPT: token embedding, position, N pre-norm residual blocks, final norm, LM head.

Which attention, MLP, norm and position it uses comes from the recipe; this file only wires them.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from lab.errors import LabError
from lab.extras import Extras, attach
from lab.fused_loss import chunked_cross_entropy, head_loss_terms, soft_cap
from lab.interfaces import ForwardContext, dropout
from lab.recipe import ModelConfig, Part, Recipe
from lab.roles import set_role


class Block(nn.Module):
    def __init__(self, config: ModelConfig, parts: dict[str, Part]):
        super().__init__()
        self.norm_1 = parts["norm"].build(config)
        self.attn = parts["attention"].build(config)
        self.norm_2 = parts["norm"].build(config)
        self.mlp = parts["mlp"].build(config)

    def forward(self, x, pos, position, cache=None, ctx: ForwardContext | None = None):
        x = x + call(self.attn, ctx, call(self.norm_1, ctx, x), pos, position, cache)
        x = x + call(self.mlp, ctx, call(self.norm_2, ctx, x))
        return x


class Caches(list):
    """One cache per block (made by its attention), and beside them `states`: each extension's
    per-sequence decoding state. Whoever decodes owns it and passes it back every step, so two
    batches decoded in turn never share anything."""

    def __init__(self, caches, states: dict):
        super().__init__(caches)
        self.states = states


def call(module, ctx, *args):
    """module(*args), with ctx=ctx for a component that asks for the forward's context."""
    if ctx is not None and getattr(module, "wants_context", False):
        return module(*args, ctx=ctx)
    return module(*args)


class GPT(nn.Module):
    def __init__(self, recipe: Recipe):
        super().__init__()
        config, parts = recipe.model, recipe.parts
        self.config = config
        assert isinstance(config.vocab_size, int)  # "auto" was resolved when the recipe was read
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.position = parts["position"].build(config)
        self.drop = dropout(config.dropout)
        # Each block's components know their layer (config.layer) and may differ by layer ([model.layers]).
        self.blocks = nn.ModuleList(
            Block(config.for_layer(i), recipe.layer(i)) for i in range(config.n_layer)
        )
        self.norm_f = parts["norm"].build(config)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Extensions ([extension.NAME]): what changes the wiring, called at the fixed points in hidden().
        self.extensions = nn.ModuleDict({part.name: part.build(config) for part in recipe.extensions})
        if config.tie_embeddings:
            # One matrix reads tokens in and writes them out: fewer parameters, and it trains better
            # at small scale (Press & Wolf 2017), as in GPT-2.
            self.head.weight = self.tok_emb.weight
        # The core's parameter roles; the components' are theirs to set (lab/roles.py).
        set_role(self.tok_emb, "embedding")
        set_role(self.head, "embedding" if config.tie_embeddings else "head")
        set_role(self.position, "position")
        self.extras = attach(self, Extras())  # extra loss terms and scalars of the latest forward
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """GPT-2's initialisation: N(0, 0.02) for linear and embedding weights, zero biases, and
        N(0, 0.02 / sqrt(2 * n_layer)) for residual projections, or zeros with model.zero_init_residual.
        Separate from __init__ so a model built on the meta device, or re-initialised, gets the same
        weights."""
        std = 0.02
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()  # norms: ones and zeros
        for module in self.modules():
            if getattr(module, "residual_projection", False) and self.config.zero_init_residual:
                nn.init.zeros_(module.weight)  # each block starts as the identity; gradients still reach it
            elif getattr(module, "residual_projection", False):
                nn.init.normal_(module.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights()  # a component with an initialisation of its own

    def forward(
        self,
        idx,
        targets=None,
        caches=None,
        start_pos: int | torch.Tensor = 0,
        last_only: bool = False,
        meta=None,
    ):
        """idx (B, T) token ids -> (logits, loss). logits are (B, T, vocab), or (B, 1, vocab) with
        last_only. With caches (from new_caches), idx holds only the new tokens, which sit at
        positions start_pos.. ; start_pos a LongTensor (B,) puts each row at its own position (a
        running batch: see `positions`). loss is None without targets. With targets and
        model.loss_chunk > 0 the loss is computed chunk by chunk and logits is None: the full logits
        are never made (see lab/fused_loss.py). meta: the data source's per-row metadata
        (ForwardContext.meta)."""
        ctx = self.context(idx, targets, caches, start_pos, meta)
        x = self.hidden(idx, caches, start_pos, ctx=ctx)
        if last_only:
            x = x[:, -1:, :]
        if targets is not None and self.config.loss_chunk:
            return None, self.fused_loss(x, targets, ctx)
        logits = self.logits(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
            head_loss_terms(logits, targets, self.chunk_hooks(ctx))  # what fused_loss computes per chunk
        return logits, loss

    def context(
        self, idx, targets=None, caches=None, start_pos: int | torch.Tensor = 0, meta=None
    ) -> ForwardContext:
        T = idx.size(1)
        return ForwardContext(
            ids=idx,
            pos=self.positions(start_pos, T, idx.device),
            start_pos=start_pos,
            targets=targets,
            meta=dict(meta or {}),
            states=getattr(caches, "states", None),
            extensions=dict(self.extensions.items()),
            head=self.logits,
            loss=self.cross_entropy,
        )

    def hidden(
        self, idx, caches=None, start_pos: int | torch.Tensor = 0, ctx: ForwardContext | None = None
    ) -> torch.Tensor:
        """idx (B, T) -> the final norm's output (B, T, C), what the LM head reads. Scoring
        (lab/inference/scoring.py) applies the head (`logits`) only at the positions it scores."""
        ctx = ctx or self.context(idx, None, caches, start_pos)
        pos = ctx.pos
        self.extras.begin()
        x = ctx.run("embed", self.tok_emb(idx))  # (B, T, C); extensions: after the token embedding
        x = self.drop(self.position.embed(x, pos))
        for i, block in enumerate(self.blocks):
            x = ctx.run("block_input", i, x)
            x = block(x, pos, self.position, None if caches is None else caches[i], ctx)
            x = ctx.run("block_output", i, x)
        return ctx.run("head", self.norm_f(x))

    def positions(self, start_pos: int | torch.Tensor, T: int, device) -> torch.Tensor:
        """The positions of T new tokens: (T,) from an int start, shared by every row; (B, T) from a
        LongTensor of per-row starts (B,), each row at its own place. Per-row positions are checked
        against max_len by whoever chose them (lab serve, on admission): reading them here would
        wait for the device at every step."""
        if isinstance(start_pos, torch.Tensor):
            return start_pos[:, None] + torch.arange(T, device=device)
        limit = self.position.max_len
        if limit is not None and start_pos + T > limit:
            raise LabError(
                f"sequence of {start_pos + T} tokens is longer than this model's positions allow "
                f"({limit}); shorten the prompt or generate fewer tokens"
            )
        return torch.arange(start_pos, start_pos + T, device=device)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states (..., C) -> (..., vocab), soft-capped when the model is."""
        return soft_cap(self.head(x), self.config.logit_softcap)

    def cross_entropy(self, x, targets) -> torch.Tensor:
        """Mean cross-entropy of the head on x (..., C) against targets (...), fused when the model is."""
        if self.config.loss_chunk:
            return chunked_cross_entropy(
                x, self.head.weight, targets, chunk=self.config.loss_chunk, softcap=self.config.logit_softcap
            )
        return F.cross_entropy(self.logits(x).flatten(0, -2).float(), targets.flatten(), ignore_index=-1)

    def fused_loss(self, x, targets, ctx: ForwardContext) -> torch.Tensor:
        """The cross-entropy through the chunked head, with the extensions' chunk_loss terms computed
        on each chunk's logits (their gradients ride on the loss's backward: lab/fused_loss.py)."""
        return chunked_cross_entropy(
            x,
            self.head.weight,
            targets,
            chunk=self.config.loss_chunk,
            softcap=self.config.logit_softcap,
            hooks=self.chunk_hooks(ctx),
        )

    def chunk_hooks(self, ctx: ForwardContext) -> list:
        """(extension, hook) pairs: each extension's chunk_loss bound to this forward's context."""
        return [
            (ext, lambda chunk, ext=ext: ext.chunk_loss(chunk, ctx))
            for ext in self.extensions.values()
            if hasattr(ext, "chunk_loss")
        ]

    def new_caches(self, batch: int, max_len: int, device=None, dtype=None) -> Caches:
        """One cache per block, made by that block's attention, for cached decoding; and each
        extension's per-sequence state (its new_state), kept beside them."""
        p = self.tok_emb.weight
        device, dtype = device or p.device, dtype or p.dtype
        caches = [b.attn.new_cache(batch, max_len, device, dtype) for b in cast(list[Block], self.blocks)]
        states = {
            name: ext.new_state(batch, max_len, device, dtype)  # type: ignore[operator]  # found by hasattr
            for name, ext in self.extensions.items()
            if hasattr(ext, "new_state")
        }
        return Caches(caches, states)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counted once when shared. non_embedding (as GPT-2 and Kaplan et al. count):
        leave out the position parameters, and the token embedding unless it doubles as the head
        (a lookup costs no FLOPs; the head does)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.position.parameters())
            if not self.config.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def active_params(self) -> int:
        """Non-embedding parameters one token passes through. A component that uses only some of its
        parameters per token (a mixture of experts) says how many with an `active_params()` method."""
        return _active(self) - (self.num_params(non_embedding=False) - self.num_params())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * H * Q * T,
        N the active parameters."""
        c = self.config
        return 6 * self.active_params() + 12 * c.n_layer * c.n_head * c.head_dim * seq_len


def _active(module: nn.Module, seen=None) -> int:
    seen = set() if seen is None else seen
    if hasattr(module, "active_params") and not isinstance(module, GPT):
        return module.active_params()  # type: ignore[operator]  # the component's own, found by hasattr
    n = sum(p.numel() for p in module.parameters(recurse=False) if id(p) not in seen and not seen.add(id(p)))
    return n + sum(_active(child, seen) for child in module.children())
