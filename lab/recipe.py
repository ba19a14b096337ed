"""Recipes: a TOML file that names a component for every slot, with its settings.

The core validates its own sections (model shape, train, generate); each component's table is
validated by that component's own pydantic Config. Every mistake becomes one LabError that names
the file, the table, the key and the fix.
"""

from __future__ import annotations

import math
import os
import sys
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonDict
from torch import nn

from lab.errors import LabError, PluginError, did_you_mean
from lab.plugins import Component, Registry, registry
from lab.slots import SLOTS, ComponentConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Where each slot's table sits in a recipe (lab/slots.py). Slots that take any number (MANY) have
# one sub-table per component, named by it: [logger.tensorboard] (the table holds its settings).
TABLES: dict[str, tuple[str, ...]] = {s.name: s.table for s in SLOTS.values() if not s.many}
MANY: dict[str, str] = {s.name: s.table[0] for s in SLOTS.values() if s.many}
# Quantities besides the learning rate that a schedule component can drive, one sub-table of [schedule]
# each ([schedule.batch_size] name = "ramp" ...): at step s the run uses the share schedule(s) of the
# recipe's value (capped at 1: the recipe's value is the most). The trainer applies these two; a
# component takes others (a sliding window) by naming them in its Config's `scheduled` ClassVar.
TRAINER_QUANTITIES: dict[str, str] = {
    "batch_size": "sequences per micro-batch (train.batch_size the most): a batch-size warmup",
    "seq_len": "tokens per training sequence (model.block_size the most; each window is cut into "
    "sequences of a divisor of it, so the tokens per step stay the same): a sequence-length schedule",
}
# The slots a recipe may set per layer, in [model.layers.N.SLOT] (N: 3, "0-2", "1,3", -1 for the last).
LAYER_SLOTS = tuple(s.name for s in SLOTS.values() if s.per_layer)


# Settings that name files or folders a run reads. A component marks one with
# `Field(..., json_schema_extra=PATH)` (a str, or a list of them). Written in a recipe file, a relative
# path is resolved against the recipe's folder (so a recipe works from any folder, and beside the data it
# names); given with --set, against the current folder. "pkg:PACKAGE/PATH" names a file that ships inside
# an installed package (e.g. "pkg:lab_tokenizers/shakespeare/char/vocab.json"), found from anywhere.
# The component gets the resolved path.
PATH: JsonDict = {"lab_path": True}  # JsonDict: what Field(json_schema_extra=...) takes
PACKAGE_FILE = "pkg:"
_overridden: ContextVar[frozenset] = ContextVar("overridden", default=frozenset())  # keys set by --set


def resolve_path(value: str, recipe_file: str | None, where: str) -> str:
    """A path setting as a component gets it (see PATH). recipe_file: None for a --set value."""
    if value.startswith(PACKAGE_FILE):
        return str(package_file(value, where))
    if not value or recipe_file is None or Path(value).expanduser().is_absolute():
        return value
    beside = Path(os.path.normpath(Path(recipe_file).resolve().parent / value))  # no "recipes/../"
    if not beside.exists() and Path(value).exists():
        return value  # a recipe written before paths were the recipe's: relative to the current folder
    return str(beside)


def package_file(value: str, where: str) -> Path:
    """ "pkg:PACKAGE/PATH" -> the file PATH inside the installed package PACKAGE."""
    from importlib.resources import files

    package, _, inside = value[len(PACKAGE_FILE) :].partition("/")
    try:
        root = files(package)
    except (ImportError, ValueError, TypeError):
        raise LabError(
            f"{where} = '{value}': no installed package '{package}' (the form is "
            f'"{PACKAGE_FILE}PACKAGE/PATH/IN/IT")'
        ) from None
    return Path(str(root)) / inside


