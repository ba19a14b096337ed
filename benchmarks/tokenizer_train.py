"""`lab tokenizer train` beside Hugging Face tokenizers called directly on the same file, same settings.

    python -m benchmarks.tokenizer_train --mb 100          # the figure in the README
    pytest benchmarks/test_tokenizer_train.py              # the same at a few MB, in the benchmark summary

The input is the shipped tinyshakespeare followed by Python's own library sources until it reaches
the size asked for (made once under $TMPDIR; nothing is downloaded). tokenizers' `train(files)` reads
the file in Rust; lab reads it in Python, in pieces cut between lines, as `lab prepare` does, and
feeds them to the same trainer (`train_from_iterator`). The two runs alternate, so a busy machine
slows both alike.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import tempfile
import time
from pathlib import Path

from lab_memmap.embedded import CORPUS
from lab_tokenizer_train.train import bpe_trainer, train_bpe, untrained_bpe


def corpus(mb: int) -> Path:
    path = Path(tempfile.gettempdir()) / f"lab-tokenizer-bench-{mb}mb.txt"
    if path.exists() and path.stat().st_size >= mb << 20:
        return path
    sources = [CORPUS] + sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    with open(path.with_suffix(".tmp"), "w") as out:
        written = 0
        while written < mb << 20:
            for source in sources:
                written += out.write(source.read_text(errors="replace") + "\n")
                if written >= mb << 20:
                    break
    os.replace(path.with_suffix(".tmp"), path)
    return path


def direct(path: Path, vocab_size: int):
    tokenizer = untrained_bpe()
    tokenizer.train([str(path)], trainer=bpe_trainer(vocab_size))
    return tokenizer


def lab(path: Path, vocab_size: int):
    with tempfile.TemporaryDirectory() as out:
        written, _ = train_bpe([path], out, vocab_size, progress=False)
        import tokenizers

        return tokenizers.Tokenizer.from_file(str(written))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    path = corpus(args.mb)
    times: dict[str, list[float]] = {"tokenizers direct": [], "lab tokenizer train": []}
    results = {}
    for _ in range(args.rounds):
        for name, fn in (("tokenizers direct", direct), ("lab tokenizer train", lab)):
            started = time.perf_counter()
            results[name] = fn(path, args.vocab_size)
            times[name].append(time.perf_counter() - started)
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    a, b = (set(r.get_vocab()) for r in results.values())
    print(
        f"{path.stat().st_size / 2**20:.0f} MB, vocab {args.vocab_size}, {os.cpu_count()} cores; best of "
        f"{args.rounds}: "
        + ", ".join(f"{n} {min(t):.1f} s" for n, t in times.items())
        + f"; lab/direct {min(times['lab tokenizer train']) / min(times['tokenizers direct']):.2f}; "
        f"vocabularies share {len(a & b) / len(a):.1%} of tokens"
    )


if __name__ == "__main__":
    main()
