"""`lab sweep --jobs`: the same 2 variants x 3 seeds at a tiny shape, one run after another (--jobs 1)
and two at a time (--jobs 2), back to back, in fresh folders, repeated; prints each wall time and
the ratio jobs-2 / jobs-1 (the issue asks for <= ~0.6 on 2 cores).

    python benchmarks/sweep_jobs.py [--repeats 2] [--recipe recipes/tiny.toml] [--steps 60]

Not a test: a timing is never asserted. The token cache is warmed first so neither side tokenizes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def sweep(recipe: str, out: str, jobs: int, steps: int) -> float:
    command = [
        sys.executable,
        "-m",
        "lab",
        "sweep",
        recipe,
        "--vary",
        "optimizer.lr=1e-3,3e-3",
        "--seeds",
        "3",
        "--jobs",
        str(jobs),
        "--out",
        out,
        "--set",
        "train.max_tokens=0",
        "--set",
        f"train.max_steps={steps}",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny.toml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="steps per run (default 60)")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cores} cores; load average before: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lab",
                "run",
                args.recipe,
                "--set",
                "train.max_tokens=0",
                "--set",
                "train.max_steps=1",
                "--set",
                f"train.out_dir={tmp}/warm",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )  # the token cache, once
        for i in range(args.repeats):
            one = sweep(args.recipe, f"{tmp}/one-{i}", 1, args.steps)
            two = sweep(args.recipe, f"{tmp}/two-{i}", 2, args.steps)
            print(
                f"repeat {i + 1}: --jobs 1 {one:.1f} s, --jobs 2 {two:.1f} s, ratio {two / one:.2f} "
                f"(load average {os.getloadavg()[0]:.1f})"
            )


if __name__ == "__main__":
    main()
