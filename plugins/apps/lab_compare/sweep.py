"""`lab sweep RECIPE --vary KEY=V1,V2 [--vary ...] --seeds N`: every combination of the values, each
trained with N seeds, each (variant, seed) an ordinary run folder of its own in the sweep folder:

    sweeps/<recipe name>/
        sweep.json                            the grid (a different one is refused)
        optimizer.lr=3e-3/seed-1337/          a run folder: lab run, lab generate, lab compare work on it
        logs/optimizer.lr=3e-3/seed-1337.log  what the run printed
        summary.md, summary.json, summary.png per variant: final val loss over seeds, vs the baseline

Running the same command again skips the finished runs and lets the others resume from their
checkpoints (the runs' own resume). `--jobs J` trains J runs at once on this machine, each with its
share of the CPU threads (or of the GPUs); past one machine, `--slurm` hands the runs to SLURM as one
job array (through submitit) and `--dry-run` prints one command per run for any other queue.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lab.data.prepare import cpu_count
from lab.errors import LabError
from lab.recipe import load_recipe
from lab.runs import is_run
from lab_compare import slurm, stats
from lab_compare.child import lab_argv
from lab_compare.compare import MEASURED, markdown, plot_curves, run_table
from lab_compare.runs import Run, flatten

GRID = "sweep.json"
RESERVED = {"train.seed": "use --seeds N", "train.out_dir": "each run's folder is the sweep's: use --out DIR"}


@dataclass
class Cell:
    variant: str  # e.g. 'optimizer.lr=3e-3,model.mlp.name=swiglu'
    overrides: list[str]  # the --set values that make this variant, then the seed's and the folder's
    seed: int
    dir: str  # the run folder

    def argv(self, grid: "Grid") -> list[str]:
        sets = [*grid.overrides, *self.overrides, f"train.seed={self.seed}", f"train.out_dir={self.dir}"]
        return ["lab", "run", grid.recipe, *[a for s in sets for a in ("--set", s)]]

    @property
    def log(self) -> Path:
        run = Path(self.dir)
        return run.parent.parent / "logs" / run.parent.name / f"{run.name}.log"


@dataclass
class Grid:
    recipe: str  # the recipe file, as given
    vary: list[tuple[str, list[str]]]  # (key, the values as written)
    seeds: list[int]
    overrides: list[str]  # --set, applied to every run
    out: str
    resolved: dict  # the base recipe, every setting filled in: an edited recipe file is another grid

    @property
    def variants(self) -> list[tuple[str, list[str]]]:
        """(label, --set values) of every combination, the baseline (every first value) first."""
        keys = [key for key, _ in self.vary]
        out = []
        for values in itertools.product(*(vals for _, vals in self.vary)):
            sets = [f"{k}={v}" for k, v in zip(keys, values)]
            out.append((",".join(sets), sets))
        return out

    def cells(self) -> list[Cell]:
        return [
            Cell(label, sets, seed, str(Path(self.out) / folder_name(label) / f"seed-{seed}"))
            for label, sets in self.variants
            for seed in self.seeds
        ]

    def remembered(self) -> dict:
        return {
            "recipe": self.recipe,
            "vary": [[k, v] for k, v in self.vary],
            "seeds": self.seeds,
            "set": self.overrides,
            "resolved": self.resolved,
        }

    def command(self) -> str:
        parts = ["lab", "sweep", self.recipe] + [
            a for k, v in self.vary for a in ("--vary", f"{k}={','.join(v)}")
        ]
        parts += ["--seeds", str(len(self.seeds))] + [a for s in self.overrides for a in ("--set", s)]
        return shlex.join(parts + ["--out", self.out])


def folder_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "=.,+-_" else "_" for c in label)


def is_sweep(folder: Path) -> bool:
    return (Path(folder) / GRID).is_file()


# Reading the command line --------------------------------------------------------------------------


def make_grid(args) -> Grid:
    """The grid the command asks for, every value checked against the recipe before anything runs."""
    base = load_recipe(args.recipe, args.overrides)
    if not args.vary:
        raise LabError("the grid is empty: give what to vary, e.g. --vary optimizer.lr=1e-3,3e-3")
    if args.seeds < 1:
        raise LabError(f"--seeds {args.seeds}: give at least 1 seed (3 or more for a p-value worth reading)")
    flat = flatten(base.to_dict())
    vary, keys = [], set()
    for text in args.vary:
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise LabError(f"--vary expects KEY=V1,V2,..., got '{text}' (e.g. --vary optimizer.lr=1e-3,3e-3)")
        if key in RESERVED:
            raise LabError(f"--vary {key}: the sweep sets it for every run; {RESERVED[key]}")
        if key in keys:
            raise LabError(f"--vary {key} is given twice; list all its values in one: --vary {key}=V1,V2")
        if any(k.startswith(f"{key}.") for k in flat):
            raise LabError(
                f"--vary {key}: '{key}' is a table, not a setting; vary one of its keys, "
                f"e.g. {next(k for k in flat if k.startswith(f'{key}.'))}"
            )
        values = split_values(values)
        if not values:
            raise LabError(
                f"--vary {key}= has no values: the grid is empty. Give them separated by commas, "
                f"e.g. --vary {key}=V1,V2"
            )
        if len(set(values)) < len(values):
            raise LabError(f"--vary {key}: a value is listed twice ({', '.join(values)})")
        for value in values:
            check_value(args, key, value)
        keys.add(key)
        vary.append((key, values))
    seeds = [base.train.seed + i for i in range(args.seeds)]
    resolved = base.to_dict()
    resolved["train"].pop("out_dir", None)
    resolved["train"].pop("seed", None)
    return Grid(args.recipe, vary, seeds, list(args.overrides), args.out or f"sweeps/{base.name}", resolved)


def split_values(text: str) -> list[str]:
    """'1e-3,3e-3' -> ['1e-3', '3e-3'], keeping commas inside [...] and quotes: '[0.9,0.95],[0.9,0.99]'."""
    values, depth, quote, current = [], 0, None, ""
    for c in text:
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += c
    values.append(current.strip())
    return [v for v in values if v]


def check_value(args, key: str, value: str) -> None:
    """The recipe with this value must load: an unknown key, a wrong type, a bad choice fail here."""
    try:
        load_recipe(args.recipe, [*args.overrides, f"{key}={value}"])
    except LabError as e:
        raise LabError(f"--vary {key}={value}: {e}") from None


def remember(grid: Grid) -> None:
    """Write the grid into the sweep folder, or check it is the one already there. Nothing else is
    touched when it is not: the folder's runs belong to the other grid."""
    out, path = Path(grid.out), Path(grid.out) / GRID
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (ValueError, RecursionError, OSError):  # not JSON, not UTF-8, unreadable
            raise LabError(f"{path} is not valid JSON; move it away or choose another --out") from None
        if old != grid.remembered():
            raise LabError(
                f"{out} holds another sweep: {describe_change(old, grid.remembered())}. Its runs "
                "belong to that grid. Run that sweep's command again to continue it, or give this "
                "one another folder: --out DIR"
            )
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LabError(
            f"{out} exists and is not a sweep folder (no {GRID}); the sweep would write into it. "
            "Give another folder: --out DIR"
        )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(grid.remembered(), indent=2) + "\n")


