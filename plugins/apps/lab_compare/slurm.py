"""`lab sweep --slurm`: the runs go to SLURM as one job array, through submitit; SLURM schedules them.
Each array task is the same `lab run` command a local sweep would start, so a preempted or timed-out
task resumes from its checkpoint when the sweep is submitted again (finished runs are skipped)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lab.errors import LabError
from lab.recipe import parse_override
from lab_compare.child import lab_argv


def run_cell(argv: list[str], cwd: str, log: str) -> int:
    """One array task: `lab run ...` in the folder the sweep was started from, its output in the log."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        code = subprocess.call(lab_argv(*argv[1:]), cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if code:
        raise RuntimeError(f"{' '.join(argv)} exited with status {code}; see {log}")
    return code


def submit(grid, todo, args) -> bool:
    """Hand the runs to SLURM as one job array; True when they also finished here (submitit's local
    executor waits for them), so the caller can summarize."""
    try:
        import submitit
    except ImportError:
        raise LabError("lab sweep --slurm needs submitit: pip install 'lab[slurm]'") from None
    if not todo:
        print(f"every run of {grid.out} is finished; the summary: lab compare {grid.out}")
        return False
    cluster = args.slurm_cluster or "slurm"
    try:
        executor = submitit.AutoExecutor(folder=Path(grid.out) / "slurm", cluster=cluster)
    except RuntimeError as e:  # no srun: not a SLURM machine
        raise LabError(
            f"lab sweep --slurm: {e} Submit from a SLURM login node, or print the commands for "
            "another queue with --dry-run"
        ) from None
    params = dict(parse_option(o) for o in args.slurm_opt)
    try:
        executor.update_parameters(
            name=f"lab-sweep-{Path(grid.out).name}", slurm_array_parallelism=args.jobs, **params
        )
    except (NameError, AssertionError, TypeError) as e:
        raise LabError(f"--slurm-opt: {e}") from None
    cwd = os.getcwd()
    with executor.batch():  # one job array, not one job per run
        jobs = [executor.submit(run_cell, cell.argv(grid), cwd, str(cell.log)) for cell in todo]
    print(
        f"submitted {len(jobs)} run(s) of {grid.out} as job array {jobs[0].job_id.split('_')[0]} "
        f"({cluster}), at most {args.jobs} at once"
    )
    if cluster == "slurm":
        print(
            f"when they finish: lab compare {grid.out} (and the same `lab sweep` command continues any that stopped)"
        )
        return False
    failed = [cell for cell, job in zip(todo, jobs) if job.exception() is not None]  # local: wait for them
    if failed:
        raise LabError(f"{len(failed)} run(s) failed: " + ", ".join(str(c.log) for c in failed) + " say why")
    return True


def parse_option(text: str) -> tuple[str, object]:
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise LabError(f"--slurm-opt expects KEY=VALUE, got '{text}' (e.g. --slurm-opt slurm_partition=gpu)")
    return key.strip(), parse_override(f"x={text.partition('=')[2]}")[1]
