"""Learning-rate schedules, each a pure function of the step."""

from lab import hookimpl
from lab_schedule.cosine import Cosine, CosineConfig
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
