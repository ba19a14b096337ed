"""A ramp from a share of a value up to all of it: the warmups the NanoGPT speedrun uses for more than
the learning rate (its batch size, its attention windows), and a sequence-length warmup (Li et al.
2022, "The Stability-Efficiency Dilemma"). As the lr schedule it is a warmup from `start`, then the
peak to the end."""

import math
from typing import Literal

from pydantic import BaseModel, Field, NonNegativeInt

from lab.interfaces import Schedule


class RampConfig(BaseModel):
    start: float = Field(0.25, gt=0.0, le=1.0, description="share of the value at step 0")
    steps: NonNegativeInt = Field(0, description="step where the ramp reaches 1; 0: max_steps")
    stages: NonNegativeInt = Field(
        0,
        description="0: a smooth ramp; N: N jumps instead, the steps cut into N + 1 equal parts with the "
        "share constant in each, start in the first, 1 in the last (few distinct values: under "
        "torch.compile each new window or shape costs a recompile)",
    )
    shape: Literal["linear", "cosine"] = Field("linear", description="how the share grows from start to 1")


class Ramp(Schedule):
    def __init__(self, config: RampConfig, max_steps: int):
        self.start, self.stages, self.shape = config.start, config.stages, config.shape
        self.steps = config.steps or max_steps

    def __call__(self, step: int) -> float:
        progress = min(1.0, step / max(1, self.steps))
        if self.stages:  # part k of N + 1 (k = 0 .. N) holds progress k / N
            progress = min(self.stages, math.floor(progress * (self.stages + 1))) / self.stages
        if self.shape == "cosine":
            progress = 0.5 * (1 - math.cos(math.pi * progress))
        return self.start + (1.0 - self.start) * progress
