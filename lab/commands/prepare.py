"""`lab prepare`: text in, token files out (lab/data/prepare.py writes single files, lab/data/shards.py
shards with a manifest). One `lab prepare` writes a folder at a time: it holds the folder's lock, as
`lab run` holds its run folder's. `--slurm` hands the parts to SLURM as one job array (submitit), then
a last job checks them and writes the manifest; `--dry-run` prints one command per task for any queue."""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import asdict
from pathlib import Path

from lab.data.prepare import build_tokenizer, cpu_count, prepare, refuse_foreign_files
from lab.data.shards import MANIFEST, Settings, parse_count, plan_parts, prepare_shards
from lab.data.text import DatasetSpec, reading_from_args
from lab.data.tokens import SPLITS
from lab.errors import LabError
from lab.files import cannot_write
from lab.recipe import parse_option
from lab.runs.lock import RunLock

TWO_WRITERS = "Two lab prepare writing one folder would overwrite each other's token files."
ANOTHER_OUT = "give this one another --out folder"
DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's and the speedrun's FineWeb shards hold 100M tokens


def token_count(text: str) -> int:
    try:
        return parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cli_prepare(args) -> int:
    out = Path(args.out).expanduser()
    if not args.inputs and not args.dataset:
        raise LabError("lab prepare needs INPUT files or folders, or --dataset NAME")
    if args.inputs and args.dataset:
        raise LabError("give INPUT files or --dataset NAME, not both")
    if not sharded(args):
        return prepare_files(args, out)
    settings = shard_settings(args)
    if args.dry_run or args.slurm or args.slurm_cluster:
        return submit(args, settings, out)
    task = parse_task(args.task)
    tokenizer = build_tokenizer(args.tokenizer, args.recipe, args.overrides)
    lock = (
        RunLock(out, command_line(args), why=TWO_WRITERS, fix=ANOTHER_OUT)
        if task is None
        else RunLock(out, command_line(args), f".lock-task-{task[0]}-of-{task[1]}", TWO_WRITERS, ANOTHER_OUT)
    )
    with lock, disk_errors(out):
        manifest = prepare_shards(settings, out, tokenizer, workers(args), task)
    if manifest is None:
        print(f"task {args.task} of {out} done; when every task is, run the command without --task")
        return 0
    print(summary(out, manifest))
    return 0


def prepare_files(args, out: Path) -> int:
    """train.bin, val.bin and meta.json, as lab prepare wrote before shards."""
    tokenizer = build_tokenizer(args.tokenizer, args.recipe, args.overrides)
    reading = reading_from_args(args)
    refuse_foreign_files(out)
    with RunLock(out, command_line(args), why=TWO_WRITERS, fix=ANOTHER_OUT), disk_errors(out):
        meta = prepare(args.inputs, out, tokenizer, args.val_fraction, args.workers, reading=reading)
    print(
        f"wrote {args.out}: "
        + ", ".join(
            f"{split}.bin {meta[f'{split}_tokens']:,} tokens "
            f"({_count(meta[f'{split}_documents'], 'document')})"
            for split in SPLITS
        )
        + f"; {meta['dtype']}, tokenizer {meta['tokenizer']}"
        + dropped(meta)
    )
    return 0


