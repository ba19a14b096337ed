"""`lab compare RUN_DIR...`: the table and the figure of lab_compare.compare, or, given a sweep
folder, the sweep's summary (lab_compare.sweep)."""

from __future__ import annotations

import json
from pathlib import Path

from lab_compare import sweep
from lab_compare.compare import markdown, plot_curves, run_label, run_table
from lab_compare.runs import Run, differences


def cli_compare(args) -> int:
    folders = [Path(f) for f in args.run_dirs]
    if len(folders) == 1 and sweep.is_sweep(folders[0]):
        return sweep.cli_summary(folders[0], args)
    runs = [Run.read(f) for f in folders]
    table = run_table(runs)
    print(json.dumps(table, indent=2) if args.json else markdown(table, differences(runs)))
    figure = Path(args.output or "compare.png")
    plot_curves({run_label(run, runs): [run] for run in runs}, figure, args.x)
    if not args.json:
        print(f"\nfigure: {figure}")
    return 0
