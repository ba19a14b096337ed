"""The slot table: every choice a recipe makes, in one place.

For each slot: the interface its components meet, where its table sits in a recipe, what its factory
is handed, whether a recipe may list any number of them or set one per layer, the optional hooks a
component's Config may define, and the conformance checks lab.testing runs on it. A component's
Config subclasses ComponentConfig, which gives every optional hook its default.

    slot        factory(...)                     recipe table          interface
    attention   factory(config, model)           [model.attention]     lab.interfaces.Attention
    mlp         factory(config, model)           [model.mlp]           nn.Module (B, T, C) -> (B, T, C)
    norm        factory(config, model)           [model.norm]          nn.Module (B, T, C) -> (B, T, C)
    position    factory(config, model)           [model.position]      lab.interfaces.Position
    tokenizer   factory(config)                  [tokenizer]           lab.interfaces.Tokenizer
    data        factory(config, context)         [data]                lab.interfaces.DataSource
    optimizer   factory(config, params, model)   [optimizer]           torch.optim.Optimizer
    schedule    factory(config, max_steps)       [schedule]            lab.interfaces.Schedule
    logger      factory(config)                  [logger.NAME], any    lab.interfaces.Logger
    extension   factory(config, model)           [extension.NAME], any lab.interfaces.Extension

model: lab.recipe.ModelConfig (with .layer, .n_layer: the layer being built); context:
lab.interfaces.DataContext; params: [lab.roles.Param(name, param, role)].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from lab.interfaces import Attention, DataSource, Extension, Logger, Position, Schedule, Tokenizer


class ComponentConfig(BaseModel):
    """The base of every component's settings. Unknown keys are errors (a typo in a recipe is caught
    before anything runs), and each optional hook has its default here, so lab never probes for it."""

    model_config = ConfigDict(extra="forbid")

    # More settings lab.testing checks the component with, beside its defaults: [{"experts": 8}, ...].
    extra_settings: ClassVar[list[dict]] = []
    # optimizer: False when it needs whole parameters, which FSDP2's shards are not.
    works_on_shards: ClassVar[bool] = True
    # attention, mlp, norm: the quantities a recipe's [schedule.QUANTITY] tables may drive in this
    # component (e.g. ("window",)); its module then has set_scheduled(quantity, share).
    scheduled: ClassVar[tuple[str, ...]] = ()

    def check_recipe(self, recipe) -> None:
        """Check these settings against the rest of the recipe (recipe.model, recipe.train,
        recipe.parts) when it is read; raise ValueError("what is wrong and how to fix it")."""


@dataclass(frozen=True)
class Slot:
    name: str
    interface: type  # what the factory must return
    table: tuple[str, ...]  # where its table sits in a recipe
    factory: str  # what the factory is handed
    many: bool = False  # any number per recipe: one sub-table per component, named by it
    per_layer: bool = False  # may be set per layer: [model.layers.N.SLOT]
    checks: tuple[str, ...] = ()  # lab.testing's conformance checks, by name


def _slots(*slots: Slot) -> dict[str, Slot]:
    return {s.name: s for s in slots}


_TOKEN_MAP = (
    "token_map_shapes_and_dtypes",
    "token_map_per_token",
    "token_map_gradients",
    "extra_loss_gradients",
    "scheduled_quantities",
)

SLOTS: dict[str, Slot] = _slots(
    Slot(
        "attention",
        Attention,
        ("model", "attention"),
        "factory(config, model)",
        per_layer=True,
        checks=(
            "attention_shapes",
            "attention_causality",
            "attention_gradients",
            "attention_dtypes",
            "attention_cached_decoding",
            "attention_grouped_query",
            "extra_loss_gradients",
            "scheduled_quantities",
        ),
    ),  # fmt: skip
    Slot("mlp", nn.Module, ("model", "mlp"), "factory(config, model)", per_layer=True, checks=_TOKEN_MAP),
    Slot("norm", nn.Module, ("model", "norm"), "factory(config, model)", per_layer=True, checks=_TOKEN_MAP),
    Slot(
        "position",
        Position,
        ("model", "position"),
        "factory(config, model)",
        checks=(
            "position_shapes",
            "position_grouped_heads",
            "position_rotate_preserves_norms",
            "position_token_by_token",
            "position_max_len",
            "position_gradients",
        ),
    ),  # fmt: skip
    Slot(
        "schedule",
        Schedule,
        ("schedule",),
        "factory(config, max_steps)",
        checks=("schedule_pure", "schedule_finite_non_negative"),
    ),  # fmt: skip
    Slot(
        "optimizer",
        torch.optim.Optimizer,
        ("optimizer",),
        "factory(config, params, model)",
        checks=("optimizer_roles", "optimizer_reduces_loss", "optimizer_state_round_trip"),
    ),  # fmt: skip
    Slot(
        "data",
        DataSource,
        ("data",),
        "factory(config, context)",
        checks=("data_batches", "data_resume", "data_processes_share"),
    ),  # fmt: skip
    Slot("tokenizer", Tokenizer, ("tokenizer",), "factory(config)", checks=("tokenizer_round_trip",)),
    Slot("logger", Logger, ("logger",), "factory(config)", many=True, checks=("logger_records_a_run",)),
    Slot(
        "extension",
        Extension,
        ("extension",),
        "factory(config, model)",
        many=True,
        checks=(
            "extension_cached_decoding",
            "extension_interleaved_batches",
            "extension_gradients",
            "extension_resume",
            "extension_context_metadata",
        ),
    ),
)
