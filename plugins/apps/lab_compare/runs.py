"""Reading run folders as they stand: the recipe a run was started with and its metrics.jsonl so far.

Any run folder works: one written by a single process, by torchrun (rank 0 writes the same files) or by
`lab sweep` (each cell is an ordinary run folder), finished or still training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from lab.errors import LabError
from lab.recipe import read_toml
from lab.runs import is_run
from lab.runs.layout import METRICS, RECIPE
from lab.runs.metrics import FIELDS, read_metrics

# The keys of lab's own that the table shows as such (and lr.GROUP, each optimizer group's lr); any
# other number in a record (an extra loss term a component logs, bits per byte...) gets a column.
KNOWN = FIELDS - {"val_bpb"}


@dataclass
class Run:
    path: Path
    recipe: dict  # recipe.toml as written by the run: every setting resolved
    records: list[dict] = field(repr=False)

    @classmethod
    def read(cls, folder) -> "Run":
        folder = Path(folder)
        if not folder.is_dir():
            raise LabError(
                f"{folder} is not a folder; give run folders (the train.out_dir of `lab run`) "
                "or a sweep folder"
            )
        if not is_run(folder):
            inside = sorted(str(p.parent) for p in folder.glob(f"**/{METRICS}"))[:4]
            hint = f" It holds run folders: lab compare {' '.join(inside)}" if inside else ""
            raise LabError(
                f"{folder} is not a run folder (no {METRICS} or checkpoints); give the folders "
                f"`lab run` or `lab sweep` wrote.{hint}"
            )
        return cls(folder, read_toml(str(folder / RECIPE)), read_metrics(folder / METRICS))

    @property
    def steps(self) -> list[dict]:
        return [r for r in self.records if "loss" in r]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if "val_loss" in r]

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.records), default=0)

    @property
    def tokens_per_step(self) -> int:
        """From the records (they hold the layout's real figure); the recipe's on one process for older runs."""
        for r in self.records:
            if r.get("tokens") and r["step"]:
                return r["tokens"] // r["step"]
        train, model = self.recipe.get("train", {}), self.recipe.get("model", {})
        sequences = train.get("global_batch_size") or train.get("batch_size", 1) * train.get("grad_accum", 1)
        return sequences * model.get("block_size", 1)

    @property
    def target_steps(self) -> int:
        train = self.recipe.get("train", {})
        if train.get("max_tokens"):
            return math.ceil(train["max_tokens"] / self.tokens_per_step)
        return train.get("max_steps") or 1000

    @property
    def finished(self) -> bool:
        return self.last_step >= self.target_steps and any(r["step"] == self.last_step for r in self.evals)

    @property
    def final_val_loss(self) -> float | None:
        return self.evals[-1]["val_loss"] if self.evals else None

    def x(self, record: dict, axis: str) -> float | None:
        """Where a record sits on the axis: steps, tokens, seconds or flops."""
        if axis == "steps":
            return record["step"]
        if axis == "seconds":
            return record.get("elapsed")
        tokens = record.get("tokens", record["step"] * self.tokens_per_step)
        if axis == "tokens":
            return tokens
        return tokens * self.flops_per_token if self.flops_per_token else None

    @cached_property
    def model_size(self) -> tuple[int | None, float | None]:
        """(non-embedding parameters, training FLOPs per token), from the model built on the meta device
        (no memory, no time). None when the run's components are not installed here."""
        import torch

        from lab.model import GPT
        from lab.recipe import resolve

        try:
            recipe = resolve(self.recipe, str(self.path / RECIPE))
            with torch.device("meta"):
                model = GPT(recipe)
            return model.num_params(), model.flops_per_token(recipe.model.block_size)
        except Exception:  # a plugin not installed here, an older recipe: the table shows '?'
            return None, None

    @property
    def num_params(self) -> int | None:
        return self.model_size[0]

    @property
    def flops_per_token(self) -> float | None:
        return self.model_size[1]


def flatten(table: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}"""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Settings that differ between any two runs without making them different experiments.
NOT_A_DIFFERENCE = {"train.out_dir"}


def differences(runs: list[Run]) -> list[str]:
    """The recipe keys whose values are not the same in every run, in the recipes' order."""
    flats = [flatten(run.recipe) for run in runs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    differ = [k for k in keys if k not in NOT_A_DIFFERENCE and len({repr(f.get(k)) for f in flats}) > 1]

    def implied(key: str) -> bool:
        """A setting only some runs have, of a component that differs: the name says it already."""
        table = key.rpartition(".")[0]
        return f"{table}.name" in differ and key != f"{table}.name" and any(key not in f for f in flats)

    return [k for k in differ if not implied(k)]


def extra_keys(runs: list[Run]) -> list[str]:
    """Numbers the records carry beyond the usual ones (extra loss terms, val_bpb...), in order of appearance."""
    keys = dict.fromkeys(
        k
        for run in runs
        for r in run.records
        for k, v in r.items()
        if k not in KNOWN and not k.startswith("lr.") and isinstance(v, (int, float))
    )
    return list(keys)
