"""Weights & Biases. Online by default; with WANDB_MODE=offline (or mode = "offline") it writes the run
to RUN_DIR/wandb with no network, for `wandb sync` later."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from lab.errors import LabError
from lab.interfaces import Logger
from lab.slots import ComponentConfig

ID_FILE = "wandb-id"  # in the run folder: a resumed run continues the same W&B run


class WandBConfig(ComponentConfig):
    project: str = Field("lab", description="the W&B project")
    entity: Optional[str] = Field(None, description="the W&B user or team; unset: your default")
    mode: Optional[Literal["online", "offline", "disabled"]] = Field(
        None, description="unset: WANDB_MODE, else online"
    )
    tags: list[str] = Field(default_factory=list, description="tags on the run")


class WandB(Logger):
    def __init__(self, config: WandBConfig):
        try:
            import wandb
        except ImportError:
            raise LabError("needs the wandb package: pip install 'lab[wandb]'") from None
        self.config, self.wandb, self.run = config, wandb, None

    def open(self, run_dir: Path, recipe: dict, first_step: int) -> None:
        run_dir, c = Path(run_dir), self.config
        id_file = run_dir / ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = self.wandb.init(
            project=c.project,
            entity=c.entity,
            mode=c.mode,
            tags=c.tags or None,
            dir=str(run_dir),
            id=run_id,
            name=str(run_dir),
            resume="allow",
            config=recipe,
        )

    def log(self, record: dict) -> None:
        # W&B's steps only move forward: of the steps a resumed run logs again (those after its
        # checkpoint), it keeps the first session's values and warns; metrics.jsonl has this session's.
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
