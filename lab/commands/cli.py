"""The `lab` command. Each subcommand's work lives in its own module; this file only parses.

A LabError (something the user can fix) prints one message and exits with status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lab.errors import DEBUG_ENV, LabError, PluginError, SaidByRank0, debugging
from lab.plugins import lazy_command, registry
from lab.recipe import add_override_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lab", description="A laboratory for GPT-style language models.")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"print the traceback of an error in plugin code (also: {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plugins", help="list every slot's components and the packages they come from")
    p.add_argument("recipe", nargs="?", help="mark the components this recipe uses")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("recipe", help="print a recipe fully resolved, every default filled in")
    p.add_argument("recipe")
    add_override_arguments(p)
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser("run", help="train a model from a recipe (resumes if its run folder has a checkpoint)")
    p.add_argument("recipe")
    add_override_arguments(p)
    p.set_defaults(func=lazy_command("lab.commands.run", "cli_run"))

    p = sub.add_parser(
        "prepare",
        help="tokenize text, Parquet or a Hugging Face dataset into token files (sharded past one file)",
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="text files, .jsonl with a 'text' field, .parquet, or folders of them (or --dataset)",
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="NAME",
        help="a registered tokenizer (`lab plugins` lists them); "
        "default: the only one that needs no settings",
    )
    p.add_argument(
        "--recipe",
        default=None,
        metavar="RECIPE",
        help="use this recipe's [tokenizer] with its settings (e.g. a trained tokenizer.json)",
    )
    add_override_arguments(p)
    from lab.data.text import add_reading_arguments

    add_reading_arguments(p)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="share of documents held out (default 0.1)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="tokenizing processes (default: one per core on large inputs)",
    )
    count = _lazy_type("lab.commands.prepare", "token_count")
    shards = p.add_argument_group(
        "sharded output (any of these writes shards and a manifest.json instead of train.bin / val.bin)"
    )
    shards.add_argument(
        "--shard-tokens", type=count, default=None, metavar="N", help="tokens per shard, e.g. 100M (default)"
    )
    shards.add_argument(
        "--val-tokens",
        type=count,
        default=None,
        metavar="N",
        help="the input's first N tokens are val, e.g. 10M",
    )
    shards.add_argument(
        "--max-tokens", type=count, default=None, metavar="N", help="stop after N tokens, e.g. 10B"
    )
    shards.add_argument("--slurm", action="store_true", help="tokenize on SLURM as one job array (submitit)")
    shards.add_argument(
        "--slurm-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a submitit/SLURM parameter, e.g. slurm_partition=cpu, timeout_min=240, cpus_per_task=16",
    )
    shards.add_argument(
        "--tasks", type=int, default=None, metavar="N", help="SLURM tasks (default: one per part)"
    )
    shards.add_argument("--dry-run", action="store_true", help="print the tasks, one command each, and stop")
    shards.add_argument(
        "--task", default=None, metavar="I/N", help="do task I of N only (what --dry-run prints)"
    )
    shards.add_argument("--slurm-cluster", default=None, help=argparse.SUPPRESS)  # tests: submitit's 'local'
    p.set_defaults(func=lazy_command("lab.commands.prepare", "cli_prepare"))

    p = sub.add_parser("generate", help="sample text from a trained run folder")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", default=None)
    p.add_argument("--prompt-file", default=None, metavar="F")
    p.add_argument("--num-samples", type=int, default=None, metavar="N")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="M")
    p.add_argument("--temperature", type=float, default=None, metavar="T", help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None, metavar="K")
    p.add_argument("--top-p", type=float, default=None, metavar="P")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the decoding step through torch.compile (compiled once per shape, cached on disk; "
        "worth it for long samples)",
    )
    p.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")
    p.add_argument("--device", default="auto")
    p.add_argument("-o", "--output", default=None, metavar="FILE")
    p.set_defaults(func=lazy_command("lab.commands.generate", "cli_generate"))

    registry().call_each("lab_commands", "its lab_commands hook", subparsers=sub)  # commands plugins add
    return parser


def _lazy_type(module: str, name: str):
    """An argparse type whose function lives in a command's module, imported when a value is parsed:
    `lab plugins` needn't load what `lab prepare` uses."""

    def convert(text):
        import importlib

        return getattr(importlib.import_module(module), name)(text)

    convert.__name__ = name.replace("_", " ")  # argparse names it in "invalid token count value"
    return convert


def cmd_plugins(args) -> int:
    from lab.recipe import load_recipe

    plugins = registry()
    used: dict[tuple[str, str], list[int] | None] = {}  # (slot, name) -> the layers it is on; None: all
    if args.recipe:
        recipe = load_recipe(args.recipe, plugins=plugins)
        for part in [*recipe.parts.values(), *recipe.loggers, *recipe.schedules.values(), *recipe.extensions]:
            used[part.component.slot, part.name] = None
        for layer in range(recipe.model.n_layer):
            for slot, part in recipe.layer_parts.get(layer, {}).items():
                used.setdefault((slot, part.name), [])
                layers = used[slot, part.name]
                if layers is not None:
                    layers.append(layer)
    for slot, components in plugins.components.items():
        print(f"{slot}:")
        if not components:
            print("    (none installed)")
        width = max((len(n) for n in components), default=0)
        for name, c in sorted(components.items()):
            mark = "*" if (slot, name) in used else " "
            layers = used.get((slot, name))
            on = f"  (layers {', '.join(map(str, layers))})" if layers else ""
            print(f"  {mark} {name:<{width}}  [{c.package}]  {c.description}{on}")
    if args.recipe:
        print(f"\n* used by {args.recipe}")
    for package, error in plugins.failures:
        print(f"\nfailed to load plugin package '{package}': {error}")
    return 0


def cmd_recipe(args) -> int:
    from lab.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    for note in recipe.notes:
        print(f"note: {note}", file=sys.stderr)
    print(recipe.to_toml(), end="")
    return 0


def installed_lab() -> Path | None:
    """The folder of the lab package that pip installed (its source folder, installed editable)."""
    import json
    from importlib import metadata

    try:
        dist = metadata.distribution("lab")
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, ValueError, OSError):
        return None
    url = direct.get("url", "")
    if direct.get("dir_info", {}).get("editable") and url.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(url).path)) / "lab"
    return Path(str(dist.locate_file("lab")))


def warn_if_shadowed() -> None:
    """Say so when this lab is not the installed one: `python -m lab` (or `import lab`) run in a
    folder holding another lab/ picks that one up first, and its errors would make no sense."""
    import lab

    here, installed = Path(lab.__file__).resolve().parent, installed_lab()
    if installed is not None and installed.exists() and here != installed.resolve():
        print(
            f"warning: lab is imported from {here}, not from the installed lab ({installed}): the folder "
            f"{here.parent} (the current folder?) holds a lab/ that shadows it. Run from another folder, "
            "use the `lab` command, or `python -P -m lab` (Python 3.11+)",
            file=sys.stderr,
        )


def main(argv=None) -> int:
    warn_if_shadowed()
    debug = debugging() or "--debug" in (sys.argv[1:] if argv is None else argv)[:1]
    try:
        args = build_parser().parse_args(argv)
        return args.func(args) or 0
    except LabError as e:
        if isinstance(e, PluginError) and debug:
            print(e.traceback, end="", file=sys.stderr)
        if not isinstance(e, SaidByRank0):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk that a command did not name itself
        from lab.files import DISK_ERRORS, cannot_write

        if e.errno not in DISK_ERRORS:
            raise
        print(f"error: {cannot_write(e.filename or 'a file', e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
