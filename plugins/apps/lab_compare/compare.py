"""`lab compare RUN_DIR...`: one row per run (what differs in their recipes, size, budget, speed, losses)
and one figure overlaying their train and val curves. Given a sweep folder, the sweep's summary."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from lab.errors import LabError
from lab.files import replacing
from lab_compare.runs import Run, differences, extra_keys, flatten


def run_label(run: Run, runs: list[Run]) -> str:
    """The run's folder, as short as still tells the runs apart."""
    names = [r.path.name for r in runs]
    return run.path.name if names.count(run.path.name) == 1 else str(run.path)


def run_table(runs: list[Run]) -> list[dict]:
    """One row per run: its folder, the recipe values that differ, then what it cost and reached."""
    differing, extras = differences(runs), extra_keys(runs)
    rows = []
    for run in runs:
        recipe, steps, evals = flatten(run.recipe), run.steps, run.evals
        val = [r["val_loss"] for r in evals]
        last = run.records[-1] if run.records else {}
        row = {"run": str(run.path)}
        row.update({key: recipe.get(key) for key in differing})
        row.update(
            {
                "status": "done" if run.finished else f"at step {run.last_step}/{run.target_steps}",
                "params": run.num_params,
                "tokens": run.x(last, "tokens") if last else 0,
                "seconds": last.get("elapsed"),
                "tokens_per_s": median(r["tokens_per_s"] for r in steps),
                "mfu": median(r["mfu"] for r in steps),
                "first_val_loss": val[0] if val else None,
                "final_val_loss": val[-1] if val else None,
                "best_val_loss": min(val) if val else None,
            }
        )
        for key in extras:  # the last value each extra number took (val_bpb, an extra loss term...)
            row[key] = next((r[key] for r in reversed(run.records) if key in r), None)
        rows.append(row)
    return rows


def median(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


HEADERS = {
    "tokens_per_s": "tokens/s",
    "mfu": "MFU",
    "first_val_loss": "first val",
    "final_val_loss": "final val",
    "best_val_loss": "best val",
    "seconds": "wall s",
}
# How each measured column reads; recipe values (the differing keys) are shown as written.
FORMATS = {
    "params": lambda v: f"{v / 1e6:.2f}M",
    "tokens": lambda v: f"{v:,}",
    "seconds": lambda v: f"{v:.1f}",
    "tokens_per_s": lambda v: f"{v:,.0f}",
    "mfu": lambda v: f"{v:.2%}",
}
MEASURED = {
    "status",
    "params",
    "tokens",
    "seconds",
    "tokens_per_s",
    "mfu",
    "first_val_loss",
    "final_val_loss",
    "best_val_loss",
}


def cell(key: str, value, recipe_keys) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key in FORMATS:
        return FORMATS[key](value)
    if key in recipe_keys or isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4f}" if 0.01 <= abs(value) < 1000 else f"{value:.4g}"  # losses, extra terms


def markdown(rows: list[dict], recipe_keys=()) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(HEADERS.get(k, k) for k in keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(cell(k, row.get(k), recipe_keys) for k in keys) + " |")
    return "\n".join(lines)


def plot_curves(groups: dict[str, list[Run]], path: Path, axis: str = "tokens") -> None:
    """Train (left) and val (right) loss of every run on one axis; runs of a group share a colour."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(groups.items()):
        colour = colours[i % len(colours)]
        for j, run in enumerate(runs):
            kwargs = {"color": colour, "label": label if j == 0 else None}
            train = points(run, run.steps, "loss", axis)
            val = points(run, run.evals, "val_loss", axis)
            if train:
                train_ax.plot(*zip(*train), linewidth=1, alpha=0.6, **kwargs)
            if val:
                val_ax.plot(*zip(*val), "o-", linewidth=1.5, markersize=3, alpha=0.8, **kwargs)
    for ax, title in ((train_ax, "train loss"), (val_ax, "val loss")):
        ax.set_xlabel(axis)
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    val_ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path, "wb") as f:  # a folder given as -o is one message; never half a picture
            fig.savefig(f, format="png", dpi=100)
    except OSError as e:
        raise LabError(f"cannot write the figure {path}: {e.strerror}") from None
    finally:
        plt.close(fig)


def points(run: Run, records: list[dict], key: str, axis: str) -> list[tuple[float, float]]:
    xy = [(run.x(r, axis), r[key]) for r in records]
    return [(x, y) for x, y in xy if x is not None]
