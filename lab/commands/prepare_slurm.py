"""`lab prepare --slurm`: the parts of the input go to SLURM as one job array (through submitit, as
`lab sweep --slurm` does); task I of N tokenizes every N-th part from the I-th into its own shards, and
a last job, started when every task has succeeded, checks the shards and writes the manifest. A task
that fails or is preempted leaves the parts it finished: the same command submitted again does the
rest. `--dry-run` prints the tasks, one `lab prepare ... --task I/N` command each, for any other queue."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from lab.commands.prepare import ANOTHER_OUT, TWO_WRITERS, command_line, summary
from lab.data.prepare import build_tokenizer, cpu_count
from lab.data.shards import Settings, plan_parts, prepare_shards
from lab.errors import LabError
from lab.recipe import parse_option
from lab.runs.lock import RunLock


def run_task(
    settings: dict, out: str, tokenizer: tuple, task: tuple[int, int] | None, cwd: str, workers: int
):
    """One array task (task None: the last step). Runs on a SLURM node, in the folder the command was
    given in, so a recipe named by a relative path is found."""
    os.chdir(cwd)
    name = ".lock" if task is None else f".lock-task-{task[0]}-of-{task[1]}"
    with RunLock(out, f"lab prepare task {task}", name, TWO_WRITERS, ANOTHER_OUT):
        return prepare_shards(
            Settings(**settings), out, build_tokenizer(*tokenizer), workers or cpu_count(), task, False
        )


def submit(args, settings: Settings, out: Path) -> int:
    tokenizer = build_tokenizer(
        args.tokenizer, args.recipe, args.overrides
    )  # a mistake shows here, not on a node
    if args.max_tokens:
        raise LabError(
            "--max-tokens stops a prepare after N tokens in input order, which SLURM tasks working at "
            "once cannot do; give fewer input files instead, or prepare without --slurm"
        )
    parts = plan_parts(settings)
    count = min(args.tasks or len(parts), len(parts))
    if count < 1:
        raise LabError(f"--tasks {args.tasks}: give a positive number of tasks")
    tasks = [(i, count) for i in range(count)]
    if args.dry_run:
        for i, n in tasks:
            mine = [p.describe() for p in parts if p.index % n == i]
            print(
                f"# task {i}/{n}: {len(mine)} part(s): {', '.join(mine[:3])}{' ...' if len(mine) > 3 else ''}"
            )
            print(command_line(args, f"{i}/{n}"))
        print("# then, when every task has finished, the manifest:")
        print(command_line(args))
        return 0
    executor, cluster = make_executor(args, out, count)
    spec = (args.tokenizer, args.recipe, list(args.overrides))
    cwd = os.getcwd()
    settings.tokenizer, settings.tokenizer_fingerprint = tokenizer.name, tokenizer.fingerprint()
    with RunLock(out, command_line(args), why=TWO_WRITERS, fix=ANOTHER_OUT):
        with executor.batch():  # one job array, not one job per task
            jobs = [
                executor.submit(run_task, asdict(settings), str(out), spec, task, cwd, args.workers)
                for task in tasks
            ]
        array = jobs[0].job_id.split("_")[0]
        print(f"submitted {len(jobs)} task(s) tokenizing {out} as job array {array} ({cluster})")
        if cluster != "local":
            executor.update_parameters(slurm_additional_parameters={"dependency": f"afterok:{array}"})
            last = executor.submit(run_task, asdict(settings), str(out), spec, None, cwd, args.workers)
            print(
                f"job {last.job_id} writes {out}/manifest.json when they have all succeeded; if any fails, "
                "the same command submitted again does the parts still to do"
            )
            return 0
        failed = [(task, job) for task, job in zip(tasks, jobs) if job.exception() is not None]
        if failed:
            (i, n), job = failed[0]
            raise LabError(
                f"{len(failed)} task(s) failed, first task {i}/{n}: {job.exception()}; its log is in "
                f"{out / 'slurm'}. The same command continues from the parts that were done"
            )
        manifest = prepare_shards(settings, out, tokenizer, 1, None, progress=False)  # every part is done
    print(summary(out, manifest))
    return 0


def make_executor(args, out: Path, count: int):
    try:
        import submitit
    except ImportError:
        raise LabError("lab prepare --slurm needs submitit: pip install 'lab[slurm]'") from None
    cluster = args.slurm_cluster or "slurm"
    try:
        executor = submitit.AutoExecutor(folder=out / "slurm", cluster=cluster)
    except RuntimeError as e:  # no srun: not a SLURM machine
        raise LabError(
            f"lab prepare --slurm: {e} Submit from a SLURM login node, or print the tasks for another "
            "queue with --dry-run"
        ) from None
    params = dict(parse_option(o) for o in args.slurm_opt)
    try:
        executor.update_parameters(name=f"lab-prepare-{out.name}", slurm_array_parallelism=count, **params)
    except (NameError, AssertionError, TypeError) as e:
        raise LabError(f"--slurm-opt: {e}") from None
    return executor, cluster
