"""The small interface each slot's components meet (lab/slots.py is the table of slots: what each
factory is handed, where its recipe table sits, its optional hooks and conformance checks).
mlp and norm are plain nn.Modules, (B, T, C) -> (B, T, C); the optimizer is a torch.optim.Optimizer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


class Position(nn.Module):
    """Where a token is. One instance per model, handed to every attention call.

    Each hook defaults to "nothing": learned positions override embed, rotary overrides rotate,
    ALiBi overrides bias. `pos` is a LongTensor of absolute positions of the tokens in flight: 1-D
    (T,), shared by every row, or per row (B, T) when the rows of a batch are at different places
    (lab serve's running batch). Every hook takes both; per row, bias returns (B, nh, Tq, Tk).
    """

    max_len: int | None = None  # longest sequence it can place; None = no limit

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, C) -> embeddings that carry position."""
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor):
        """q, k (B, nh, T, hs) at positions pos -> rotated q, k."""
        return q, k

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        """An additive bias on the attention scores, (nh, Tq, Tk), or None."""
        return None


class Attention(nn.Module):
    """Causal self-attention: (B, T, C) -> (B, T, C).

    With a cache (made by this attention's `new_cache` and owned by the caller, one per layer),
    forward takes only the new tokens, at positions `pos`, and attends to everything cached so far.
    The attention decides what its cache holds: K and V for softmax attention, a running sum for
    linear attention. An attention that sets `wants_context = True` is called with the forward's
    context as well, `forward(x, pos, position, cache, ctx=ctx)` (a ForwardContext).
    `pos` may be per row, (B, T): each row then attends to its own cached tokens
    up to its own position, as if decoded alone (docs/writing-plugins.md, "Per-row positions").
    """

    wants_context = False

    def forward(self, x: torch.Tensor, pos: torch.Tensor, position: Position, cache: Any = None):
        raise NotImplementedError

    def new_cache(self, batch: int, max_len: int, device, dtype) -> Any:
        raise NotImplementedError


