"""Warmup-stable-decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024): warm up, hold the peak, and
decay only over the last fraction of the run. The stable phase needs no end in sight, so a run can
be extended, and a checkpoint from it cooled down, at any point."""

import math
from typing import Literal

from pydantic import Field, NonNegativeInt

from lab.interfaces import Schedule
from lab.slots import ComponentConfig
from lab_schedule.long_warmup import warn_if_longer_than_the_run


class WSDConfig(ComponentConfig):
    warmup_steps: NonNegativeInt = Field(100, description="steps of linear warmup from ~0")
    decay_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="share of max_steps spent decaying, at the end"
    )
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="floor, as a fraction of the peak lr")
    shape: Literal["linear", "sqrt", "cosine"] = Field(
        "sqrt", description="decay curve; 1 - sqrt did best in Hägele et al. 2024"
    )


class WSD(Schedule):
    def __init__(self, config: WSDConfig, max_steps: int):
        self.warmup = config.warmup_steps
        warn_if_longer_than_the_run(self.warmup, max_steps)
        self.decay_steps = round(config.decay_fraction * max_steps)
        self.decay_start = max_steps - self.decay_steps
        self.floor = config.min_lr_ratio
        self.shape = config.shape

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if step < self.decay_start:
            return 1.0
        progress = min(1.0, (step - self.decay_start) / max(1, self.decay_steps))  # 0 -> 1
        left = {  # share of the way from the floor to the peak still to go
            "linear": 1.0 - progress,
            "sqrt": 1.0 - math.sqrt(progress),
            "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
        }[self.shape]
        return self.floor + (1.0 - self.floor) * left