# What torch.manual_seed takes.
SEEDS = (-(2**63), 2**64 - 1)
Seed = Annotated[int, Field(ge=SEEDS[0], le=SEEDS[1])]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """The model's shape; handed to every model component's factory."""

    vocab_size: Union[PositiveInt, Literal["auto"]] = Field(
        50257,
        description='tokens the embedding and head cover; "auto": the tokenizer\'s, rounded up to '
        "vocab_multiple (resolved when the recipe is read)",
    )
    vocab_multiple: PositiveInt = Field(
        1,
        description='with vocab_size = "auto", round the tokenizer\'s size up to a multiple of this; 64 '
        "gives the head matmul-friendly shapes (nanoGPT pads GPT-2's 50257 to 50304)",
    )
    block_size: PositiveInt = Field(1024, description="longest context, in tokens")
    n_layer: PositiveInt = Field(12, description="transformer blocks")
    n_head: PositiveInt = Field(12, description="attention heads")
    n_kv_head: PositiveInt | None = Field(
        None,
        description="key/value heads, shared by groups of query heads (grouped-query attention); "
        "1: multi-query; unset: n_head. Must divide n_head",
    )
    qk_norm: bool = Field(
        False,
        description="RMSNorm (with a learned gain) on each head's queries and keys, "
        "before positions are applied (OLMo 2, Qwen 3, Gemma 3)",
    )
    n_embd: PositiveInt = Field(768, description="residual stream width")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability in training")
    bias: bool = Field(True, description="biases in linear layers and norms")
    tie_embeddings: bool = Field(True, description="LM head shares the token embedding matrix")
    loss_chunk: NonNegativeInt = Field(
        256, description="rows per chunk of the fused LM head + loss (full logits never held); 0: plain path"
    )
    logit_softcap: Optional[float] = Field(
        None,
        description="squash the logits into (-cap, cap) with cap * tanh(logits / cap), in training "
        "and sampling (Gemma 2: 30, modded-nanogpt: 15); unset: no cap",
    )
    zero_init_residual: bool = Field(
        False,
        description="residual output projections start at zero, so every block starts as the "
        "identity (modded-nanogpt, nanochat); false: GPT-2's scaled normal",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); change one "
                f"of them (e.g. n_embd = {self.n_head * max(1, round(self.n_embd / self.n_head))})"
            )
        if self.n_head % self.kv_heads:
            divisors = [d for d in range(1, self.n_head + 1) if self.n_head % d == 0]
            raise ValueError(
                f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}): each key/value head "
                f"serves a group of query heads; set n_kv_head to one of {divisors}"
            )
        return self

    @field_validator("logit_softcap")
    @classmethod
    def _positive_cap(cls, cap):
        if cap is not None and not cap > 0:  # also catches nan
            raise ValueError(
                "the logit soft-cap must be > 0 (logits are squashed into (-cap, cap)); "
                "leave logit_softcap out for no cap, or use e.g. 15 or 30"
            )
        return cap

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    _layer: int | None = PrivateAttr(None)

    @property
    def layer(self) -> int | None:
        """The index of the block a component is built for (0 .. n_layer - 1); None outside the blocks
        (the position, the final norm). A factory that varies by depth reads it with model.n_layer."""
        return self._layer

    def for_layer(self, layer: int) -> "ModelConfig":
        config = self.model_copy()
        config._layer = layer
        return config

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class TrainConfig(Section):
    """The training loop's settings."""

    batch_size: PositiveInt = Field(4, description="micro-batch per process, in sequences")
    grad_accum: PositiveInt = Field(1, description="micro-batches per optimizer step, per process")
    global_batch_size: NonNegativeInt = Field(
        0,
        description="sequences per optimizer step over all processes; 0: batch_size x grad_accum x "
        "processes. Set, it decides grad_accum (global_batch_size / (batch_size x processes)), so a run "
        "keeps its batch on any number of processes",
    )
    max_steps: Optional[NonNegativeInt] = Field(
        None, description="optimizer steps to train; unset (or 0): from max_tokens, else 1000"
    )
    max_tokens: Optional[NonNegativeInt] = Field(
        None,
        description="tokens to train on (all processes together) instead of max_steps: the run takes "
        "ceil(max_tokens / tokens per step) steps and the schedule follows them, so variants with other "
        "batch shapes compare at equal tokens; unset (or 0): max_steps decides",
    )
    eval_interval: PositiveInt = Field(100, description="validate every this many steps")
    eval_batches: PositiveInt = Field(
        10,
        description="micro-batches per validation, shared among processes (rounded up to a multiple of them)",
    )
    log_interval: PositiveInt = Field(10, description="log a line every this many steps")
    checkpoint_interval: PositiveInt = Field(500, description="save every this many steps")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where the device runs it well, else fp32"
    )
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 disables")
    seed: Seed = Field(1337, description="seeds weights, data order and dropout")
    compile: Union[bool, Literal["auto"]] = Field(
        "auto", description="torch.compile the model; auto: on for CUDA, off on CPU"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N, mps")
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="with several processes (torchrun): ddp, each holds the whole model; fsdp, "
        "each holds a shard of it (FSDP2); auto: ddp",
    )
    out_dir: str = Field("", description="run folder; empty: runs/<recipe name>")

    @field_validator("max_steps", "max_tokens")
    @classmethod
    def _zero_is_unset(cls, value):
        return value or None  # so --set train.max_steps=0 clears a file's max_steps for max_tokens

    @model_validator(mode="after")
    def _one_budget(self):
        if self.max_steps and self.max_tokens:
            raise ValueError(
                f"max_steps = {self.max_steps} and max_tokens = {self.max_tokens} both set the run's length; "
                "keep one (remove the other from the file, or --set it to 0)"
            )
        return self

    def steps(self, tokens_per_step: int) -> int:
        """The optimizer steps the run takes at this many tokens per step."""
        if self.max_tokens:
            return math.ceil(self.max_tokens / tokens_per_step)
        return self.max_steps or 1000


