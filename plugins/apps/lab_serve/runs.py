"""Which run folders the server may read, and the models it has loaded from them.

A request names a run by its id, a key of a table made from the folders given on the command line;
nothing in a request becomes a path. Models load on first use (through lab.runs.load) and
at most `max_models` stay in memory: the least recently used idle one makes room.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import lab.runs
from lab.errors import LabError
from lab.runs import is_run
from lab.runs.checkpoint import latest, step_of
from lab.runs.layout import METRICS, RECIPE, SAMPLES
from lab.runs.metrics import read_metrics
from lab_serve.batcher import Batcher


class RunTable:
    """run id -> run folder, for the paths given: run folders, and folders of run folders (looked
    at again on each listing, so a run started after the server shows up)."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.is_dir():
                raise LabError(f"{p} is not a folder; give run folders or a folder of them (e.g. runs/)")
        self.runs = self.scan()
        if not self.runs:
            raise LabError(
                f"no run folders in {', '.join(map(str, self.paths))} (a run folder has a "
                "checkpoints/ folder or a metrics.jsonl); train one with `lab run RECIPE`"
            )

    def scan(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for p in self.paths:
            runs = [p] if is_run(p) else sorted(c for c in p.iterdir() if c.is_dir() and is_run(c))
            for run in runs:
                name = run.resolve().name
                if name in found and found[name].resolve() != run.resolve():
                    raise LabError(
                        f"two run folders are named {name}: {found[name]} and {run}; "
                        "serve them separately or rename one"
                    )
                found[name] = run
        return found

    def refresh(self) -> dict[str, Path]:
        try:
            self.runs = self.scan()
        except (LabError, OSError):
            pass  # keep the last good table: a clash or a vanished folder must not stop the server
        return self.runs

    def folder(self, run_id: str) -> Path | None:
        return self.runs.get(run_id)

    def describe(self, run_id: str) -> dict:
        """What the runs view lists for a run."""
        folder = self.runs[run_id]
        ckpt = latest(folder)
        return {
            "id": run_id,
            "servable": ckpt is not None,
            "step": step_of(ckpt) if ckpt else None,
            "has_metrics": (folder / METRICS).is_file(),
            "has_generated": (folder / SAMPLES).is_file(),
        }

    def metrics(self, run_id: str) -> list[dict]:
        return read_metrics(self.runs[run_id] / METRICS)

    def recipe(self, run_id: str) -> str:
        """The resolved recipe: the run folder's, else its newest checkpoint's (an imported run)."""
        folder = self.runs[run_id]
        ckpt = latest(folder)
        for f in (folder / RECIPE, ckpt / RECIPE if ckpt else None):
            if f is not None and f.is_file():
                return f.read_text(encoding="utf-8", errors="replace")
        return ""

    def generated(self, run_id: str) -> str:
        f = self.runs[run_id] / SAMPLES
        return f.read_text(encoding="utf-8", errors="replace") if f.is_file() else ""


@dataclass
class Served:
    """A loaded run: its model, tokenizer and the worker thread that decodes for it."""

    id: str
    model: object
    tokenizer: object
    batcher: Batcher
    max_len: int  # prompt + new tokens: the positions the model knows, else what it was trained on
    created: int

    @property
    def chat_template(self):
        return getattr(self.tokenizer, "chat_template", None)


class Busy(Exception):
    """Every loaded model is serving requests, so none can make room for another."""


class ModelPool:
    def __init__(self, table: RunTable, device, max_models: int, max_batch: int):
        self.table, self.device = table, device
        self.max_models, self.max_batch = max_models, max_batch
        self.loaded: OrderedDict[str, Served] = OrderedDict()  # least recently used first
        self.lock = threading.Lock()  # one load at a time: two first requests load a model once

    def get(self, run_id: str) -> Served:
        """The run's model, loaded if it is not (blocking: call it from a worker thread)."""
        with self.lock:
            if run_id in self.loaded:
                self.loaded.move_to_end(run_id)
                return self.loaded[run_id]
            folder = self.table.folder(run_id)
            if folder is None:
                raise KeyError(run_id)
            self._make_room()
            served = self._load(run_id, folder)
            self.loaded[run_id] = served
            return served

    def _make_room(self) -> None:
        while len(self.loaded) >= self.max_models:
            idle = [k for k, s in self.loaded.items() if s.batcher.in_flight() == 0]
            if not idle:
                raise Busy()
            self.loaded.pop(idle[0]).batcher.close()

    def _load(self, run_id: str, folder: Path) -> Served:
        recipe, model, _ = lab.runs.load(folder, self.device)
        tokenizer = recipe.parts["tokenizer"].build()
        max_len = model.position.max_len or model.config.block_size
        eos = getattr(tokenizer, "eot_id", None)
        return Served(
            run_id,
            model,
            tokenizer,
            Batcher(model, self.max_batch, eos, name=run_id),
            max_len,
            int(time.time()),
        )

    def in_flight(self) -> int:
        return sum(s.batcher.in_flight() for s in list(self.loaded.values()))

    def close(self) -> None:
        for s in self.loaded.values():
            s.batcher.close()
        self.loaded.clear()