@dataclass(eq=False)
class ForwardContext:
    """What one forward of the GPT knows beyond the residual stream. The model makes one per forward
    and hands it to every extension hook, and to each attention, MLP or norm whose class sets
    `wants_context = True` (called as `module(..., ctx=ctx)`); the others never see it.

    ids        (B, T) the token ids in flight (with caches: only the new ones)
    pos        (T,) their absolute positions, start_pos .. start_pos + T - 1
    start_pos  tokens already in the caches (0 without caches)
    targets    (B, T) the next tokens when the forward has them (training, validation), else None
    meta       per-row metadata from the data source (DataSource.batch's third value), each a (B, T)
               tensor aligned with ids, e.g. meta["doc_ids"]; {} when decoding
    scratch    a dict that lives for this forward only: work shared between layers (a block mask
               made once, a table lookup) or between hooks (U-net skips kept by early blocks)
    states     extension name -> the per-sequence decoding state its `new_state` made, passed back
               every step beside the KV caches; None when the forward has no caches
    """

    ids: torch.Tensor
    pos: torch.Tensor
    start_pos: int | torch.Tensor = 0
    targets: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    scratch: dict = field(default_factory=dict)
    states: dict | None = None
    extensions: dict = field(default_factory=dict)  # name -> Extension, in the recipe's order
    head: Callable | None = None  # h (..., C) -> logits (..., vocab), soft-cap included
    loss: Callable | None = None  # (h, targets) -> mean cross-entropy through the fused head

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's LM head on hidden states (..., C) -> (..., vocab), soft-capped if the model is."""
        assert self.head is not None  # the model sets it
        return self.head(h)

    def cross_entropy(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the LM head on h (B, T, C) against targets (B, T) (-1: ignored),
        through the model's fused chunked loss when it has one: a second head's loss (multi-token
        prediction) without the full logits."""
        assert self.loss is not None  # the model sets it
        return self.loss(h, targets)

    def state(self, extension: nn.Module) -> Any:
        """This extension's per-sequence state for this forward, or None when decoding without
        caches or training (the state lives beside the caches, never on the module)."""
        if self.states is None:
            return None
        for name, ext in self.extensions.items():
            if ext is extension:
                return self.states.get(name)
        return None

    # The hook points, called by the model (embed, block_input, block_output, head) and by
    # lab.attention.SelfAttention (attention_qkv, attention_heads): each extension that has the
    # method, in the recipe's order, gets what the previous one returned.
    def run(self, hook: str, *args):
        """Each extension's `hook(*args, ctx)` in turn, the last argument being the value passed on."""
        *fixed, value = args
        for ext in self.extensions.values():
            method = getattr(ext, hook, None)
            if method is not None:
                value = method(*fixed, value, self)
        return value

    def attention_qkv(self, layer: int, x, q, k, v):
        for ext in self.extensions.values():
            method = getattr(ext, "attention_qkv", None)
            if method is not None:
                q, k, v = method(layer, x, q, k, v, self)
        return q, k, v


class Extension(nn.Module):
    """A change to how the model is wired: any number per recipe ([extension.NAME] tables), each an
    nn.Module built by `factory(config, model)` (model: the [model] table) whose parameters train
    with the model and are saved in its checkpoints. Every method is optional; the model calls
    those an extension has, at fixed points, in the recipe's order, each returning what it was given
    (changed or not):

    embed(x, ctx) -> x                        the token embedding (B, T, C), before the position's
    block_input(i, x, ctx) -> x               the residual stream entering block i
    block_output(i, x, ctx) -> x              the residual stream leaving block i
    head(h, ctx) -> h                         the final norm's output, what the LM head reads; may
                                              add loss terms (lab.extras.add_loss)
    attention_qkv(layer, x, q, k, v, ctx)     inside lab.attention.SelfAttention, between the
        -> (q, k, v)                          projections (q, k normed and rotated) and the cache:
                                              v changed here is what the cache keeps. x: the
                                              attention's input. q (B, nh, T, hs), k, v (B, n_kv, T, hs)
    attention_heads(layer, x, y, ctx) -> y    the heads' outputs (B, nh, T, hs), before the output
                                              projection (a gate); x: the attention's input
    chunk_loss(chunk, ctx) -> {name: (values, weight)}
                                              a loss on the logits, computed chunk by chunk inside
                                              the fused loss (lab.fused_loss.Chunk): values per row
    new_state(batch, max_len, device, dtype)  per-sequence decoding state, made with the caches and
        -> state                              handed back each step as ctx.state(self)

    An extension that changes only the training loss, not what the model computes (a z-loss, extra
    prediction heads), sets the class attribute `training_only = True`: `lab export-hf` may then
    leave it out, where it refuses a model with any other extension.
    """

    training_only = False


@dataclass(frozen=True)
class ChatTemplate:
    """How a model trained on conversations saw them: each message as `turn` with {role} and
    {content} filled in, then `reply` opens the assistant's turn, which ends at any of `stop`.
    E.g. turn = "<|{role}|>\n{content}<|end|>\n", reply = "<|assistant|>\n", stop = ("<|end|>",)."""

    turn: str
    reply: str
    stop: tuple[str, ...] = ()

    def render(self, messages: list[dict]) -> str:
        return "".join(self.turn.format(role=m["role"], content=m["content"]) for m in messages) + self.reply


class Tokenizer:
    """Text <-> token ids.

    A tokenizer built from files the user made (a trained tokenizer.json, a character list) names them
    in files(): a run folder keeps copies, so the run still generates, exports and resumes after the
    originals move (lab.runs.tokenizer_files), and `lab prepare` records the fingerprint in meta.json, so
    a run refuses tokens made by another vocabulary.
    """

    name: str
    vocab_size: int
    eot_id: int | None  # the end-of-text token put between documents, if the tokenizer has one
    # A tokenizer of a model trained on conversations says how they were laid out; without one
    # (GPT-2's BPE, plain text) `lab serve` refuses chat completions rather than guess a format.
    chat_template: ChatTemplate | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def files(self) -> dict[str, Path]:
        """The files it was built from, keyed by the Config setting that names each, e.g.
        {"path": Path("tok/tokenizer.json")}. Built with that setting pointing at a copy of the file,
        it must be the same tokenizer. {}: it needs no file but its package's."""
        return {}

    def fingerprint(self) -> str:
        """Identifies the vocabulary: the same ids mean the same text exactly when fingerprints match.
        By default a hash of the name, the size and the bytes of files()."""
        h = hashlib.sha256(f"{self.name}\0{self.vocab_size}\0{self.eot_id}".encode())
        for setting, path in sorted(self.files().items()):
            h.update(f"\0{setting}\0".encode() + Path(path).read_bytes())
        return h.hexdigest()[:16]

    def hf_json(self) -> str | None:
        """The tokenizer as a Hugging Face tokenizer.json, for `lab export-hf`; None: it has none."""
        return None


@dataclass(frozen=True)
class DataContext:
    """What a data source needs to know about the run it feeds.

    The process layout: this process is `rank` of `world_size` (torchrun's RANK and WORLD_SIZE; 0 of
    1 without torchrun). A step's global batch has `rows_per_step` rows (batch_size x grad_accum x
    world_size); each process asks for its own: micro-batch m of rank r is rows
    (m * world_size + r) * batch_size ... + batch_size, asked for in order m = 0, 1, ...
    """

    block_size: int
    vocab_size: int
    tokenizer: Tokenizer
    seed: int
    rank: int = 0
    world_size: int = 1
    rows_per_step: int = 1


# What a data source's batch gives: (x, y), or (x, y, meta) with per-row metadata such as doc_ids.
Batch = tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class DataSource:
    """Batches of token windows.

    `batch(split, step, rows)` returns (x, y) int64 tensors of shape (len(rows), block_size), y being
    x shifted by one, or (x, y, meta): meta a dict of per-row metadata, each a tensor (len(rows),
    block_size) aligned with x (e.g. meta["doc_ids"], from `document_ids`), which reaches the model's
    components as ForwardContext.meta. `rows` are this caller's rows of the step's global batch; a
    source that makes each row a pure function of (seed, split, step, row) resumes exactly and splits across
    processes for free, and its state_dict is empty. A source that truly streams keeps its
    position in state_dict(): every process's is saved in a checkpoint and handed back to the same
    rank on resume (see docs/writing-plugins.md, "Data sources").

    `any_layout`: whether a run can continue on another number of processes. True for a pure
    function of (seed, split, step, row): each process then gets rank 0's state. False (the safe
    default) for a source whose position is each process's own: a resume on another layout is
    refused with a message, before anything is written.
    """

    any_layout: bool = False

    def batch(self, split: str, step: int, rows: range) -> Batch:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Schedule:
    """The learning-rate multiplier as a pure function of the step: lr = base_lr * schedule(step).

    No hidden state, so resuming at any step gives the same learning rate.
    """

    def __call__(self, step: int) -> float:
        raise NotImplementedError


class Logger:
    """Where a run's numbers also go, beside metrics.jsonl (TensorBoard, W&B...). Rank 0 builds each
    logger the recipe names before training (so a missing package stops the run before it starts), opens
    it once the run folder exists, and hands it every record metrics.jsonl gets."""

    def open(self, run_dir, recipe: dict, first_step: int) -> None:
        """Start writing. recipe: the resolved recipe. first_step > 0: a resumed run, which logs the
        steps from first_step on again (after its checkpoint); a logger that can should replace them."""

    def log(self, record: dict) -> None:
        """One metrics.jsonl record: {"step", ...numbers}, a training step's or an evaluation's."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and close; called when the run ends or stops."""


def dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity when p is 0 (every shipped recipe): a Dropout that does nothing
    still costs a dispatch per call, ~6 us, which a cached decoding step pays a dozen times a token."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def mark_residual(linear: nn.Module) -> nn.Module:
    """Mark a layer whose output is added to the residual stream (attention and MLP output
    projections). GPT-2 initialises these with std 0.02 / sqrt(2 * n_layer), so the residual
    stream's variance does not grow with depth."""
    # ignore: a plain flag, which nn.Module.__setattr__'s typing (tensors and modules only) does not allow
    linear.residual_projection = True  # type: ignore[assignment]
    return linear


def document_ids(x: torch.Tensor, eot_id: int, max_len: int | None = None) -> torch.Tensor:
    """(B, T) token ids -> (B, T) document ids, for document masking: a new document starts at each
    end-of-text token (which opens the document after it, so the first token of a document is
    predicted from the end-of-text alone), and, with max_len, every max_len tokens into a document
    (a long document is cut into pieces that attend only within themselves). Ids count up from 0 in
    each row."""
    starts = x == eot_id
    if max_len:
        doc = starts.long().cumsum(dim=1)
        # Index of each token within its document: distance to the latest start (or the row's start).
        index = torch.arange(x.size(1), device=x.device).expand_as(x)
        last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        offset = index - last_start
        return doc * (x.size(1) + 1) + offset // max_len  # unique per (document, piece), increasing
    return starts.long().cumsum(dim=1)
