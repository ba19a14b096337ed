"""The warning every warmup schedule gives when its warmup is longer than the run."""

import os
import sys


def warn_if_longer_than_the_run(warmup_steps: int, max_steps: int) -> None:
    """A warmup longer than the run never reaches the peak lr: allowed (a short trial of a long
    recipe), but said, once (rank 0 under torchrun)."""
    if warmup_steps > max_steps and os.environ.get("RANK", "0") == "0":
        print(
            f"warning: [schedule] warmup_steps = {warmup_steps} is more than train.max_steps = {max_steps}: "
            f"the learning rate never reaches [optimizer] lr. To reach it, set schedule.warmup_steps to at "
            f"most {max_steps} (e.g. --set schedule.warmup_steps={max(1, max_steps // 10)})",
            file=sys.stderr,
        )
