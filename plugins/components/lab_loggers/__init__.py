"""Loggers: the numbers of metrics.jsonl, also where users already look. Each is turned on by a table of
its own in the recipe, several at once:

    [logger.tensorboard]          # event files in RUN_DIR/tensorboard: tensorboard --logdir runs
    [logger.wandb]                # Weights & Biases; offline: WANDB_MODE=offline, then wandb sync
    project = "my-project"

Each needs its own package, an extra of lab (pip install 'lab[tensorboard]', 'lab[wandb]'); a recipe
that names one that is not installed stops before training, saying which command installs it.
"""

from lab import hookimpl


@hookimpl
def lab_components(register):
    from lab_loggers.tensorboard import TensorBoard, TensorBoardConfig
    from lab_loggers.wandb import WandB, WandBConfig

    register(
        "logger", "tensorboard", TensorBoard, TensorBoardConfig, "TensorBoard event files in the run folder"
    )
    register("logger", "wandb", WandB, WandBConfig, "Weights & Biases (online, or offline with no network)")