def describe_change(old: dict, new: dict) -> str:
    what = {
        "recipe": "recipe file",
        "vary": "--vary",
        "seeds": "seeds",
        "set": "--set",
        "resolved": "recipe's settings",
    }
    changed = [f"{what[k]} {fmt(old.get(k), k)} -> {fmt(new[k], k)}" for k in what if old.get(k) != new[k]]
    return "; ".join(changed) if changed else "another grid"


def fmt(value, key: str) -> str:
    if key == "vary" and value is not None:
        return " ".join(f"{k}={','.join(v)}" for k, v in value)
    if key == "resolved" and value is not None:
        return "(edited)"
    return str(value)


# Running ------------------------------------------------------------------------------------------


def cli_sweep(args) -> int:
    if args.jobs < 1:
        raise LabError(f"--jobs {args.jobs}: give at least 1")
    grid = make_grid(args)
    remember(grid)
    cells = grid.cells()
    todo = [c for c in cells if not finished(c)]
    if args.dry_run:
        for cell in todo:
            print(shlex.join(cell.argv(grid)))
        return 0
    if args.slurm or args.slurm_cluster:
        if slurm.submit(grid, todo, args):
            summarize(Path(grid.out), args.x)
        return 0
    print(
        f"sweep {grid.out}: {len(grid.variants)} variant(s) x {len(grid.seeds)} seed(s) = {len(cells)} runs; "
        f"{len(cells) - len(todo)} finished already, {len(todo)} to run, {args.jobs} at a time"
    )
    status = Pool(args.jobs).run(grid, todo)
    if status:
        return status
    summarize(Path(grid.out), args.x)
    return 0


