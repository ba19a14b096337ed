"""What a z-loss costs inside the fused chunked loss (lab/fused_loss.py): forward + backward of the
LM head and cross-entropy, with and without lab_speedrun's z_loss as a chunk_loss hook, interleaved
in one process (A B A B ...) so a busy machine slows both alike. The full logits are never made.

    python benchmarks/fused_zloss.py [--tokens 1024] [--width 384] [--vocab 50257] [--rounds 7]

Prints each variant's median seconds and the ratio z-loss / none."""

import argparse
import statistics
import time

import torch

from lab.fused_loss import chunked_cross_entropy
from lab.plugins import registry
from lab.recipe import ModelConfig
from lab.testing import build


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.width, requires_grad=True)
    w = (0.02 * torch.randn(args.vocab, args.width)).requires_grad_()
    y = torch.randint(0, args.vocab, (args.tokens,))
    model = ModelConfig(vocab_size=args.vocab, n_embd=args.width, n_head=1)
    z_loss = build(registry().get("extension", "z_loss"), model)
    hooks = [(z_loss, lambda chunk: z_loss.chunk_loss(chunk, None))]

    def step(with_z: bool) -> float:
        started = time.perf_counter()
        loss = chunked_cross_entropy(x, w, y, chunk=args.chunk, softcap=15.0, hooks=hooks if with_z else ())
        loss.backward()
        x.grad = w.grad = None
        return time.perf_counter() - started

    step(False), step(True)  # warm-up
    times = {False: [], True: []}
    for _ in range(args.rounds):
        for with_z in (False, True):
            times[with_z].append(step(with_z))
    none, z = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"tokens {args.tokens} width {args.width} vocab {args.vocab} chunk {args.chunk}, "
        f"{args.rounds} rounds interleaved, torch threads {torch.get_num_threads()}"
    )
    print(f"none    median {none * 1e3:.1f} ms  all {[round(t * 1e3) for t in times[False]]}")
    print(f"z-loss  median {z * 1e3:.1f} ms  all {[round(t * 1e3) for t in times[True]]}")
    print(f"ratio z-loss / none: {z / none:.3f}")


if __name__ == "__main__":
    main()
