"""Race two recipes on this machine: each trained for several seeds, the runs interleaved (A, B,
A, B...) so that the machine's load falls on both alike; then, side by side, the median over seeds of

  - the final val loss, and the training time (the sum of the step times the trainer logged:
    startup, tokenization and evaluations left out, for both alike);
  - the time the challenger took to reach the reference's final val loss (linear between its
    evaluations), as a fraction of the reference's training time;
  - the challenger's val loss at the reference's training time, and at the reference's step count.

    python -m benchmarks.race recipes/gpt_small.toml recipes/modern_small.toml --seeds 1 2 3

Each run goes to runs/race/<recipe>-seed<S> (an existing finished run is read, not re-trained:
delete the folder to measure again). An ablation races variants of the challenger too, each with
its own overrides, and prints a row per variant (the challenger without each technique in turn):

    python -m benchmarks.race recipes/modern_small.toml recipes/speedrun_small.toml --seeds 1 \
        --ablate no_smear ~extension.smear --ablate no_polar_express optimizer.orthogonalization=newton_schulz

An override '~section.table' removes that table (lab's `--drop`). Evaluations every
--eval-interval steps (10) for both recipes, the same val batches as the recipe's. The load average
is printed with each run: on a shared machine wall-clock times are noisy, so compare the step
counts too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run(recipe: str, seed: int, args, name: str = "", sets: tuple[str, ...] = ()) -> Path:
    out = Path(args.out) / f"{Path(recipe).stem}{'-' + name if name else ''}-seed{seed}"
    if finished(out):
        return out
    command = [
        sys.executable,
        "-m",
        "lab",
        "run",
        recipe,
        "--set",
        f"train.seed={seed}",
        "--set",
        f"train.out_dir={out}",
        "--set",
        f"train.eval_interval={args.eval_interval}",
        "--set",
        "train.checkpoint_interval=100000",
        *sum((["--set", s] for s in [*args.set, *sets]), []),
    ]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    print(
        f"  {out.name}: {time.perf_counter() - started:.0f} s wall, load average {load:.1f} -> "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return out


def read(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def finished(out: Path) -> bool:
    """The run trained to its end: generated.txt is written after the last step (a run stopped early
    has none), and its metrics hold the final evaluation."""
    if not (out / "generated.txt").exists() or not (out / "metrics.jsonl").exists():
        return False
    records = read(out)
    last = max((r["step"] for r in records if "loss" in r), default=-1)
    return any(r.get("step") == last and "val_loss" in r for r in records)


def curve(out: Path) -> list[tuple[int, float, float]]:
    """(step, training seconds so far, val loss) at every evaluation. A step's seconds are its tokens
    (the growth of the logged `tokens`, which a batch-size schedule varies) over its tokens/s."""
    tokens, seconds, points = {0: 0}, {0: 0.0}, []
    for rec in read(out):
        if "tokens_per_s" in rec:
            step_tokens = rec["tokens"] - tokens.get(rec["step"] - 1, 0)
            tokens[rec["step"]] = rec["tokens"]
            seconds[rec["step"]] = seconds.get(rec["step"] - 1, 0.0) + step_tokens / rec["tokens_per_s"]
        if "val_loss" in rec:
            points.append((rec["step"], seconds[rec["step"]], rec["val_loss"]))
    return points


def time_to_reach(points, target: float) -> float | None:
    """Training seconds at which the val loss first reaches target, linear between evaluations."""
    for (s0, t0, v0), (s1, t1, v1) in zip(points, points[1:]):
        if v1 <= target:
            return t0 + (t1 - t0) * (v0 - target) / (v0 - v1) if v0 > target else t0
    return None


def loss_at(points, key: int, x: float) -> float | None:
    """Val loss at training seconds (key 1) or step (key 0) x, linear between evaluations."""
    for a, b in zip(points, points[1:]):
        if a[key] <= x <= b[key]:
            return a[2] + (b[2] - a[2]) * (x - a[key]) / max(b[key] - a[key], 1e-9)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reference")
    p.add_argument("challenger")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--out", default="runs/race")
    p.add_argument("--set", action="append", default=[], help="an override for both recipes")
    p.add_argument(
        "--ablate",
        action="append",
        nargs="+",
        default=[],
        metavar=("NAME", "SET"),
        help="a variant of the challenger: a name, then its overrides (key=value ...); repeat for more",
    )
    args = p.parse_args(argv)
    if any(len(a) < 2 for a in args.ablate):
        p.error(
            "--ablate takes a name and at least one override, e.g. --ablate no_normuon optimizer.name=muon"
        )
    rows = []
    for seed in args.seeds:
        ref, new = (curve(run(r, seed, args)) for r in (args.reference, args.challenger))
        target, ref_time, ref_steps = ref[-1][2], ref[-1][1], ref[-1][0]
        reach = time_to_reach(new, target)
        rows.append(
            {
                "seed": seed,
                "ref_loss": target,
                "ref_time": ref_time,
                "new_loss": new[-1][2],
                "new_time": new[-1][1],
                "reach_ratio": None if reach is None else reach / ref_time,
                "new_at_ref_time": loss_at(new, 1, ref_time) if new[-1][1] >= ref_time else new[-1][2],
                "new_at_ref_steps": loss_at(new, 0, ref_steps),
            }
        )
    a, b = Path(args.reference).stem, Path(args.challenger).stem
    print(
        f"\n{'seed':>4} | {a} val loss, time | {b} val loss, time | {b} reaches {a}'s loss at | "
        f"{b} val loss at {a}'s time | at {a}'s steps"
    )
    for r in rows:
        print(
            f"{r['seed']:>4} | {r['ref_loss']:.4f}, {r['ref_time']:.0f} s | "
            f"{r['new_loss']:.4f}, {r['new_time']:.0f} s | "
            f"{fmt(r['reach_ratio'], '{:.2f}x')} | {fmt(r['new_at_ref_time'], '{:.4f}')} | "
            f"{fmt(r['new_at_ref_steps'], '{:.4f}')}"
        )
    med = {k: median([r[k] for r in rows]) for k in rows[0] if k != "seed"}
    print(
        f"{'med':>4} | {med['ref_loss']:.4f}, {med['ref_time']:.0f} s | "
        f"{med['new_loss']:.4f}, {med['new_time']:.0f} s | "
        f"{fmt(med['reach_ratio'], '{:.2f}x')} | {fmt(med['new_at_ref_time'], '{:.4f}')} | "
        f"{fmt(med['new_at_ref_steps'], '{:.4f}')}"
    )
    if args.ablate:
        ablation(args, b)
    return 0


def ablation(args, challenger: str) -> None:
    """Each --ablate variant of the challenger raced against the reference, per seed, interleaved."""
    print(
        f"\nablation of {challenger}: each variant's final val loss (vs all techniques), training time, "
        "and when it reaches the reference's final loss"
    )
    for seed in args.seeds:
        ref = curve(run(args.reference, seed, args))
        full = curve(run(args.challenger, seed, args))
        rows = [("(all)", full)] + [
            (name, curve(run(args.challenger, seed, args, name, tuple(sets)))) for name, *sets in args.ablate
        ]
        for name, points in rows:
            reach = time_to_reach(points, ref[-1][2])
            print(
                f"seed {seed} | {name} | {points[-1][2]:.4f} ({points[-1][2] - full[-1][2]:+.4f}), "
                f"{points[-1][1]:.0f} s | {fmt(None if reach is None else reach / ref[-1][1], '{:.2f}x')}"
            )


def median(values):
    """Median of the values; a run that never got there (None) counts as the worst."""
    return statistics.median([float("inf") if v is None else v for v in values]) if values else None


def fmt(value, spec):
    return "never" if value is None or value == float("inf") else spec.format(value)


if __name__ == "__main__":
    sys.exit(main())
