"""What a run writes down as it goes: metrics.jsonl and loss.png in its run folder.

metrics.jsonl holds one JSON object per line: {"step", "loss", "lr", "grad_norm", "tokens_per_s",
"mfu", "tokens", "elapsed"} for each optimizer step and {"step", "val_loss", "val_bpb", "tokens",
"elapsed"} for each evaluation (val_bpb: the val loss in bits per UTF-8 byte of the val text, which
compares runs whose tokenizers differ). Step k is the k-th optimizer update; the evaluation at step k
sees the model after it (step 0: before any training). tokens: the tokens trained on up to step k (all
processes together); elapsed: wall-clock seconds of training so far, summed over the run's sessions,
so a resumed run's seconds axis continues where it stopped. A recipe's [schedule.QUANTITY] tables add
"schedule.QUANTITY" to each step: the share of the quantity used (lab.engine.scheduled). A resumed run first drops the lines after
its checkpoint's step, so the file holds each step once.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from lab.errors import LabError
from lab.files import cannot_write, replacing, write_text_atomically
from lab.runs.layout import METRICS, PLOT

# The schema: what lab writes in each record. A component's extra numbers (lab.extras) are written
# beside them as "loss.NAME" (a loss term) and "NAME" (a scalar): a scalar may not take one of these
# names or prefixes, or it would overwrite what `lab compare` and the plots read.
STEP_FIELDS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens", "elapsed")
EVAL_FIELDS = ("step", "val_loss", "val_bpb", "tokens", "elapsed")
FIELDS = frozenset(STEP_FIELDS + EVAL_FIELDS)
# loss terms, each optimizer group's lr, what validation reports, the scheduled quantities' shares
PREFIXES = ("loss.", "lr.", "val_", "schedule.")


def is_lab_field(name: str) -> bool:
    """A name metrics.jsonl keeps for lab's own numbers."""
    return name in FIELDS or name.startswith(PREFIXES)


class MetricsLog:
    """metrics.jsonl, opened for appending after keeping only the lines up to `keep_through`; every
    record also goes to the recipe's loggers (lab.interfaces.Logger)."""

    def __init__(self, run_dir, keep_through: int, loggers=(), recipe: dict | None = None):
        self.path = Path(run_dir) / METRICS
        self.plot_path = Path(run_dir) / PLOT
        records, damaged = _read(self.path)
        self.records = [r for r in records if r["step"] <= keep_through]
        try:
            if damaged:  # the file is rewritten below: keep the damaged one as it was, beside it
                shutil.copyfile(self.path, self.path.with_name(METRICS + ".damaged"))
                _warn_once(self.path, damaged, f"; the file as it was is kept as {METRICS}.damaged")
            write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
            self.file = open(self.path, "a")
        except OSError as e:
            raise cannot_write(self.path, e) from None
        # The seconds of earlier sessions: a resumed run's clock continues from its last kept line.
        self.earlier = max((r.get("elapsed", 0.0) for r in self.records), default=0.0)
        self.started = time.perf_counter()
        self.loggers = list(loggers)
        for logger in self.loggers:
            logger.open(Path(run_dir), recipe or {}, keep_through + 1)

    def write(self, record: dict) -> None:
        record = {**record, "elapsed": round(self.earlier + time.perf_counter() - self.started, 3)}
        self.records.append(record)
        # One line per write, flushed: a kill leaves at most one partial last line, which
        # read_metrics skips.
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            raise cannot_write(self.path, e) from None
        for logger in self.loggers:
            logger.log(record)

    def plot(self) -> None:
        try:
            plot_losses(self.records, self.plot_path, title=self.path.parent.name)
        except OSError as e:
            raise cannot_write(self.plot_path, e) from None

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # a full disk, already reported by the write that met it
            pass
        for logger in self.loggers:
            logger.close()


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl (none if it does not exist). A torn last line (a kill
    mid-write) is skipped silently; any other line that is not a JSON record (bytes that are not
    UTF-8, a damaged or hand-edited line) is skipped with one warning naming the file and the lines,
    so a damaged file never stops a resume, `lab compare` or `lab serve`."""
    records, damaged = _read(Path(path))
    if damaged:
        _warn_once(Path(path), damaged)
    return records


def _read(path: Path) -> tuple[list[dict], list[int]]:
    """(records, numbers of the damaged lines)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], []
    except IsADirectoryError:
        raise LabError(f"{path} is a folder, not a metrics file; move it out of the run folder") from None
    except OSError as e:
        raise LabError(f"cannot read {path}: {e.strerror}") from None
    lines = data.split(b"\n")
    records, damaged = [], []
    for number, line in enumerate(lines, 1):
        record = _record(line)
        if record is not None:
            records.append(record)
        elif line.strip() and not (number == len(lines) and _is_text(line)):
            damaged.append(number)  # but a last line with no newline, cut short by a kill, is expected
    return records, damaged


def _is_text(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


_warned: set = set()  # (file, damaged lines) already reported: the server reads a file on every poll


def _warn_once(path: Path, damaged: list[int], more: str = "") -> None:
    key = (str(path.resolve()), tuple(damaged))
    if key in _warned:
        return
    _warned.add(key)
    shown = ", ".join(map(str, damaged[:5])) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
    lines = "line" if len(damaged) == 1 else "lines"
    print(f"warning: {path}: skipped damaged {lines} {shown} (not a JSON record){more}", file=sys.stderr)


def _record(line: bytes) -> dict | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: deep nesting
        return None
    if (
        isinstance(record, dict)
        and isinstance(record.get("step"), int)
        and not isinstance(record["step"], bool)
    ):
        return record
    return None


def plot_losses(records: list[dict], path, title: str = "") -> None:
    """Train loss per step and val loss per evaluation, on one chart; val bits per byte on a second
    axis at the right, when the records have it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val", linewidth=1.5, markersize=4)
    bpb = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
    lines = ax.get_lines()
    if bpb:
        right = ax.twinx()
        lines += right.plot(
            *zip(*bpb), "s--", color="tab:green", label="val bits per byte", linewidth=1, markersize=3
        )
        right.set_ylabel("val bits per byte")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(lines, [line.get_label() for line in lines])
    fig.tight_layout()
    try:
        with replacing(path, "wb") as f:  # a reader never sees half a picture
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