class GenerateConfig(Section):
    """Sampling at the end of a run, and the defaults of `lab generate`."""

    prompt: str = Field("Once upon a time,", description="text the samples continue")
    num_samples: PositiveInt = Field(2, description="samples to draw")
    max_new_tokens: PositiveInt = Field(100, description="tokens per sample")
    temperature: float = Field(0.8, ge=0.0, description="0 is greedy")
    top_k: int = Field(200, ge=0, description="sample from the k likeliest tokens; 0: all")
    top_p: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="sample from the likeliest tokens "
        "whose probabilities add up to top_p (nucleus sampling); unset: all",
    )
    seed: Seed = Field(1337, description="the same seed gives the same text")


class EvalConfig(Section):
    """Evaluation during training, beside the val loss: every eval_interval steps and at the end."""

    text: list[str] = Field(
        [],
        json_schema_extra=PATH,
        description='text files, .jsonl files (a "text" field per line) or data '
        "folders from lab prepare: loss, perplexity and bits per byte of each",
    )
    tasks: list[str] = Field(
        [],
        json_schema_extra=PATH,
        description="multiple-choice .jsonl files ({context, choices, label} or "
        "HellaSwag's format): acc and acc_norm of each",
    )
    stride: NonNegativeInt = Field(
        0, description="tokens between the starts of text windows; 0: half of block_size"
    )
    limit: NonNegativeInt = Field(0, description="items scored per task; 0: all")
    batch_size: PositiveInt = Field(8, description="windows or choices per forward pass")


SECTIONS: dict[str, type[Section]] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "generate": GenerateConfig,
    "eval": EvalConfig,
}


@dataclass
class Part:
    """A recipe's choice for one slot: the registered component and its validated config."""

    component: Component
    config: BaseModel

    @property
    def name(self) -> str:
        return self.component.name

    @property
    def label(self) -> str:
        return f"{self.component.slot} '{self.name}' from package '{self.component.package}'"

    def build(self, *args):
        if self.component.slot == "optimizer" and len(args) == 1:  # build(model), as before parameter roles
            from lab.roles import parameters

            args = (parameters(args[0]), args[0])
        try:
            built = self.component.factory(self.config, *args)
        except PluginError:
            raise
        except LabError as e:
            if str(e).startswith(self.label):
                raise
            raise LabError(f"{self.label}: {e}") from None
        except Exception as e:  # a bug in the plugin: said with its package, the traceback kept
            raise PluginError(self.component.package, f"building {self.label}", e) from e
        expected = SLOTS[self.component.slot].interface
        if not isinstance(built, expected) and not (self.component.slot == "schedule" and callable(built)):
            raise TypeError(
                f"{self.label} built a {type(built).__name__}, "
                f"which is not a {expected.__module__}.{expected.__name__}"
            )
        if isinstance(built, nn.Module):
            built.lab_component = self.label  # named in messages about what it adds (lab/extras.py)
        return built


