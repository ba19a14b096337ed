"""`lab generate RUN`: sample from a trained run, with the flags over the run's [generate] table."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lab.engine.device import pick_device
from lab.errors import LabError
from lab.inference.compiled import DecodeStep
from lab.inference.sampling import check_fits, check_sampling, stream
from lab.recipe import SEEDS


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
    import lab.runs
    from lab.inference.decode_layout import lay_out_for_decoding

    device = pick_device(args.device, f"--device {args.device}", "use --device auto or cpu")
    recipe, model, ckpt = lab.runs.load(args.run_dir, device)
    s = settings(args, recipe.generate)
    tokenizer = recipe.parts["tokenizer"].build()
    ids = prompt_ids(tokenizer, s.prompt, model.config.vocab_size)
    if not args.no_cache:
        check_fits(model, len(ids), s.max_new_tokens)  # before any work, not after the first sample
    generator = torch.Generator(device=device).manual_seed(s.seed)
    print(
        f"{ckpt} on {device}: {s.num_samples} sample(s) of up to {s.max_new_tokens} tokens, "
        f"prompt {len(ids)} tokens",
        file=sys.stderr,
    )
    if not args.no_cache:  # each step then reads every weight for a few rows: lay them out for that
        copied = sum(c.startswith("copy") for c in lay_out_for_decoding(model, rows=s.num_samples).values())
        if copied:
            print(
                f"decoding reads {copied} weight(s) from a transposed copy, faster on this machine",
                file=sys.stderr,
            )

    # The samples are rows of one batch: on CPU the step is bound by reading the weights (the LM
    # head above all), which the rows share, so N samples cost little more than one.
    idx = torch.tensor([ids] * s.num_samples, device=device)
    step = None
    if args.compile:
        if args.no_cache:
            raise LabError("--compile compiles the cached decoding step; drop --no-cache")
        step = DecodeStep(model, compile=True)  # compiles on its first call, and says how long it took
    started = time.perf_counter()
    rows = draw(
        model,
        tokenizer,
        idx,
        s,
        generator,
        use_cache=not args.no_cache,
        eos_id=None if args.ignore_eos else tokenizer.eot_id,
        decode_step=step,
    )
    seconds = time.perf_counter() - started
    made = sum(map(len, rows))
    compiling = ""
    if step is not None:  # the first step's compile is start-up cost, not decoding speed
        after = max(seconds - step.compile_seconds, 1e-9)
        compiling = f"; {step.compile_seconds:.1f} s of it compiling, {made / after:.1f} tokens/s after"
    print(f"{made} new tokens in {seconds:.2f} s ({made / seconds:.1f} tokens/s{compiling})", file=sys.stderr)
    if args.output:
        write_samples(args.output, [s.prompt + tokenizer.decode(row) for row in rows])
    return 0


def draw(
    model, tokenizer, idx, s: Settings, generator, use_cache: bool, eos_id, decode_step=None
) -> list[list[int]]:
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
    for token in stream(
        model,
        idx,
        s.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        use_cache=use_cache,
        eos_id=eos_id,
        generator=generator,
        decode_step=decode_step,
    ):
        for r, t in enumerate(token[:, 0].tolist()):
            ended[r] = ended[r] or t == eos_id
            if not ended[r]:
                rows[r].append(t)
        if live and not ended[0]:
            shown = _show_more(tokenizer.decode(rows[0]), shown)
    for r, row in enumerate(rows):
        text = tokenizer.decode(row)
        if live and r == 0:
            print(text[len(shown) :], flush=True)
        else:
            print(f"--- sample {r + 1}/{n} ---\n{s.prompt}{text}", flush=True)
    return rows


def _show_more(text: str, shown: str) -> str:
    """Print what `text` adds to what is on screen. A token can end inside a multi-byte character,
    which decodes to U+FFFD until the next token completes it, so wait for it."""
    if text.endswith("\ufffd"):
        return shown
    sys.stdout.write(text[len(shown) :])
    sys.stdout.flush()
    return text


# Bounds on the work one command asks for (as lab serve bounds a request): a typo of a few zeros
# is an error, not hours of decoding.
MAX_NEW_TOKENS = 65536
MAX_SAMPLES = 4096


def settings(args, defaults) -> Settings:
    """Merge the flags over the recipe's [generate] table and check what the flags brought."""
    if args.prompt is not None and args.prompt_file is not None:
        raise LabError("give --prompt or --prompt-file, not both")
    prompt = defaults.prompt if args.prompt is None else args.prompt
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LabError(
                f"--prompt-file {args.prompt_file} is not UTF-8 text (bad byte at offset {e.start}); "
                "give a text file"
            ) from None
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
    if not 1 <= s.num_samples <= MAX_SAMPLES:
        raise LabError(f"--num-samples must be between 1 and {MAX_SAMPLES}, got {s.num_samples}")
    if not 1 <= s.max_new_tokens <= MAX_NEW_TOKENS:
        raise LabError(
            f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS}, got {s.max_new_tokens}: past that "
            "a sample (with --no-cache, or a model with rotary positions) runs for hours; for longer text, "
            "give a sample back as --prompt-file"
        )
    check_sampling(s.temperature, s.top_k, s.top_p)
    return s


def prompt_ids(tokenizer, prompt: str, vocab_size: int) -> list[int]:
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 on the command line arrive as lone surrogates
        raise LabError(
            "the prompt is not valid UTF-8 text; give it as UTF-8 (or use --prompt-file)"
        ) from None
    ids = tokenizer.encode(prompt)
    if not ids:
        # Nothing to continue: start where a new document starts, as GPT-2's unconditional samples do.
        if tokenizer.eot_id is None:
            raise LabError(
                "the prompt is empty and the tokenizer has no end-of-text token to start "
                "from; give --prompt TEXT"
            )
        ids = [tokenizer.eot_id]
    if max(ids) >= vocab_size:
        raise LabError(
            f"the prompt has token id {max(ids)}, but the model's vocabulary has {vocab_size} "
            "tokens: the run's tokenizer and model.vocab_size do not match"
        )
    return ids


def write_samples(path: str, texts: list[str]) -> None:
    blocks = [f"--- sample {i + 1}/{len(texts)} ---\n{text}\n" for i, text in enumerate(texts)]
    try:
        Path(path).write_text("".join(blocks), encoding="utf-8")
    except OSError as e:
        raise LabError(f"cannot write -o {path}: {e.strerror}") from None
    print(f"wrote {len(texts)} sample(s) to {path}", file=sys.stderr)
