"""`lab compare` and `lab sweep`: is a variant better, at equal budget, beyond noise? Applications on top
of the core: they read run folders and start `lab run`s, and the core knows nothing of them."""

from lab import hookimpl
from lab.plugins import lazy_command

AXES = ("steps", "tokens", "seconds", "flops")


@hookimpl
def lab_commands(subparsers):
    from lab.recipe import add_override_arguments

    p = subparsers.add_parser("compare", help="compare run folders (or a sweep folder): a table and a figure")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or one sweep folder")
    p.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="FILE",
        help="the figure (PNG); default: compare.png here, or summary.png in a sweep folder",
    )
    _add_axis(p)
    p.add_argument("--json", action="store_true", help="print the table as JSON instead of Markdown")
    p.set_defaults(func=lazy_command("lab_compare.cli", "cli_compare"))

    p = subparsers.add_parser(
        "sweep", help="train a recipe over a grid of values x seeds, then compare the variants"
    )
    p.add_argument("recipe")
    p.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a recipe setting and its values (repeatable: the grid is every combination); "
        "the first value is the baseline",
    )
    p.add_argument(
        "--seeds", type=int, default=1, metavar="N", help="runs per variant, seeds train.seed + 0..N-1"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="J",
        help="runs at once on this machine, splitting its CPU threads (or GPUs) between them",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="the sweep folder (default: sweeps/<recipe name>)"
    )
    add_override_arguments(p, every_run=True)
    _add_axis(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print one `lab run` command per run still to do, for any queue; run nothing",
    )
    p.add_argument(
        "--slurm",
        action="store_true",
        help="submit the runs as one SLURM job array (needs "
        "submitit: pip install 'lab[slurm]'); --jobs caps how many run at once",
    )
    p.add_argument(
        "--slurm-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a submitit/SLURM parameter, e.g. slurm_partition=gpu, timeout_min=60, gpus_per_node=1",
    )
    p.add_argument("--slurm-cluster", default=None, help=argparse_suppress())  # tests: submitit's 'local'
    p.set_defaults(func=lazy_command("lab_compare.sweep", "cli_sweep"))


def _add_axis(p) -> None:
    p.add_argument("--x", default="tokens", choices=AXES, help="the figure's x axis (default: tokens)")


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS
