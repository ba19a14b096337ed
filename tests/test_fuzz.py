"""Fuzzing the command line: whatever a user types, and whatever a recipe holds, `lab` ends with exit
status 0 or 2 and a message, never a traceback. Every command is driven in-process through
lab.commands.cli.main with values drawn by hypothesis from what users get wrong: nan and inf, negative and
huge numbers, empty and non-UTF-8 text, files where folders belong and the other way round, binary
files, tables where values belong. Bounded to about a minute of the suite: few examples per
command, each small (a 1-step run of a tiny model).

LAB_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py explores further."""

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import counting_tokens, tiny_recipe

from lab.commands.cli import build_parser, main
from lab.model import GPT
from lab.recipe import load_recipe
from lab.runs import checkpoint

pytestmark = (
    pytest.mark.slow
)  # property-based fuzzing of every command; each command's own tests cover its messages

EXAMPLES = int(os.environ.get("LAB_FUZZ_EXAMPLES", "0"))
ROOT = Path(__file__).resolve().parents[1]


def fuzz(examples: int):
    """hypothesis settings: derandomized so the suite is the same on every run (LAB_FUZZ_EXAMPLES
    explores at random, with more examples)."""
    return settings(
        max_examples=EXAMPLES or examples,
        deadline=None,
        derandomize=not EXAMPLES,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


BASE = tiny_recipe(
    "fuzz",
    """
[schedule]
name = "cosine"
warmup_steps = 1

[train]
batch_size = 2
max_steps = 1
eval_interval = 1
eval_batches = 1
log_interval = 1
checkpoint_interval = 1
device = "cpu"
out_dir = "{out}"

[generate]
num_samples = 1
max_new_tokens = 2
""",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Files and folders of every kind a user might point a command at."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.set_num_threads(1)
    data = root / "data"
    counting_tokens(data)
    (root / "recipe.toml").write_text(BASE.format(data=data, out=root / "runs" / "r"))
    recipe = load_recipe(root / "recipe.toml")
    checkpoint.save(root / "run", 0, GPT(recipe), recipe.to_toml(), {"step": 0})  # a run folder to read
    (root / "text.txt").write_text("Hello there.\nGeneral Kenobi.\n" * 20)
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "latin1.txt").write_bytes("café ".encode("latin-1") * 10)
    (root / "junk.jsonl").write_text('{"text": 3}\n[1, 2]\nnot json\n')
    (root / "empty.txt").write_text("")
    (root / "folder").mkdir()
    (root / "foreign").mkdir()
    (root / "foreign" / "train.bin").write_bytes(b"a user's file, not lab's")
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}')
    torch.save({"wte.weight": 3, "h.0": [1, 2]}, hf / "pytorch_model.bin")
    return root


PATHS = [
    "recipe.toml",
    "run",
    "text.txt",
    "binary.bin",
    "latin1.txt",
    "junk.jsonl",
    "empty.txt",
    "folder",
    "foreign",
    "hf",
    "missing",
    "run/checkpoints",
    "data",
    "data/train.bin",
    "",
    "-",
    "text.txt/below",
]
NUMBERS = st.one_of(
    st.integers(-3, 12),
    st.integers(),
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0]),
)
WORDS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "nan",
            "inf",
            "-1",
            "0",
            "1e999",
            "0x10",
            "true",
            "[]",
            "{}",
            "\udcff",
            "\x00",
            "sdpa",
            "cpu",
            "cuda",
            "auto",
            "1e-320",
            "5e-324",
            "1e308",
            str(10**30),
            str(-(10**30)),
            "-0.0",
            "1e-5",
        ]
    ),
)


def lab(world, argv) -> tuple[int, str]:
    """main(argv) in the world folder: (exit status, stderr). argparse's own usage errors exit 2 too."""
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(world)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = main([str(a) for a in argv])
            except SystemExit as e:
                status = e.code
    finally:
        os.chdir(cwd)
    return status, err.getvalue()


def check(world, argv) -> None:
    status, err = lab(world, argv)  # anything but a LabError or a usage error propagates: a traceback
    assert status in (0, 2), (argv, status, err)
    assert "Traceback" not in err, (argv, err)