def finished(cell: Cell) -> bool:
    return is_run(Path(cell.dir)) and Run.read(cell.dir).finished


def slots(jobs: int) -> list[dict]:
    """Each concurrent run's share of the machine, as environment variables: the CPU threads split
    evenly, and the GPUs (if any) dealt out (runs share one when there are more runs than GPUs)."""
    threads = str(max(1, cpu_count() // jobs))
    envs = [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(jobs)]
    gpus = visible_gpus()
    for i, env in enumerate(envs):
        if gpus:
            mine = gpus[i::jobs] or [gpus[i % len(gpus)]]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    return envs


def visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",") if listed else [str(i) for i in range(torch.cuda.device_count())]


class Pool:
    """Up to `jobs` `lab run` processes at once. Ctrl-C (or SIGTERM) is handed to the runs, which save a
    checkpoint and stop; a second one makes them quit at once. The runs are in sessions of their own, so a
    Ctrl-C at the terminal reaches them only through here, once."""

    def __init__(self, jobs: int):
        self.envs = slots(jobs)
        self.running: dict[subprocess.Popen, tuple[Cell, int, float]] = {}  # process -> (cell, slot, start)
        self.stop = None  # the signal that asked the sweep to stop

    def run(self, grid: Grid, todo: list[Cell]) -> int:
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        failed, pending, done = [], list(todo), 0
        try:
            while self.running or (pending and self.stop is None):
                while pending and self.stop is None and len(self.running) < len(self.envs):
                    self.start(grid, pending.pop(0))
                time.sleep(0.05)
                for proc in [p for p in self.running if p.poll() is not None]:
                    cell, _, started = self.running.pop(proc)
                    done += 1
                    self.report(cell, proc.returncode, time.perf_counter() - started, f"[{done}/{len(todo)}]")
                    if proc.returncode and self.stop is None:
                        failed.append(cell)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.stop is not None:
            print(
                f"sweep stopped; the runs saved checkpoints. Continue with the same command:\n  {grid.command()}"
            )
            return 128 + int(self.stop)
        if failed:
            raise LabError(
                f"{len(failed)} run(s) failed: "
                + ", ".join(str(c.log) for c in failed)
                + f" say why. Fix it, then run the same command again: {grid.command()}"
            )
        return 0

    def start(self, grid: Grid, cell: Cell) -> None:
        slot = min(set(range(len(self.envs))) - {s for _, s, _ in self.running.values()})
        cell.log.parent.mkdir(parents=True, exist_ok=True)
        argv = lab_argv(*cell.argv(grid)[1:])  # the installed lab, never ./lab
        with open(cell.log, "a") as log:  # the child holds its own handle
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.envs[slot]},
                start_new_session=True,
            )
        self.running[proc] = (cell, slot, time.perf_counter())

    def handle(self, signum, frame) -> None:
        if self.stop is None:
            print(
                f"\n{signal.Signals(signum).name}: the runs in progress save a checkpoint and stop "
                "(again to quit them at once)",
                file=sys.stderr,
                flush=True,
            )
        self.stop = self.stop or signal.Signals(signum)
        for proc in self.running:
            if proc.poll() is None:
                proc.send_signal(signum)

    def report(self, cell: Cell, code: int, seconds: float, counter: str) -> None:
        what = f"{cell.variant} seed {cell.seed}"
        if code == 0:
            val = Run.read(cell.dir).final_val_loss if is_run(Path(cell.dir)) else None
            print(
                f"{counter} {what}: val loss {val:.4f} ({seconds:.0f} s)"
                if val is not None
                else f"{counter} {what}"
            )
        elif code in (130, 143) and self.stop is not None:
            print(f"{counter} {what}: stopped, checkpoint saved")
        else:
            tail = cell.log.read_text().strip().splitlines()[-1:] if cell.log.exists() else []
            print(f"{counter} {what}: failed (exit {code}): {tail[0] if tail else ''} (log: {cell.log})")


# The summary ---------------------------------------------------------------------------------------


def cli_summary(folder: Path, args) -> int:
    table = summarize(folder, args.x, output=Path(args.output) if args.output else None, quiet=args.json)
    if args.json:
        print(json.dumps(table, indent=2))
    return 0


