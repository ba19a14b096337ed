"""Runs with different tokenizers compared in bits per byte of the same held-out text.

    python -m benchmarks.tokenizer_bpb runs/gpt_small runs/shakespeare_bpe runs/shakespeare_char

A loss per token depends on how much text a token holds, so losses of different tokenizers do not
compare; bits per byte do: each run's newest checkpoint predicts every token of its val split (the
last 10% of the shipped tinyshakespeare for `path = ""`), in windows of its block_size that do not
overlap, and the summed loss (in bits) is divided by the UTF-8 bytes that split decodes to.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import lab.runs
from lab.interfaces import DataContext


@torch.inference_mode()
def bits_per_byte(run_dir) -> dict:
    recipe, model, ckpt = lab.runs.load(run_dir)
    tokenizer = recipe.parts["tokenizer"].build()
    data = recipe.parts["data"].build(
        DataContext(recipe.model.block_size, recipe.model.vocab_size, tokenizer, 0)
    )
    val = torch.from_numpy(data.tokens["val"].astype("int64"))
    T, nats, count = recipe.model.block_size, 0.0, 0
    for start in range(0, len(val) - 1, T * 8):  # 8 windows a batch
        windows = [val[s : s + T + 1] for s in range(start, min(start + 8 * T, len(val) - 1), T)]
        windows = [w for w in windows if len(w) == T + 1]  # the tail shorter than a window is left out
        if not windows:
            break
        batch = torch.stack(windows)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        nats += loss.item() * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    text_bytes = len(tokenizer.decode(val[: count + 1].tolist()).encode())  # the text those targets cover
    steps = int(Path(ckpt).name[5:])
    return {
        "run": str(run_dir),
        "tokenizer": recipe.parts["tokenizer"].name,
        "step": steps,
        "val_loss": nats / count,
        "bytes_per_token": text_bytes / count,
        "bits_per_byte": nats / math.log(2) / text_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    for result in map(bits_per_byte, parser.parse_args().runs):
        print(
            f"{result['run']}: tokenizer {result['tokenizer']}, step {result['step']}, val loss "
            f"{result['val_loss']:.3f} per token, {result['bytes_per_token']:.2f} bytes per token, "
            f"{result['bits_per_byte']:.3f} bits per byte"
        )


if __name__ == "__main__":
    main()