def flags(options: dict):
    """A strategy for argv tails: a subset of `options` (flag -> value strategy, or None for a switch)."""

    def pairs(chosen):
        return st.tuples(
            *[
                st.just([flag]) if options[flag] is None else options[flag].map(lambda v, f=flag: [f, v])
                for flag in chosen
            ]
        ).map(lambda ps: [a for p in ps for a in p])

    return st.lists(st.sampled_from(sorted(options)), unique=True, max_size=4).flatmap(pairs)


PATH = st.sampled_from(PATHS)
# Counts that size the work (samples, tokens, steps) stay small: a valid huge one is work, not an error.
SMALL = st.one_of(
    st.integers(-2, 6).map(str), st.sampled_from(["nan", "1e999", "", "x", "-0", "0x10", "\udcff"])
)
ANY = st.one_of(NUMBERS.map(str), WORDS)
SETTING_KEYS = [
    "train.max_steps",
    "train.batch_size",
    "train.lr",
    "optimizer.lr",
    "optimizer.betas",
    "optimizer.weight_decay",
    "schedule.warmup_steps",
    "schedule.name",
    "model.n_head",
    "model.dropout",
    "model.attention.name",
    "model.position",
    "model",
    "train",
    "data.path",
    "data.dtype",
    "generate.temperature",
    "generate.top_p",
    "generate.top_k",
    "generate.prompt",
    "train.device",
    "train.precision",
    "train.out_dir",
    "train.global_batch_size",
    "tokenizer.name",
    "name",
    "model.vocab_size",
    "train.seed",
    "generate.seed",
    "train.grad_clip",
    "x.y.z",
    "",
    ".",
]
SETTING = st.tuples(st.sampled_from(SETTING_KEYS), ANY).map(lambda kv: f"{kv[0]}={kv[1]}")
SETS = st.lists(SETTING, max_size=3).map(lambda sets: [a for s in sets for a in ("--set", s)])


SIZES = {"train.max_steps": 8, "train.batch_size": 8, "train.global_batch_size": 8, "model.vocab_size": 60000}


def small_sizes(argv):
    """Keep a run that the fuzzer makes valid small: a valid 10**9 steps is work, not an error."""
    for i, a in enumerate(argv):
        key, _, value = str(a).partition("=")
        try:
            if key in SIZES and abs(float(value)) > SIZES[key]:
                argv[i] = f"{key}=2"
        except ValueError:
            pass
    return argv


@fuzz(25)
@given(args=st.tuples(PATH, SETS))
def test_lab_recipe(world, args):
    check(world, ["recipe", args[0], *args[1]])


@fuzz(10)
@given(path=st.one_of(PATH, st.none()))
def test_lab_plugins(world, path):
    check(world, ["plugins"] + ([path] if path else []))


