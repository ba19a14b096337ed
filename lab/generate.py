"""Sampling from a trained model: the generation loop with its KV cache, and `lab generate`.

The caches belong to this loop: model.new_caches asks every block's attention for a cache of its
own kind (K and V for softmax attention, a running sum for linear attention...), so nothing here
knows what an attention or a position does. The prompt goes through the model once (prefill), then
each new token alone, at its absolute position.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lab.device import pick_device
from lab.errors import LabError
from lab.recipe import SEEDS


def generate(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, use_cache=True,
             eos_id=None, generator=None) -> torch.Tensor:
    """idx (B, T) prompt ids -> (B, T + new) ids, new <= max_new_tokens (fewer when every row has
    reached eos_id; a row that ends early is padded with eos_id). temperature 0 is greedy; top_k
    keeps the k likeliest tokens, top_p the likeliest whose probabilities add up to p; generator
    (a torch.Generator on the model's device) makes sampling reproducible."""
    new = list(stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      use_cache=use_cache, eos_id=eos_id, generator=generator))
    return torch.cat([idx, *new], dim=1)


@torch.inference_mode()  # no autograd bookkeeping at all: ~5% a token on CPU over no_grad
def stream(model, idx, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, use_cache=True,
           eos_id=None, generator=None):
    """Yield the next tokens, (B, 1), one step at a time: what `generate` collects, and what
    `lab generate` prints as it comes."""
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
        raise LabError(f"temperature {temperature} is too small to sample with (the logits over it overflow); "
                       "use 0 for greedy, or e.g. --temperature 0.8")
    if top_k is not None and top_k < 0:
        raise LabError(f"top_k must be >= 0 (0 keeps every token), got {top_k}; e.g. --top-k 200")
    if top_p is not None and not 0 < top_p <= 1:
        raise LabError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}; e.g. --top-p 0.9")


MIN_TEMPERATURE = 1e-4  # below it, sampling is greedy in all but float rounding; far below, logits / t overflow


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


@dataclass
class Settings:
    """What `lab generate` samples with: the flags given, else the run's [generate] table."""

    prompt: str
    num_samples: int
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float | None
    seed: int


def cli_generate(args) -> int:
    from lab.checkpoint import load_run
    from lab.decoding import lay_out_for_decoding

    device = pick_device(args.device, f"--device {args.device}", "use --device auto or cpu")
    recipe, model, ckpt = load_run(args.run_dir, device)
    s = settings(args, recipe.generate)
    tokenizer = recipe.parts["tokenizer"].build()
    ids = prompt_ids(tokenizer, s.prompt, model.config.vocab_size)
    if not args.no_cache:
        check_fits(model, len(ids), s.max_new_tokens)  # before any work, not after the first sample
    generator = torch.Generator(device=device).manual_seed(s.seed)
    print(f"{ckpt} on {device}: {s.num_samples} sample(s) of up to {s.max_new_tokens} tokens, "
          f"prompt {len(ids)} tokens", file=sys.stderr)
    if not args.no_cache:  # each step then reads every weight for a few rows: lay them out for that
        copied = sum(c == "copy" for c in lay_out_for_decoding(model, rows=s.num_samples).values())
        if copied:
            print(f"decoding reads {copied} weight(s) from a transposed copy, faster on this machine",
                  file=sys.stderr)

    # The samples are rows of one batch: on CPU the step is bound by reading the weights (the LM
    # head above all), which the rows share, so N samples cost little more than one.
    idx = torch.tensor([ids] * s.num_samples, device=device)
    started = time.perf_counter()
    rows = draw(model, tokenizer, idx, s, generator, use_cache=not args.no_cache,
                eos_id=None if args.ignore_eos else tokenizer.eot_id)
    seconds = time.perf_counter() - started
    made = sum(map(len, rows))
    print(f"{made} new tokens in {seconds:.2f} s ({made / seconds:.1f} tokens/s)", file=sys.stderr)
    if args.output:
        write_samples(args.output, [s.prompt + tokenizer.decode(row) for row in rows])
    return 0


