"""Scoring a model: bits per byte, the log-likelihood of long text in strided windows, and
multiple-choice items by the log-likelihood of each choice. `lab run` uses it for its val bits per
byte and the [eval] table; `lab eval` (plugins/apps/lab_eval) and the lm-evaluation-harness adapter use
it on a trained run.

Bits per byte compares models whose tokenizers differ: the loss in bits, over the UTF-8 bytes of
the text the scored tokens spell, bpb = (sum of token losses in nats) / ln 2 / bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lab.data.eval_sets import Item
from lab.errors import LabError
from lab.fused_loss import padded_rows, soft_cap


def bits_per_byte(loss_nats: float, tokens: int, num_bytes: float) -> float:
    """Mean loss per token (nats) over `tokens` tokens that spell `num_bytes` bytes -> bits per byte."""
    return loss_nats / math.log(2) * tokens / num_bytes


def utf8_bytes(tokenizer, ids) -> int:
    """Bytes of the UTF-8 text that token ids decode to. ids: a list, or a tensor of any shape whose
    last dimension is a sequence (each row is decoded on its own)."""
    if isinstance(ids, torch.Tensor):
        return sum(
            len(tokenizer.decode(row).encode("utf-8")) for row in ids.reshape(-1, ids.size(-1)).tolist()
        )
    return len(tokenizer.decode(list(ids)).encode("utf-8"))


# Log-likelihoods at chosen positions ---------------------------------------------------------

HEAD_ROWS = 512  # rows of logits made at a time: (512, 50257) fp32 is 100 MB


def token_logprobs(model, idx: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor):
    """log p(target) and whether the target is the model's top token, at the positions where
    `scored` is True, in row-major order. idx, targets, scored: (B, T). The blocks run over every
    position; the LM head only over the scored ones, a few rows at a time, so the (B, T, vocab)
    logits are never held and no head work is spent on context."""
    h = model.hidden(idx)[scored]  # (n, C)
    wanted = targets[scored]
    logprobs, greedy = [], []
    vocab = model.head.weight.size(0)
    weight = padded_rows(model.head.weight)  # matmul-friendly width; the padding columns get -inf
    for start in range(0, len(wanted), HEAD_ROWS):
        logits = soft_cap(h[start : start + HEAD_ROWS] @ weight.t(), model.config.logit_softcap).float()
        logits[:, vocab:] = float("-inf")  # (rows, padded vocab)
        t = wanted[start : start + HEAD_ROWS, None]
        logprobs.append((logits.gather(1, t) - logits.logsumexp(dim=-1, keepdim=True)).squeeze(1))
        greedy.append(logits.argmax(dim=-1) == t.squeeze(1))
    if not logprobs:
        return h.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=h.device)
    return torch.cat(logprobs), torch.cat(greedy)


@dataclass(frozen=True)
class Span:
    """One row of a scoring batch: inputs ids[start:start + length] of a sequence, scored from its
    `skip`-th target on (the targets are the inputs one token later)."""

    seq: int  # which sequence
    start: int
    length: int
    skip: int


def score_spans(model, seqs: list[torch.Tensor], spans: list[Span], batch_size: int, progress=None):
    """(sum of log p, all greedy) of each span's scored targets. Spans are batched longest first,
    padded at the right (causal attention: padding never reaches an earlier position)."""
    device = next(model.parameters()).device
    results: list = [None] * len(spans)
    order = sorted(range(len(spans)), key=lambda i: -spans[i].length)
    for first in range(0, len(order), batch_size):
        rows = [spans[i] for i in order[first : first + batch_size]]
        width = rows[0].length
        idx = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.zeros_like(idx)
        scored = torch.zeros_like(idx, dtype=torch.bool)
        for r, s in enumerate(rows):
            window = seqs[s.seq][s.start : s.start + s.length + 1]
            idx[r, : s.length], targets[r, : s.length] = window[:-1], window[1:]
            scored[r, s.skip : s.length] = True
        logprobs, greedy = token_logprobs(model, idx.to(device), targets.to(device), scored.to(device))
        counts = scored.sum(dim=1).tolist()
        for r, (lp, g) in enumerate(zip(logprobs.split(counts), greedy.split(counts))):
            results[order[first + r]] = (lp.double().sum().item(), bool(g.all()))
        if progress is not None:
            progress.update(sum(counts))
    return results


# Text: loss, perplexity and bits per byte in strided windows -----------------------------------


def strided_spans(seq: int, n: int, block_size: int, stride: int) -> list[Span]:
    """Windows over a sequence of n tokens that score each of its targets (tokens 1..n-1) once, as
    Hugging Face's perplexity guide does: windows of block_size tokens start every `stride` tokens
    (the last one ends at the sequence's end), and each scores the targets the one before did not,
    with at least block_size - stride tokens of context."""
    length = min(block_size, n - 1)
    if length < 1:
        return []
    spans, scored_through = [], 0  # targets up to this position are scored
    for start in [*range(0, n - 1 - length, stride), n - 1 - length]:
        spans.append(Span(seq, start, length, skip=max(0, scored_through - start)))
        scored_through = start + length
    return spans


@dataclass
class TextScore:
    nll: float  # sum of the scored tokens' losses, in nats
    tokens: int
    bytes: int

    def to_dict(self) -> dict:
        loss = self.nll / self.tokens
        return {
            "loss": loss,
            "perplexity": math.exp(loss),
            "bpb": bits_per_byte(loss, self.tokens, self.bytes),
            "tokens": self.tokens,
            "bytes": self.bytes,
        }


@torch.inference_mode()
def score_text(
    model, tokenizer, seqs: list[list[int]], stride: int, batch_size: int = 8, desc: str | None = None
) -> TextScore:
    """Loss, perplexity and bits per byte of token sequences (documents, or one long stream), each
    scored after its first token in windows of the model's block_size with `stride`."""
    from tqdm import tqdm

    block_size = model.config.block_size
    tensors = [torch.tensor(s, dtype=torch.long) for s in seqs]
    spans = [span for i, t in enumerate(tensors) for span in strided_spans(i, len(t), block_size, stride)]
    tokens = sum(max(0, len(t) - 1) for t in tensors)
    with tqdm(total=tokens, desc=desc, unit="tok", disable=desc is None or None, leave=False) as bar:
        results = score_spans(model, tensors, spans, batch_size, bar)
    num_bytes = sum(utf8_bytes(tokenizer, t[1:].tolist()) for t in tensors if len(t) > 1)
    return TextScore(-sum(lp for lp, _ in results), tokens, num_bytes)


# Multiple choice --------------------------------------------------------------------------------


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness makes them, so both score the same
    tokens: spaces that end the context move to the continuation, the continuation's ids are those
    of the whole text past the context's, and an empty context is the end-of-text token."""
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + continuation)[len(context_ids) :]