@dataclass
class Recipe:
    name: str
    source: str  # the file it came from, for messages
    model: ModelConfig
    train: TrainConfig
    generate: GenerateConfig
    eval: EvalConfig
    parts: dict[str, Part]  # slot -> Part
    layer_parts: dict[int, dict[str, Part]] = field(default_factory=dict)  # layer -> slot -> its own Part
    notes: list[str] = field(default_factory=list)  # what reading it changed that the user should know
    loggers: list[Part] = field(default_factory=list)  # [logger.NAME] tables, in the file's order
    schedules: dict[str, Part] = field(default_factory=dict)  # [schedule.QUANTITY] tables: quantity -> Part
    extensions: list[Part] = field(default_factory=list)  # [extension.NAME] tables, in the file's order

    def layer(self, index: int) -> dict[str, Part]:
        """The parts of block `index`: the recipe's, with that layer's own where [model.layers] sets them."""
        return {**self.parts, **self.layer_parts.get(index, {})}

    def to_dict(self) -> dict:
        """The resolved recipe, every default filled in, nested as in the TOML file."""
        out: dict[str, Any] = {"name": self.name}
        for key, section in (
            ("model", self.model),
            ("train", self.train),
            ("generate", self.generate),
            ("eval", self.eval),
        ):
            out[key] = section.model_dump()
        for slot, part in self.parts.items():
            table = _table(out, TABLES[slot])
            table["name"] = part.name
            table.update(part.config.model_dump(mode="json"))
        for layer, parts in sorted(self.layer_parts.items()):
            for slot, part in parts.items():
                out["model"].setdefault("layers", {}).setdefault(str(layer), {})[slot] = {
                    "name": part.name,
                    **part.config.model_dump(mode="json"),
                }
        for quantity, part in self.schedules.items():
            out["schedule"][quantity] = {"name": part.name, **part.config.model_dump(mode="json")}
        if self.loggers:
            out["logger"] = {part.name: part.config.model_dump(mode="json") for part in self.loggers}
        if self.extensions:
            out["extension"] = {part.name: part.config.model_dump(mode="json") for part in self.extensions}
        return _drop_none(out)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


