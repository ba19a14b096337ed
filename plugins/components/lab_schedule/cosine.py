import math

from pydantic import Field, NonNegativeInt

from lab.interfaces import Schedule
from lab.slots import ComponentConfig
from lab_schedule.long_warmup import warn_if_longer_than_the_run


class CosineConfig(ComponentConfig):
    warmup_steps: NonNegativeInt = Field(100, description="steps of linear warmup from ~0")
    decay_steps: NonNegativeInt = Field(0, description="step where the decay reaches the floor; 0: max_steps")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="floor, as a fraction of the peak lr")


class Cosine(Schedule):
    def __init__(self, config: CosineConfig, max_steps: int):
        self.warmup = config.warmup_steps
        warn_if_longer_than_the_run(self.warmup, max_steps)
        self.decay_end = config.decay_steps or max_steps
        self.floor = config.min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if step >= self.decay_end:
            return self.floor
        progress = (step - self.warmup) / max(1, self.decay_end - self.warmup)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
