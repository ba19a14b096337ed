"""TensorBoard event files, written with torch's SummaryWriter (which needs the tensorboard package)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from lab.errors import LabError
from lab.interfaces import Logger
from lab.slots import ComponentConfig


class TensorBoardConfig(ComponentConfig):
    dir: str = Field("tensorboard", description="the event files' folder, inside the run folder")
    flush_secs: int = Field(10, ge=1, description="write to disk at least this often, in seconds")


class TensorBoard(Logger):
    def __init__(self, config: TensorBoardConfig):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LabError("needs the tensorboard package: pip install 'lab[tensorboard]'") from None
        self.config, self.SummaryWriter, self.writer = config, SummaryWriter, None

    def open(self, run_dir: Path, recipe: dict, first_step: int) -> None:
        # purge_step: a resumed run logs the steps after its checkpoint again; TensorBoard drops the
        # events it had from there on, as metrics.jsonl drops its lines.
        self.writer = self.SummaryWriter(
            str(Path(run_dir) / self.config.dir),
            flush_secs=self.config.flush_secs,
            purge_step=first_step or None,
        )

    def log(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