# A recipe file's content: the base recipe with a key set to anything, a table where a value belongs,
# a value where a table belongs, or bytes that are not TOML or not UTF-8.
TOML_VALUES = st.recursive(
    st.one_of(st.integers(), st.floats(), st.text(max_size=8), st.booleans()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)


@fuzz(25)
@given(
    where=st.sampled_from(
        [
            "model",
            "model.attention",
            "model.n_head",
            "train",
            "train.max_steps",
            "data",
            "optimizer",
            "optimizer.lr",
            "schedule",
            "generate",
            "generate.temperature",
            "tokenizer",
            "name",
            "extra",
            "model.mlp.expansion",
        ]
    ),
    value=TOML_VALUES,
    raw=st.one_of(st.none(), st.binary(max_size=40)),
)
def test_recipe_files(world, where, value, raw):
    import tomllib

    path = Path(tempfile.mkdtemp(dir=world)) / "r.toml"
    if raw is not None:
        path.write_bytes(raw)
    else:
        recipe = tomllib.loads((world / "recipe.toml").read_text())
        table, *keys = where.split(".")
        if keys:
            recipe.setdefault(table, {})[keys[0]] = value
        else:
            recipe[table] = value
        path.write_text(tomli_w.dumps(recipe))
    check(world, ["recipe", path])
    check(world, ["plugins", path])


@fuzz(8)
@given(sets=SETS)
def test_lab_run(world, sets):
    out = tempfile.mkdtemp(dir=world)
    check(world, small_sizes(["run", "recipe.toml", "--set", f"train.out_dir={out}/r", *sets]))


GENERATE = {
    "--prompt": st.one_of(st.text(max_size=10), WORDS),
    "--prompt-file": PATH,
    "--num-samples": SMALL,
    "--max-new-tokens": SMALL,
    "--temperature": ANY,
    "--top-k": ANY,
    "--top-p": ANY,
    "--seed": ANY,
    "--no-cache": None,
    "--ignore-eos": None,
    "--device": WORDS,
    "-o": PATH,
}


@fuzz(30)
@given(run=st.one_of(st.just("run"), PATH), rest=flags(GENERATE))
def test_lab_generate(world, run, rest):
    check(world, ["generate", run, *rest])


@fuzz(15)
@given(
    inputs=st.lists(PATH, min_size=1, max_size=2),
    out=st.one_of(PATH, st.just("prepared")),
    rest=flags(
        {
            "--tokenizer": WORDS,
            "--val-fraction": ANY,
            "--workers": st.one_of(st.integers(-2, 1).map(str), WORDS),
        }
    ),
)
def test_lab_prepare(world, inputs, out, rest):
    check(world, ["prepare", *inputs, "--out", out, *rest])


@fuzz(12)
@given(source=PATH, out=st.one_of(PATH, st.just("imported"), st.just("exported")))
def test_lab_import_and_export_hf(world, source, out):
    check(world, ["import-hf", source, "--out", out])
    check(world, ["export-hf", source, "--out", out])


KNOWN = {"plugins", "recipe", "run", "prepare", "generate", "import-hf", "export-hf"}


@fuzz(20)
@given(args=st.lists(st.one_of(ANY, PATH, st.sampled_from(["--help", "--out", "--set", "-o"])), max_size=4))
def test_commands_that_plugins_add_parse_their_arguments(world, args):
    """A command added through lab_commands may start a server or a long job: only its argument
    parsing is fuzzed here (its own tests drive it)."""
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in sorted(set(commands) - KNOWN):
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args([name, *args])
        except SystemExit as e:
            assert e.code in (0, 2)


# Files lab wrote, then damaged: random bytes appended, the file cut short, or bytes replaced. Every
# command that reads one warns and goes on, or says which file in one message; never a traceback.
def damage(data: bytes, how: str, extra: bytes, at: int) -> bytes:
    at = at % (len(data) + 1)
    if how == "append":
        return data + extra
    if how == "truncate":
        return data[:at]
    return data[:at] + extra + data[at + len(extra) :]


DAMAGE = st.tuples(
    st.sampled_from(["append", "truncate", "replace"]),
    st.binary(min_size=1, max_size=12),
    st.integers(0, 10**6),
)


@pytest.fixture(scope="module")
def damaged_world(world, tmp_path_factory):
    """A run folder with every file lab writes and reads back: metrics.jsonl, eval.json, a kept
    tokenizer (its manifest and files), a prepared data folder (meta.json), a sweep folder."""
    from serving import make_run

    from lab.runs import tokenizer_files

    root = tmp_path_factory.mktemp("damaged")
    run = make_run(root / "run")
    (run / "eval.json").write_text(
        json.dumps({"text": {"t.txt": {"loss": 1.0, "checkpoint": "x", "step": 6}}})
    )
    recipe = load_recipe(
        ROOT / "recipes" / "shakespeare_char.toml", ["model.n_layer=1", "model.n_embd=16", "model.n_head=2"]
    )
    assert main(["prepare", str(world / "text.txt"), "--out", str(root / "data")]) == 0
    char = root / "char"  # a run whose tokenizer's files it keeps (tokenizer/files.json, vocab.json)
    checkpoint.save(char, 0, GPT(recipe), recipe.to_toml(), {"step": 0})
    (char / "recipe.toml").write_text(recipe.to_toml())
    tokenizer_files.keep(recipe.parts["tokenizer"].build(), char / tokenizer_files.FOLDER)
    sweep = root / "sweep"
    sweep.mkdir()
    shutil.copytree(run, sweep / "cell")
    (sweep / "sweep.json").write_text(
        json.dumps({"recipe": "r.toml", "vary": [], "seeds": [0], "set": [], "resolved": {}})
    )
    return root


# file -> the commands that read it ({root}: the damaged copy of damaged_world).
READERS = {
    "run/metrics.jsonl": [["compare", "{root}/run", "-o", "{root}/c.png"], ["compare", "{root}/sweep"]],
    "sweep/cell/metrics.jsonl": [["compare", "{root}/sweep"]],
    "run/eval.json": [["eval", "{root}/run", "--text", "{root}/text.txt"]],
    "sweep/sweep.json": [["compare", "{root}/sweep"]],
    "data/meta.json": [["eval", "{root}/run", "--text", "{root}/data"]],
    "char/tokenizer/files.json": [["generate", "{root}/char", "--max-new-tokens", "2", "--num-samples", "1"]],
    "char/tokenizer/vocab.json": [["generate", "{root}/char", "--max-new-tokens", "2", "--num-samples", "1"]],
    "char/recipe.toml": [["compare", "{root}/char"]],
}


@fuzz(4)
@given(damage_=DAMAGE)
@pytest.mark.parametrize("file", sorted(READERS))
def test_damaged_files(world, damaged_world, file, damage_):
    root = Path(tempfile.mkdtemp(dir=world))
    for name in ("run", "char", "data", "sweep"):
        shutil.copytree(damaged_world / name, root / name)
    shutil.copy(world / "text.txt", root / "text.txt")
    path = root / file
    path.write_bytes(damage(path.read_bytes(), *damage_))
    for argv in READERS[file]:
        check(world, [a.format(root=root) for a in argv])


def takes_text(annotation) -> bool:
    """A setting whose type admits a str (str, str | None, list[str], Literal of words...)."""
    import typing

    if annotation is str:
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return any(isinstance(a, str) for a in typing.get_args(annotation))
    return any(takes_text(a) for a in typing.get_args(annotation))


def string_settings() -> list[list[str]]:
    """--set arguments that reach each string setting of the core and of every installed component:
    [the component's name, if the table must name it, then KEY]."""
    from lab.plugins import registry
    from lab.recipe import MANY, SECTIONS, TABLES

    found = [
        [f"{section}.{key}"]
        for section, cls in SECTIONS.items()
        for key, info in cls.model_fields.items()
        if takes_text(info.annotation)
    ]
    for slot, components in registry().components.items():
        for name, c in sorted(components.items()):
            table = ".".join(TABLES[slot]) if slot in TABLES else f"{MANY[slot]}.{name}"
            named = [f"{table}.name={name}"] if slot in TABLES else []
            for key, info in c.Config.model_fields.items():
                if takes_text(info.annotation):
                    found.append([*named, f"{table}.{key}"])
    return found


# Values TOML reads as numbers (or booleans) where a setting wants text.
NOT_TEXT = st.sampled_from(
    ["2024", "inf", "-inf", "nan", "-0.5", "1e999", "0x10", "true", str(10**30), "[1]", "{a = 1}"]
)


@fuzz(40)
@given(
    setting=st.sampled_from(string_settings()),
    value=NOT_TEXT,
    command=st.sampled_from(["recipe", "plugins", "run"]),
)
def test_numbers_where_strings_belong(world, setting, value, command):
    *named, key = setting
    sets = [a for s in [*named, f"{key}={value}"] for a in ("--set", s)]
    if command == "recipe":
        check(world, ["recipe", "recipe.toml", *sets])
    else:
        out = tempfile.mkdtemp(dir=world)
        check(world, small_sizes([command, "recipe.toml", "--set", f"train.out_dir={out}/r", *sets]))


def test_every_string_setting_is_reached():
    keys = {s[-1] for s in string_settings()}
    assert {
        "train.out_dir",
        "train.device",
        "generate.prompt",
        "tokenizer.vocab",
        "data.path",
        "logger.wandb.project",
    } <= keys
