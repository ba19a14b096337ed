"""lab's decoding beside Hugging Face transformers' `generate` on the same model, prompts and tokens.

    python benchmarks/hf_generate.py                  # a random-init gpt_small-shaped run
    python benchmarks/hf_generate.py --run runs/gpt_small

The run is exported with `lab export-hf` and loaded with transformers' GPT2LMHeadModel. Eight
prompts of eight lengths (serve_load.py's first eight, 5 to 54 tokens) each make `--tokens` new
tokens, greedy, past any end-of-text:
- batch 1: the prompts one after another. lab: `lab generate`'s loop (eager, decoding layout for one
  row), and lab serve's engine with one row (its model laid out as `lab serve --max-batch 8` lays
  it out: for up to 8 rows);
- batch 8: the eight together. lab: lab serve's engine (rows at their own positions; its step
  compiled where that is faster than eager on this machine, as lab serve does);
  transformers: left-padded with an attention mask, as its docs say for batched generation.
Compiles happen before the clock starts (their time is printed). Tokens/s is new tokens over the
wall time; the greedy tokens are checked to be the same. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.serve_load import prompts, random_gpt_small  # noqa: E402
from lab.engine.peak import processor_name  # noqa: E402


def lab_engine(model, batch: list[list[int]], tokens: int, max_batch: int) -> list[list[int]]:
    """Greedy tokens of every prompt through lab serve's running batch (its compiled step)."""
    from lab_serve.batcher import Job

    out = [[] for _ in batch]
    left, done = [len(batch)], threading.Event()

    def end(reason):
        left[0] -= 1
        if left[0] == 0:
            done.set()

    engine = ENGINES[max_batch]
    jobs = [
        Job(p, tokens, lambda t, r=r: out[r].append(t) or True, end, temperature=0)
        for r, p in enumerate(batch)
    ]
    engine.submit(jobs)
    done.wait()
    return out


ENGINES = {}


def prepare_engine(model, max_batch: int, length: int):
    """lab serve's batcher with its bucket (max_batch rows, `length` positions) compiled."""
    from lab_serve.batcher import Batcher

    engine = Batcher(model, max_batch=max_batch, eos_id=None, compile=True)
    began = time.perf_counter()
    engine.step_fn.prepare(max_batch, length)
    while not engine.step_fn.ready:
        time.sleep(0.2)
    ENGINES[max_batch] = engine
    return time.perf_counter() - began


def hf_generate(hf, batch: list[list[int]], tokens: int, pad: int) -> list[list[int]]:
    width = max(map(len, batch))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return out[:, width:].tolist()


def timed(fn):
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="a run folder (default: a random-init gpt_small-shaped one)")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)
    from transformers import GPT2LMHeadModel

    import lab.runs
    from lab.inference.decode_layout import lay_out_for_decoding
    from lab.inference.sampling import generate
    from lab_hf.export_hf import export_hf

    tmp = tempfile.TemporaryDirectory()
    run = args.run or random_gpt_small(Path(tmp.name) / "gpt_small")
    hf_dir = export_hf(run, Path(tmp.name) / "hf")
    recipe, model, _ = lab.runs.load(run, "cpu")
    model.eval()
    served = copy.deepcopy(model)
    lay_out_for_decoding(model, rows=1)  # what lab generate does for one sample
    lay_out_for_decoding(served, rows=8)  # what `lab serve --max-batch 8` does: layouts for <= 8 rows
    tok = recipe.parts["tokenizer"].build()
    batch = [tok.encode(t) for t in prompts()[:8]]
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    length = 64
    while length < max(map(len, batch)) + args.tokens:
        length *= 2
    print(f"CPU: {processor_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    print(
        f"run {run} ({'given' if args.run else 'random init'}), prompts of {sorted(map(len, batch))} tokens"
    )
    c1 = prepare_engine(served, 1, length)
    c8 = prepare_engine(served, 8, length)
    print(f"compiling lab's step: {c1:.1f} s (1 row), {c8:.1f} s (8 rows), before the clock")
    n = args.tokens * len(batch)
    results = {}
    with torch.inference_mode():

        def lab_eager_b1():
            return [
                generate(model, torch.tensor([p]), args.tokens, temperature=0)[0, len(p) :].tolist()
                for p in batch
            ]

        runs = {
            "lab generate, eager, batch 1": lab_eager_b1,
            "lab serve engine, batch 1": lambda: [lab_engine(served, [p], args.tokens, 1)[0] for p in batch],
            "transformers generate, batch 1": lambda: [
                hf_generate(hf, [p], args.tokens, tok.eot_id)[0] for p in batch
            ],
            "lab serve engine, batch 8": lambda: lab_engine(served, batch, args.tokens, 8),
            "transformers generate, batch 8": lambda: hf_generate(hf, batch, args.tokens, tok.eot_id),
        }
        for name, fn in runs.items():
            fn() if name.startswith("transformers") else None  # transformers' first call sets itself up
            out, seconds = timed(fn)
            results[name] = (out, seconds)
            print(f"{name:40s} {n / seconds:8.1f} tokens/s ({n} tokens in {seconds:.2f} s)", flush=True)
    for e in ENGINES.values():
        e.close()
    reference = results["lab generate, eager, batch 1"][0]
    for name, (out, _) in results.items():
        same = sum(a == b for a, b in zip(out, reference))
        print(f"{name}: {same}/{len(batch)} prompts give lab generate's greedy tokens")
    for b in ("1", "8"):
        lab_s = results[f"lab serve engine, batch {b}"][1]
        hf_s = results[f"transformers generate, batch {b}"][1]
        print(f"batch {b}: lab serve engine {hf_s / lab_s:.2f}x transformers' tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
