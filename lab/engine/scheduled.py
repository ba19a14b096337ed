"""What the [schedule.QUANTITY] tables of a recipe drive besides the learning rate, at each step.

Each quantity's schedule component gives a share of the recipe's value as a pure function of the step
(capped at 1), so a resumed run uses the same values as one never stopped. The trainer applies
batch_size (sequences per micro-batch) and seq_len (tokens per sequence); every other quantity (a
sliding window...) is handed to the model's modules that take it, through their
`set_scheduled(quantity, share)`.
"""

from __future__ import annotations

import math

from torch import nn

from lab.recipe import TRAINER_QUANTITIES, Recipe


class Scheduled:
    def __init__(self, recipe: Recipe, max_steps: int):
        self.schedules = {quantity: part.build(max_steps) for quantity, part in recipe.schedules.items()}
        self.batch_size, self.block_size = recipe.train.batch_size, recipe.model.block_size

    def __bool__(self) -> bool:
        return bool(self.schedules)

    def share(self, quantity: str, step: int) -> float:
        """The schedule's value at step, capped at 1; 1 when the recipe does not schedule the quantity."""
        schedule = self.schedules.get(quantity)
        return 1.0 if schedule is None else min(1.0, max(0.0, float(schedule(step))))

    def rows(self, step: int) -> int:
        """Sequences per micro-batch at step: at least 1, at most train.batch_size."""
        return max(1, min(self.batch_size, math.ceil(self.batch_size * self.share("batch_size", step))))

    def seq_len(self, step: int) -> int:
        """Tokens per training sequence at step: the longest divisor of block_size within the share, so
        every window of block_size tokens splits into whole sequences (tokens per step unchanged)."""
        most = max(1, math.floor(self.block_size * self.share("seq_len", step) + 1e-9))
        return max(d for d in range(1, most + 1) if self.block_size % d == 0)

    def shares(self, step: int) -> dict[str, float]:
        """Every scheduled quantity's share at step, as applied (batch_size and seq_len rounded)."""
        rounded = {
            "batch_size": self.rows(step) / self.batch_size,
            "seq_len": self.seq_len(step) / self.block_size,
        }
        return {q: rounded[q] if q in rounded else self.share(q, step) for q in self.schedules}

    def apply(self, model: nn.Module, step: int) -> dict[str, float]:
        """Hand the components' quantities to the modules that take them (`set_scheduled(quantity,
        share)`); returns the shares at step for the metrics, as schedule.NAME."""
        shares = self.shares(step)
        for quantity, share in shares.items():
            if quantity not in TRAINER_QUANTITIES:
                for module in model.modules():
                    if hasattr(module, "set_scheduled"):
                        module.set_scheduled(quantity, share)
        return {f"schedule.{q}": v for q, v in shares.items()}

    def tokens(self, step: int, micro_batches: int) -> int:
        """Tokens step trains on, micro_batches of every process together (grad_accum x processes):
        batch_size's share of them (a seq_len schedule keeps the tokens per step)."""
        return self.rows(step) * micro_batches * self.block_size

    def tokens_before(self, step: int, micro_batches: int) -> int:
        """Tokens steps 0 .. step - 1 trained on: what a resumed run has seen."""
        if "batch_size" not in self.schedules:
            return step * self.batch_size * micro_batches * self.block_size
        return sum(self.tokens(s, micro_batches) for s in range(step))


def split_sequences(x, seq_len: int):
    """(B, T) -> (B * T / seq_len, seq_len): each window cut into sequences of seq_len tokens. Targets
    cut the same way stay the next token of their inputs."""
    return x if seq_len == x.size(1) else x.reshape(-1, seq_len)


assert set(TRAINER_QUANTITIES) == {"batch_size", "seq_len"}  # what Scheduled and the trainer apply