class disk_errors:
    """An OSError while writing becomes one message; the half-written files are gone already."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if isinstance(error, OSError):
            fix = (
                "Free some space and run the same command: it continues from the shards already written"
                if (self.out / "parts").is_dir()
                else "Free some space, or give --out a folder on another disk"
            )
            raise cannot_write(error.filename or self.out, error, fix=fix) from None
        return False


def sharded(args) -> bool:
    return any(
        value is not None and value is not False
        for value in (
            args.shard_tokens,
            args.val_tokens,
            args.max_tokens,
            args.dataset,
            args.task,
            args.slurm or None,
            args.dry_run or None,
            args.slurm_cluster,
        )
    )


def shard_settings(args) -> Settings:
    reading = reading_from_args(args)
    if args.dataset is not None:
        dataset = asdict(DatasetSpec(args.dataset, args.subset, args.split))
        if Path(args.dataset).expanduser().is_dir():
            dataset["name"] = str(Path(args.dataset).expanduser().absolute())
    else:
        dataset = None
    return Settings(
        inputs=[str(Path(i).expanduser().absolute()) for i in args.inputs],
        dataset=dataset,
        text_field=reading.text_field,
        min_chars=reading.min_chars,
        skip_bad=reading.skip_bad,
        shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
        val_fraction=args.val_fraction,
        val_tokens=args.val_tokens or 0,
        max_tokens=args.max_tokens or 0,
    )


def parse_task(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    index, _, count = text.partition("/")
    try:
        task = int(index), int(count)
    except ValueError:
        task = (-1, 0)
    if not 0 <= task[0] < task[1]:
        raise LabError(f"--task {text}: give I/N with 0 <= I < N, e.g. --task 0/8")
    return task


def workers(args) -> int:
    if args.workers < 0:
        raise LabError(
            f"--workers {args.workers} is negative: give a number of processes, or 0 for one per core"
        )
    return args.workers or cpu_count()


def command_line(args, task: str | None = None) -> str:
    """The lab prepare command that args stand for (with --task when given): for the lock's holder
    and for the commands --dry-run prints."""
    words = ["lab", "prepare", *args.inputs, "--out", args.out]
    for flag, value in (
        ("--dataset", args.dataset),
        ("--subset", args.subset),
        ("--split", args.split if args.dataset else None),
        ("--tokenizer", args.tokenizer),
        ("--recipe", args.recipe),
        ("--text-field", args.text_field if args.text_field != "text" else None),
        ("--min-chars", args.min_chars or None),
        ("--on-bad-input", args.on_bad_input if args.on_bad_input != "refuse" else None),
        ("--val-fraction", args.val_fraction if args.val_fraction != 0.1 else None),
        ("--shard-tokens", args.shard_tokens),
        ("--val-tokens", args.val_tokens),
        ("--max-tokens", args.max_tokens),
        ("--workers", args.workers or None),
        ("--task", task or args.task),
    ):
        if value is not None:
            words += [flag, str(value)]
    for override in args.overrides:
        words += ["--set", override]
    return shlex.join(words)


def summary(out: Path, manifest: dict) -> str:
    shards = {split: len(manifest["shards"][split]) for split in SPLITS}
    return (
        f"wrote {out}: "
        + ", ".join(
            f"{split} {manifest[f'{split}_tokens']:,} tokens in {_count(shards[split], 'shard')} "
            f"({_count(manifest[f'{split}_documents'], 'document')})"
            for split in SPLITS
        )
        + f"; {manifest['dtype']}, tokenizer {manifest['tokenizer']}; {MANIFEST} lists them"
        + dropped(manifest)
    )


def dropped(meta: dict) -> str:
    notes = []
    if meta.get("dropped_short"):
        notes.append(f"{_count(meta['dropped_short'], 'document')} shorter than --min-chars dropped")
    if meta.get("skipped"):
        notes.append(f"{len(meta['skipped'])} unreadable file(s) or row group(s) skipped")
    return "; " + "; ".join(notes) if notes else ""


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


# --- SLURM ----------------------------------------------------------------------------------------
# `lab prepare --slurm`: the parts of the input go to SLURM as one job array (through submitit, as
# `lab sweep --slurm` does); task I of N tokenizes every N-th part from the I-th into its own shards, and
# a last job, started when every task has succeeded, checks the shards and writes the manifest. A task
# that fails or is preempted leaves the parts it finished: the same command submitted again does the
# rest. `--dry-run` prints the tasks, one `lab prepare ... --task I/N` command each, for any other queue.


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
    assert manifest is not None
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