def read_grid(folder: Path) -> Grid:
    try:
        saved = json.loads((folder / GRID).read_text())
        return Grid(
            saved["recipe"],
            [(k, v) for k, v in saved["vary"]],
            saved["seeds"],
            saved["set"],
            str(folder),
            saved["resolved"],
        )
    except (KeyError, TypeError, ValueError, RecursionError, OSError):  # damaged, or not lab's grid
        raise LabError(
            f"{folder / GRID} is not a grid lab sweep wrote; compare its runs by name instead"
        ) from None


def summarize(folder: Path, axis: str = "tokens", output: Path | None = None, quiet: bool = False) -> dict:
    """The sweep's summary as it stands, written as summary.md, summary.json and summary.png."""
    grid = read_grid(folder)
    groups: dict[str, list[Run]] = {}
    for cell in grid.cells():
        if is_run(Path(cell.dir)):
            groups.setdefault(cell.variant, []).append(Run.read(cell.dir))
    variants = variant_table(grid, groups)
    runs = [run for group in groups.values() for run in group]
    table = {"grid": grid.command(), "variants": variants, "runs": run_table(runs) if runs else []}
    text = summary_markdown(grid, table)
    (folder / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    (folder / "summary.md").write_text(text + "\n")
    figure = output or folder / "summary.png"
    plot_curves(groups, figure, axis)
    if not quiet:
        print(text)
        print(f"\nwritten: {folder / 'summary.md'}, {folder / 'summary.json'}, {figure}")
    return table


def variant_table(grid: Grid, groups: dict[str, list[Run]]) -> list[dict]:
    """Per variant, over its finished seeds: mean ± std of the final val loss, the difference from the
    baseline with Welch's p-value, and the rank (1: lowest mean)."""
    finals = {
        label: [r.final_val_loss for r in groups.get(label, []) if r.finished] for label, _ in grid.variants
    }
    baseline = grid.variants[0][0]
    rows = []
    for label, _ in grid.variants:
        values, started = finals[label], len(groups.get(label, []))
        mean, std = stats.mean_std(values) if values else (None, None)
        base = finals[baseline]
        row = {
            "variant": label,
            "baseline": label == baseline,
            "seeds_done": len(values),
            "seeds_running": started - len(values),
            "final_val_loss_mean": mean,
            "final_val_loss_std": std,
            "diff_vs_baseline": mean - stats.mean_std(base)[0]
            if values and base and label != baseline
            else None,
            "p_welch": stats.welch_p(values, base) if label != baseline else None,
        }
        bpb = [
            r.evals[-1]["val_bpb"] for r in groups.get(label, []) if r.finished and "val_bpb" in r.evals[-1]
        ]
        if bpb:
            row["final_val_bpb_mean"] = stats.mean_std(bpb)[0]
        rows.append(row)
    ranked = sorted(
        (r for r in rows if r["final_val_loss_mean"] is not None), key=lambda r: r["final_val_loss_mean"]
    )
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    return rows


def number(value, digits: int = 4, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def summary_markdown(grid: Grid, table: dict) -> str:
    rows = sorted(table["variants"], key=lambda r: r.get("rank", math.inf))
    bpb = any("final_val_bpb_mean" in r for r in rows)
    lines = [
        f"# Sweep `{grid.out}`",
        "",
        f"`{grid.command()}`",
        "",
        f"Final val loss over seeds ({len(grid.seeds)} per variant; finished runs only), the difference "
        "from the baseline (the first value of each --vary) and its Welch t-test p-value.",
        "",
        "| rank | variant | seeds | final val loss (mean ± std) | vs baseline | p (Welch) |"
        + (" val bpb |" if bpb else ""),
        "|---|---|---|---|---|---|" + ("---|" if bpb else ""),
    ]
    for r in rows:
        seeds = f"{r['seeds_done']}" + (f" (+{r['seeds_running']} running)" if r["seeds_running"] else "")
        name = f"{r['variant']} (baseline)" if r["baseline"] else r["variant"]
        p = r["p_welch"]
        lines.append(
            f"| {r.get('rank', '–')} | {name} | {seeds} | {number(r['final_val_loss_mean'])} ± "
            f"{number(r['final_val_loss_std'])} | {number(r['diff_vs_baseline'], signed=True)} | "
            f"{'–' if p is None or math.isnan(p) else f'{p:.3g}'} |"
            + (f" {number(r.get('final_val_bpb_mean'))} |" if bpb else "")
        )
    if table["runs"]:
        recipe_keys = [k for k in table["runs"][0] if k not in MEASURED and k != "run"]
        lines += ["", "## Runs", "", markdown(table["runs"], recipe_keys)]
    return "\n".join(lines)