def draw(model, tokenizer, idx, s: Settings, generator, use_cache: bool, eos_id) -> list[list[int]]:
    """Each row's new token ids, the end-of-text token and what follows it left out, printed after
    the prompt. On a terminal the first sample is shown token by token as it comes and the others
    when they are done; otherwise everything is printed at the end, the same text."""
    live = sys.stdout.isatty()
    n = idx.size(0)
    if live:
        print(f"--- sample 1/{n} ---\n{s.prompt}", end="", flush=True)
    rows: list[list[int]] = [[] for _ in range(n)]
    ended = [False] * n
    shown = ""
    for token in stream(model, idx, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                        top_p=s.top_p, use_cache=use_cache, eos_id=eos_id, generator=generator):
        for r, t in enumerate(token[:, 0].tolist()):
            ended[r] = ended[r] or t == eos_id
            if not ended[r]:
                rows[r].append(t)
        if live and not ended[0]:
            shown = _show_more(tokenizer.decode(rows[0]), shown)
    for r, row in enumerate(rows):
        text = tokenizer.decode(row)
        if live and r == 0:
            print(text[len(shown):], flush=True)
        else:
            print(f"--- sample {r + 1}/{n} ---\n{s.prompt}{text}", flush=True)
    return rows


def _show_more(text: str, shown: str) -> str:
    """Print what `text` adds to what is on screen. A token can end inside a multi-byte character,
    which decodes to U+FFFD until the next token completes it, so wait for it."""
    if text.endswith("\ufffd"):
        return shown
    sys.stdout.write(text[len(shown):])
    sys.stdout.flush()
    return text


def settings(args, defaults) -> Settings:
    """Merge the flags over the recipe's [generate] table and check what the flags brought."""
    if args.prompt is not None and args.prompt_file is not None:
        raise LabError("give --prompt or --prompt-file, not both")
    prompt = defaults.prompt if args.prompt is None else args.prompt
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LabError(f"--prompt-file {args.prompt_file} is not UTF-8 text (bad byte at offset {e.start}); "
                           "give a text file") from None
        except OSError as e:
            raise LabError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None

    def pick(flag, default):
        return default if flag is None else flag

    s = Settings(
        prompt=prompt,
        num_samples=pick(args.num_samples, defaults.num_samples),
        max_new_tokens=pick(args.max_new_tokens, defaults.max_new_tokens),
        temperature=pick(args.temperature, defaults.temperature),
        top_k=pick(args.top_k, defaults.top_k),
        top_p=pick(args.top_p, defaults.top_p),
        seed=pick(args.seed, defaults.seed),
    )
    if not SEEDS[0] <= s.seed <= SEEDS[1]:
        raise LabError(f"--seed must be between {SEEDS[0]} and {SEEDS[1]}, got {s.seed}")
    if s.num_samples < 1:
        raise LabError(f"--num-samples must be at least 1, got {s.num_samples}")
    if s.max_new_tokens < 1:
        raise LabError(f"--max-new-tokens must be at least 1, got {s.max_new_tokens}")
    check_sampling(s.temperature, s.top_k, s.top_p)
    return s


def prompt_ids(tokenizer, prompt: str, vocab_size: int) -> list[int]:
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 on the command line arrive as lone surrogates
        raise LabError("the prompt is not valid UTF-8 text; give it as UTF-8 (or use --prompt-file)") from None
    ids = tokenizer.encode(prompt)
    if not ids:
        # Nothing to continue: start where a new document starts, as GPT-2's unconditional samples do.
        if tokenizer.eot_id is None:
            raise LabError("the prompt is empty and the tokenizer has no end-of-text token to start "
                           "from; give --prompt TEXT")
        ids = [tokenizer.eot_id]
    if max(ids) >= vocab_size:
        raise LabError(f"the prompt has token id {max(ids)}, but the model's vocabulary has {vocab_size} "
                       "tokens: the run's tokenizer and model.vocab_size do not match")
    return ids




def write_samples(path: str, texts: list[str]) -> None:
    blocks = [f"--- sample {i + 1}/{len(texts)} ---\n{text}\n" for i, text in enumerate(texts)]
    try:
        Path(path).write_text("".join(blocks), encoding="utf-8")
    except OSError as e:
        raise LabError(f"cannot write -o {path}: {e.strerror}") from None
    print(f"wrote {len(texts)} sample(s) to {path}", file=sys.stderr)