@torch.inference_mode()
def loglikelihoods(
    model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16, progress=None
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding would write the continuation) for
    (context ids, continuation ids) pairs. A pair longer than block_size + 1 keeps its last tokens."""
    block_size = model.config.block_size
    seqs, spans = [], []
    for i, (context, continuation) in enumerate(pairs):
        seq = (context + continuation)[-(block_size + 1) :]
        seqs.append(torch.tensor(seq, dtype=torch.long))
        length = len(seq) - 1
        spans.append(Span(i, 0, length, skip=length - min(len(continuation), length)))
    return score_spans(model, seqs, spans, batch_size, progress)


def score_choices(model, tokenizer, items: list[Item], batch_size: int = 16, desc: str | None = None) -> dict:
    """acc (the choice of highest log-likelihood is the label) and acc_norm (the same, each choice's
    log-likelihood over its length in characters, lm-evaluation-harness's acc_norm) over the items."""
    from tqdm import tqdm

    pairs = [encode_pair(tokenizer, item.context, " " + choice) for item in items for choice in item.choices]
    total = sum(len(c) for _, c in pairs)
    with tqdm(total=total, desc=desc, unit="tok", disable=desc is None or None, leave=False) as bar:
        results = iter(loglikelihoods(model, pairs, batch_size, bar))
    correct = correct_norm = 0
    for item in items:
        lls = [next(results)[0] for _ in item.choices]
        correct += argmax(lls) == item.label
        correct_norm += argmax([ll / len(c) for ll, c in zip(lls, item.choices)]) == item.label
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "items": len(items)}


def argmax(values: list[float]) -> int:
    """The index of the largest value, the first one on ties (as numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


# During training: the recipe's [eval] table ---------------------------------------------------


class Evaluator:
    """Scores the [eval] table's text files and tasks; `lab run` calls it with the val loss. The files
    are read (and every mistake in them reported) when the run starts, not at its first evaluation."""

    def __init__(self, recipe, tokenizer):
        from pathlib import Path

        from lab.data.eval_sets import read_task, read_token_sequences

        cfg = recipe.eval
        self.tokenizer, self.batch_size = tokenizer, cfg.batch_size
        self.stride = cfg.stride or max(1, recipe.model.block_size // 2)
        if self.stride > recipe.model.block_size:
            raise LabError(
                f"{recipe.source} [eval] stride = {cfg.stride} is more than block_size "
                f"({recipe.model.block_size}): windows must meet. Set it to at most that, or 0"
            )
        self.texts = {Path(p).name: read_token_sequences(p, tokenizer) for p in cfg.text}
        self.tasks = {Path(p).name: read_task(p)[: cfg.limit or None] for p in cfg.tasks}

    def __bool__(self) -> bool:
        return bool(self.texts or self.tasks)

    def __call__(self, model) -> dict:
        """{"eval/NAME/METRIC": value} for every file and task (NAME: the file's name)."""
        scores = {}
        for name, seqs in self.texts.items():
            score = score_text(model, self.tokenizer, seqs, self.stride, self.batch_size).to_dict()
            scores.update({f"eval/{name}/{key}": score[key] for key in ("loss", "perplexity", "bpb")})
        for name, items in self.tasks.items():
            score = score_choices(model, self.tokenizer, items, self.batch_size)
            scores.update({f"eval/{name}/{key}": score[key] for key in ("acc", "acc_norm")})
        return scores


def describe(scores: dict) -> list[str]:
    """The log's lines for Evaluator's scores: one per file or task."""
    by_name: dict[str, list[str]] = {}
    for key, value in scores.items():
        _, name, metric = key.split("/", 2)
        by_name.setdefault(name, []).append(
            f"{metric} {value:.4f}" if metric != "perplexity" else f"{metric} {value:.2f}"
        )
    return [f"{name}: {' | '.join(parts)}" for name, parts in by_name.items()]
