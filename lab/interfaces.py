"""The small interface each slot's components meet (lab/slots.py is the table of slots: what each
factory is handed, where its recipe table sits, its optional hooks and conformance checks).
mlp and norm are plain nn.Modules, (B, T, C) -> (B, T, C); the optimizer is a torch.optim.Optimizer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Position(nn.Module):
    """Where a token is. One instance per model, handed to every attention call.

    Each hook defaults to "nothing": learned positions override embed, rotary overrides rotate,
    ALiBi overrides bias. `pos` is a 1-D LongTensor of absolute positions of the tokens in flight.
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
    linear attention.
    """

    def forward(self, x: torch.Tensor, pos: torch.Tensor, position: Position, cache: Any = None):
        raise NotImplementedError

    def new_cache(self, batch: int, max_len: int, device, dtype) -> Any:
        raise NotImplementedError


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


class DataSource:
    """Batches of token windows.

    `batch(split, step, rows)` returns (x, y) int64 tensors of shape (len(rows), block_size), y being
    x shifted by one. `rows` are this caller's rows of the step's global batch; a source that makes
    each row a pure function of (seed, split, step, row) resumes exactly and splits across
    processes for free, and its state_dict is empty. A source that truly streams keeps its
    position in state_dict(): every process's is saved in a checkpoint and handed back to the same
    rank on resume (see docs/writing-plugins.md, "Data sources").

    `any_layout`: whether a run can continue on another number of processes. True for a pure
    function of (seed, split, step, row): each process then gets rank 0's state. False (the safe
    default) for a source whose position is each process's own: a resume on another layout is
    refused with a message, before anything is written.
    """

    any_layout: bool = False

    def batch(self, split: str, step: int, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
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
    linear.residual_projection = True
    return linear
