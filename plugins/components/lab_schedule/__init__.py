"""Schedules, each a pure function of the step: of the learning rate, and of what [schedule.QUANTITY]
tables drive (batch size, sequence length, a sliding window)."""

from lab import hookimpl
from lab_schedule.cosine import Cosine, CosineConfig
from lab_schedule.ramp import Ramp, RampConfig
from lab_schedule.wsd import WSD, WSDConfig


@hookimpl
def lab_components(register):
    register("schedule", "cosine", Cosine, CosineConfig, "linear warmup, then cosine decay to a floor")
    register(
        "schedule",
        "wsd",
        WSD,
        WSDConfig,
        "warmup-stable-decay: warmup, hold the peak, decay over the last fraction to a floor",
    )
    register(
        "schedule",
        "ramp",
        Ramp,
        RampConfig,
        "a ramp from a share up to 1, smooth or in stages: batch-size, window and sequence-length warmups",
    )