def load_recipe(path, overrides=(), plugins: Registry | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    path = str(path)
    return resolve(read_toml(path), path, overrides, plugins)


def read_toml(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise LabError(f"recipe file not found: {path}. Recipes that ship with lab are in recipes/") from None
    except IsADirectoryError:
        raise LabError(f"{path} is a folder; give a recipe .toml file") from None
    except tomllib.TOMLDecodeError as e:
        raise LabError(f"cannot parse {path}: {e}. Fix the TOML syntax there") from None
    except UnicodeDecodeError as e:
        raise LabError(
            f"{path} is not UTF-8 text (bad byte at offset {e.start}); a recipe is a TOML file, "
            "saved as UTF-8"
        ) from None
    except OSError as e:
        raise LabError(f"cannot read recipe file {path}: {e.strerror}") from None


DROP = object()  # the value of '~section.table': remove that table (what `--drop section.table` gives)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value). The value is read as TOML (2, 1e-3,
    true, "x", [1, 2]); a bare word that is not TOML (sdpa) is taken as a string. '~section.key'
    (`--drop section.key`) -> (['section', 'key'], DROP)."""
    if text.startswith("~"):
        keys = text[1:].strip().split(".")
        if not all(keys):
            raise LabError(
                f"--drop expects a table's dotted name, got '{text[1:]}' (e.g. --drop extension.unet)"
            )
        return keys, DROP
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not k for k in key.strip().split(".")):
        raise LabError(f"--set expects section.key=value, got '{text}' (e.g. --set train.max_steps=100)")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip().split("."), parsed


def parse_option(text: str, flag: str = "--slurm-opt") -> tuple[str, Any]:
    """'key=value' (a scheduler's parameter, e.g. slurm_partition=gpu) -> ('key', value), the value
    read as TOML as --set reads it."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise LabError(f"{flag} expects KEY=VALUE, got '{text}' (e.g. {flag} slurm_partition=gpu)")
    return key.strip(), parse_override(f"x={text.partition('=')[2]}")[1]


def add_override_arguments(parser, every_run: bool = False) -> None:
    """--set SECTION.KEY=VALUE and --drop SECTION.TABLE (both repeatable, into args.overrides, in
    their order): what every command that reads a recipe takes."""
    where = " in every run" if every_run else ""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override a recipe value{where} (repeatable); the value is read as TOML",
    )
    parser.add_argument(
        "--drop",
        dest="overrides",
        action="append",
        type=lambda name: f"~{name}",
        metavar="SECTION.TABLE",
        help=f"remove a table the recipe has{where}, e.g. --drop extension.unet (repeatable)",
    )


def apply_overrides(raw: dict, overrides, notes: list | None = None) -> dict:
    """Set each section.key=value. `--set SLOT.name=X` that changes the component starts X's table
    afresh: X's defaults plus the keys set for it on the same command line, never the old component's
    settings (which it names in `notes`)."""
    parsed = [(text, *parse_override(text)) for text in overrides]
    for text, keys, value in parsed:
        if keys[-1] == "name" and _is_component_table(keys[:-1]):
            old = _get(raw, keys[:-1])
            if isinstance(old, dict) and old.get("name") != value:
                kept = {k: v for k, v in old.items() if keys[:-1] == ["schedule"] and isinstance(v, dict)}
                dropped = [k for k in old if k != "name" and k not in kept]
                if dropped and notes is not None:
                    notes.append(
                        f"--set {text}: [{'.'.join(keys[:-1])}] starts from {value}'s defaults; "
                        f"dropped {old.get('name')}'s {', '.join(dropped)}"
                    )
                old.clear()
                old.update(kept)  # [schedule.QUANTITY] tables are their own components: they stay
    for text, keys, value in parsed:
        if value is DROP:
            _drop(raw, keys)
            continue
        table = raw
        for i, k in enumerate(keys[:-1]):
            table = table.setdefault(k, {})
            if not isinstance(table, dict):
                raise LabError(f"--set {text}: '{'.'.join(keys[: i + 1])}' is a value, not a table")
        table[keys[-1]] = value
    return raw


def _drop(raw: dict, keys: list[str]) -> None:
    """Remove raw[keys...]: a table (an extension, a schedule quantity) or a value the recipe sets."""
    parent = _get(raw, keys[:-1])
    if not isinstance(parent, dict) or keys[-1] not in parent:
        name = ".".join(keys)
        raise LabError(
            f"--drop {name}: the recipe has no [{name}] table (nor a value of that name) to remove"
        )
    del parent[keys[-1]]


def _is_component_table(path: list[str]) -> bool:
    return tuple(path) in TABLES.values() or (
        len(path) == 4 and path[:2] == ["model", "layers"] and path[3] in LAYER_SLOTS
    )


def _get(raw: Any, path: list[str]):
    for key in path:
        if not isinstance(raw, dict):
            return None
        raw = raw.get(key)
    return raw


def resolve(raw: dict, source: str, overrides=(), plugins: Registry | None = None) -> Recipe:
    plugins = plugins or registry()
    notes: list[str] = []
    raw = apply_overrides(_copy(raw), overrides, notes)
    token = _overridden.set(frozenset(".".join(parse_override(o)[0]) for o in overrides))
    try:
        return _resolve(raw, source, plugins, notes)
    finally:
        _overridden.reset(token)


def _resolve(raw: dict, source: str, plugins: Registry, notes: list[str]) -> Recipe:
    name = raw.pop("name", None) or Path(source).stem
    base_tables = {slot: _copy(_get(raw, list(TABLES[slot])) or {}) for slot in LAYER_SLOTS}
    schedules = _resolve_schedules(raw, source, plugins)
    parts = {slot: _resolve_part(raw, slot, source, plugins) for slot in TABLES}
    layers = raw.get("model", {}).pop("layers", {}) if isinstance(raw.get("model"), dict) else {}
    loggers = _resolve_many(raw, "logger", source, plugins)
    extensions = _resolve_many(raw, "extension", source, plugins)
    allowed = set(SECTIONS) | {t[0] for t in TABLES.values()} | set(MANY.values())
    for key in raw:
        if key not in allowed:
            raise LabError(
                f"unknown table [{key}] in {source}.{did_you_mean(key, allowed)} "
                f"Tables are: {', '.join(sorted(allowed))}"
            )
    # Any: each key holds its own section's class (ModelConfig for "model"...), which a dict cannot say
    sections: dict[str, Any] = {
        key: _validate(cls, raw.get(key, {}), source, key) for key, cls in SECTIONS.items()
    }
    if sections["model"].vocab_size == "auto":
        sections["model"].vocab_size = _tokenizer_vocab(parts["tokenizer"], sections["model"].vocab_multiple)
    layer_parts = _resolve_layers(layers, base_tables, sections["model"].n_layer, source, plugins)
    recipe = Recipe(
        name=str(name),
        source=source,
        parts=parts,
        layer_parts=layer_parts,
        notes=notes,
        loggers=loggers,
        schedules=schedules,
        extensions=extensions,
        **sections,
    )
    check_parts(recipe)
    check_schedules(recipe)
    return recipe


def _resolve_many(raw: dict, slot: str, source: str, plugins: Registry) -> list[Part]:
    """The components of a slot that takes any number: each sub-table of [MANY[slot]] names one."""
    key = MANY[slot]
    tables = raw.pop(key, {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise LabError(
            f"{source}: [{key}] holds one table per {slot}, e.g.\n  [{key}.NAME]\n"
            f"available: {', '.join(sorted(plugins.components[slot])) or 'none installed'}"
        )
    parts = []
    for name, table in tables.items():
        component = plugins.get(slot, name, where=f"{source} [{key}.{name}]")
        parts.append(Part(component, _validate(component.Config, table, source, f"{key}.{name}", component)))
    return parts


def _resolve_schedules(raw: dict, source: str, plugins: Registry) -> dict[str, Part]:
    """The sub-tables of [schedule], taken out of it: {quantity: the schedule component that drives it}."""
    table = raw.get("schedule")
    if not isinstance(table, dict):
        return {}
    out = {}
    for quantity in [k for k, v in table.items() if isinstance(v, dict)]:
        sub, where = dict(table.pop(quantity)), f"schedule.{quantity}"
        if "name" not in sub:
            available = ", ".join(sorted(plugins.components["schedule"]))
            raise LabError(
                f"{source} [{where}] needs a name: the schedule component that drives {quantity}, e.g.\n"
                f'  [{where}]\n  name = "ramp"\navailable: {available}'
            )
        component = plugins.get("schedule", str(sub.pop("name")), where=f"{source} [{where}]")
        out[quantity] = Part(component, _validate(component.Config, sub, source, where, component))
    return out


def schedulable(recipe: Recipe) -> dict[str, str]:
    """{quantity: who takes it}: the trainer's quantities and those the recipe's components declare."""
    out = dict(TRAINER_QUANTITIES)
    parts = list(recipe.parts.values()) + [p for layer in recipe.layer_parts.values() for p in layer.values()]
    for part in parts:
        for quantity in cast(ComponentConfig, part.config).scheduled:  # the registry's Configs are ones
            out.setdefault(quantity, f"{part.component.slot} '{part.name}'")
    return out


def check_schedules(recipe: Recipe) -> None:
    known = schedulable(recipe)
    for quantity in recipe.schedules:
        if quantity not in known:
            raise LabError(
                f"{recipe.source} [schedule.{quantity}]: nothing in this recipe takes a scheduled "
                f"'{quantity}'.{did_you_mean(quantity, known)} Schedulable here: "
                + "; ".join(f"{q} ({who})" for q, who in known.items())
            )


def _resolve_layers(layers, base_tables: dict, n_layer: int, source: str, plugins: Registry) -> dict:
    """[model.layers.N.SLOT] tables -> {layer: {slot: Part}}. Without a name, a layer's table changes
    the recipe's settings of that slot for that layer; with another name, it is that component's
    table (its defaults plus the keys given)."""
    if not isinstance(layers, dict):
        raise LabError(f"{source}: [model.layers] must be a table of layers, e.g. [model.layers.3.attention]")
    out: dict[int, dict[str, Part]] = {}
    for spec, slots in layers.items():
        where = f"[model.layers.{spec}]"
        indices = _layer_indices(str(spec), n_layer, f"{source} {where}")
        if not isinstance(slots, dict):
            raise LabError(f"{source} {where} must be a table of slots, e.g. [model.layers.{spec}.attention]")
        for slot, table in slots.items():
            if slot not in LAYER_SLOTS:
                raise LabError(
                    f"{source} {where}: '{slot}' cannot be set per layer.{did_you_mean(slot, LAYER_SLOTS)} "
                    f"Per-layer slots: {', '.join(LAYER_SLOTS)}"
                )
            if not isinstance(table, dict):
                raise LabError(f"{source} {where}.{slot} must be a table, e.g. [model.layers.{spec}.{slot}]")
            base = base_tables[slot]
            table = (
                dict(table) if "name" in table and table["name"] != base.get("name") else {**base, **table}
            )
            component = plugins.get(slot, str(table.pop("name")), where=f"{source} {where}.{slot}")
            part = Part(
                component,
                _validate(component.Config, table, source, f"model.layers.{spec}.{slot}", component),
            )
            for i in indices:
                out.setdefault(i, {})[slot] = part
    return out


def _layer_indices(spec: str, n_layer: int, where: str) -> list[int]:
    """'3' -> [3]; '0-2' -> [0, 1, 2]; '1,3' -> [1, 3]; '-1' -> the last layer."""
    indices: list[int] = []
    try:
        for piece in spec.split(","):
            piece = piece.strip()
            if "-" in piece[1:]:
                lo, hi = piece[0] + piece[1:].split("-", 1)[0], piece[1:].split("-", 1)[1]
                indices += range(int(lo), int(hi) + 1)
            else:
                i = int(piece)
                indices.append(i + n_layer if i < 0 else i)
    except ValueError:
        raise LabError(
            f"{where}: '{spec}' is not a layer; write an index (3), a range (0-2), a list (1,3) or "
            f"-1 for the last layer"
        ) from None
    wrong = [i for i in indices if not 0 <= i < n_layer]
    if wrong or not indices:
        raise LabError(
            f"{where}: the model has {n_layer} layers (0 to {n_layer - 1}), so layer {spec} does not "
            f"exist; use an index below {n_layer} or raise [model] n_layer"
        )
    return sorted(set(indices))


def check_parts(recipe: Recipe) -> None:
    """Each component's settings checked against the rest of the recipe (the model's shape, the
    training layout) now, when the recipe is read, not when the model is built: each Config's
    `check_recipe(self, recipe)` (lab.slots.ComponentConfig) raises ValueError("what is wrong and how to
    fix it")."""
    every = [(f"[{'.'.join(TABLES[slot])}]", part) for slot, part in recipe.parts.items()]
    every += [
        (f"[model.layers.{i}.{slot}]", part)
        for i, parts in recipe.layer_parts.items()
        for slot, part in parts.items()
    ]
    every += [(f"[extension.{part.name}]", part) for part in recipe.extensions]
    for table, part in every:
        where = f"{recipe.source} {table} ({part.label})"
        try:
            cast(ComponentConfig, part.config).check_recipe(recipe)  # the registry's Configs are all ones
        except (ValueError, LabError) as e:
            raise LabError(f"{where}: {e}") from None
        except Exception as e:  # a bug in the plugin: said with its package, the traceback kept
            raise PluginError(part.component.package, f"check_recipe of {part.label}", e) from e
    optimizer = recipe.parts["optimizer"]
    if recipe.train.parallel == "fsdp" and not cast(ComponentConfig, optimizer.config).works_on_shards:
        raise LabError(
            f'{recipe.source} [train] parallel = "fsdp": {optimizer.label} needs whole parameters, '
            'and FSDP2 hands each process a shard of every one. Set train.parallel = "ddp", or '
            "choose another optimizer"
        )


def _tokenizer_vocab(tokenizer: Part, multiple: int) -> int:
    """vocab_size = "auto": the tokenizer's size, rounded up. Known only once the tokenizer is built
    (a trained BPE's size is in its file), so the recipe builds it here; `lab recipe` shows the number."""
    size = tokenizer.build().vocab_size
    return -(-size // multiple) * multiple


def _resolve_part(raw: dict, slot: str, source: str, plugins: Registry) -> Part:
    path = TABLES[slot]
    where = f"[{'.'.join(path)}]"
    parent = raw
    for key in path[:-1]:
        parent = parent.get(key, {})
        if not isinstance(parent, dict):
            raise LabError(f"{source}: '{key}' must be a table ([{key}]), got {parent!r}")
    table = parent.pop(path[-1], None)
    available = ", ".join(sorted(plugins.components[slot])) or "none installed"
    if not isinstance(table, dict) or "name" not in table:
        raise LabError(
            f'{source} needs a {where} table with a name, e.g.\n  {where}\n  name = "..."\n'
            f"available {slot} components: {available}"
        )
    table = dict(table)
    component = plugins.get(slot, str(table.pop("name")), where=f"{source} {where}")
    return Part(component, _validate(component.Config, table, source, ".".join(path), component))


def _validate(cls: type[BaseModel], table: Any, source: str, where: str, component=None) -> BaseModel:
    """Validate a table against a pydantic model; unknown keys are errors even if the model allows them."""
    label = f" for {component.slot} '{component.name}'" if component else ""
    if not isinstance(table, dict):
        raise LabError(f"{source}: '{where}' must be a table ([{where}]), got {table!r}")
    for key in table:
        if key not in cls.model_fields:
            known = ", ".join(cls.model_fields) or "none"
            raise LabError(
                f"unknown key '{key}' in {source} [{where}]{label}.{did_you_mean(key, cls.model_fields)}"
                f" Valid keys: {known}"
            )
    for key, value in table.items():
        if not _finite(value):
            raise LabError(
                f"{source} [{where}] {key} = {value!r}: a number must be finite (not nan or inf). "
                f"Fix it in the file or with --set {where}.{key}=..."
            )
    try:
        config = cls.model_validate(table)
    except ValidationError as err:
        raise LabError(_explain(err, source, where)) from None
    _resolve_paths(config, source, where)
    return config


def _resolve_paths(config: BaseModel, source: str, where: str) -> None:
    """Each PATH setting of config as its component gets it (see resolve_path)."""
    for key, info in type(config).model_fields.items():
        value = getattr(config, key)
        if not (isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("lab_path")):
            continue
        recipe_file = None if f"{where}.{key}" in _overridden.get() else source
        label = f"{source} [{where}] {key}"
        if isinstance(value, str):
            object.__setattr__(config, key, resolve_path(value, recipe_file, label))
        elif isinstance(value, list):
            resolved = [resolve_path(v, recipe_file, label) if isinstance(v, str) else v for v in value]
            object.__setattr__(config, key, resolved)


def _finite(value) -> bool:
    """No nan or inf anywhere in a setting: TOML allows them, and no setting means them."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(map(_finite, value))
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    return True


def _explain(err: ValidationError, source: str, where: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "string_type" and isinstance(e["input"], (int, float)) and key:
            # TOML (and --set, which reads its value as TOML) takes a bare 2024 or inf as a number
            msg += f'; to give text that looks like a number, quote it: {key} = "{e["input"]}"'
        if key:
            lines.append(
                f"{source} [{where}] {key} = {e['input']!r}: {msg}. "
                f"Fix it in the file or with --set {where}.{key}=..."
            )
        else:
            lines.append(f"{source} [{where}]: {msg}")
    return "\n".join(lines)


def _table(root: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        root = root.setdefault(key, {})
    return root


def _copy(d):
    return {k: _copy(v) for k, v in d.items()} if isinstance(d, dict) else d


def _drop_none(d):
    """TOML has no null: a None setting is left out, and reading it back gives the default again."""
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d
