"""Sampling from a trained model: the generation loop with its KV cache, and `lab generate`.

The caches belong to this loop: model.new_caches asks every block's attention for a cache of its
own kind (K and V for softmax attention, a running sum for linear attention...), so nothing here
knows what an attention or a position does. The prompt goes through the model once (prefill), then
each new token alone, at its absolute position.
"""

from __future__ import annotations

import math

import torch

from lab.errors import LabError


def generate(
    model,
    idx,
    max_new_tokens,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    use_cache=True,
    eos_id=None,
    generator=None,
) -> torch.Tensor:
    """idx (B, T) prompt ids -> (B, T + new) ids, new <= max_new_tokens (fewer when every row has
    reached eos_id; a row that ends early is padded with eos_id). temperature 0 is greedy; top_k
    keeps the k likeliest tokens, top_p the likeliest whose probabilities add up to p; generator
    (a torch.Generator on the model's device) makes sampling reproducible."""
    new = list(
        stream(
            model,
            idx,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            use_cache=use_cache,
            eos_id=eos_id,
            generator=generator,
        )
    )
    return torch.cat([idx, *new], dim=1)


@torch.inference_mode()  # no autograd bookkeeping at all: ~5% a token on CPU over no_grad
def stream(
    model,
    idx,
    max_new_tokens,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    use_cache=True,
    eos_id=None,
    generator=None,
    decode_step=None,
):
    """Yield the next tokens, (B, 1), one step at a time: what `generate` collects, and what
    `lab generate` prints as it comes. decode_step (a lab.inference.compiled.DecodeStep) runs the
    cached steps after the prefill, each row's position as a tensor (the compiled path)."""
    check_sampling(temperature, top_k, top_p)
    B, T = idx.shape
    if T == 0:
        raise LabError("the prompt is empty; give at least one token")
    if use_cache:
        check_fits(model, T, max_new_tokens)
        caches = model.new_caches(B, T + max_new_tokens)
    block_size = model.config.block_size
    finished = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        seq = idx
        for step in range(max_new_tokens):
            if not use_cache:  # the whole context every step, cropped to what the model was trained on
                logits, _ = model(seq[:, -block_size:], last_only=True)
            elif step == 0:  # prefill: the prompt in one pass fills every cache
                logits, _ = model(seq, caches=caches, start_pos=0, last_only=True)
            elif decode_step is not None:  # the same step, positions as a tensor: no recompile a token
                start = torch.full((B,), seq.size(1) - 1, device=idx.device)
                logits = decode_step(seq[:, -1:], start, caches)[:, None]
            else:  # only the newest token; the caches hold the rest
                logits, _ = model(seq[:, -1:], caches=caches, start_pos=seq.size(1) - 1, last_only=True)
            token = sample(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                token = token.masked_fill(finished, eos_id)
                finished |= token == eos_id
            seq = torch.cat([seq, token], dim=1)
            yield token
            if eos_id is not None and bool(finished.all()):
                return
    finally:
        model.train(was_training)


def check_sampling(temperature, top_k, top_p) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise LabError(f"temperature must be >= 0 (0 is greedy), got {temperature}; e.g. --temperature 0.8")
    if 0 < temperature < MIN_TEMPERATURE:
        raise LabError(
            f"temperature {temperature} is too small to sample with (the logits over it overflow); "
            "use 0 for greedy, or e.g. --temperature 0.8"
        )
    if top_k is not None and top_k < 0:
        raise LabError(f"top_k must be >= 0 (0 keeps every token), got {top_k}; e.g. --top-k 200")
    if top_p is not None and not 0 < top_p <= 1:
        raise LabError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}; e.g. --top-p 0.9")


MIN_TEMPERATURE = (
    1e-4  # below it, sampling is greedy in all but float rounding; far below, logits / t overflow
)


def check_fits(model, prompt_len: int, max_new_tokens: int) -> None:
    """With the cache every token keeps its absolute position, so prompt and new tokens must all fit
    in the positions the model knows (learned positions know block_size; rotary ones have no limit)."""
    limit = model.position.max_len
    if limit is None:
        return
    if prompt_len > limit:
        raise LabError(
            f"the prompt is {prompt_len} tokens; this model places at most {limit}. Shorten the prompt, "
            f"or use --no-cache, which keeps only the last {limit} tokens"
        )
    if prompt_len + max_new_tokens > limit:
        raise LabError(
            f"prompt ({prompt_len} tokens) + --max-new-tokens ({max_new_tokens}) is more than the {limit} "
            f"positions this model knows; lower --max-new-tokens to {limit - prompt_len}, or use --no-cache, "
            f"which slides a {limit}-token window along"
        )


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits, ids = candidates(logits.float() / temperature, top_k, top_p)
    choice = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)
    return ids.gather(-1, choice)


def candidates(logits, top_k=None, top_p=None):
    """The tokens sampling draws from: (logits, ids), each (B, n). n is top_k when given (drawing
    among k tokens, not over the whole vocabulary, saves a millisecond a token on CPU), else the
    vocabulary. Tokens outside the nucleus (the fewest likeliest whose probabilities reach top_p)
    get -inf; the likeliest token always stays."""
    if top_k and top_k < logits.size(-1):
        logits, ids = torch.topk(logits, top_k, dim=-1)
    else:
        ids = torch.arange(logits.size(-1), device=logits.device).expand_as(logits)
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the likelier tokens
        drop_sorted = before >= top_p  # the set already reached top_p without this token
        drop_sorted[..., 0] = False  # a top_p too small for float32 (1e-320 is 0 there) must not drop all
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to the candidates' order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits, ids


# ---------------------------------------------------------------------------------- lab generate
