"""A run folder (and a prepared data folder) carries its tokenizer: copies of the files it was built from.

    tokenizer/tokenizer.json   a copy of each file the tokenizer names in Tokenizer.files()
    tokenizer/files.json       {"name", "fingerprint", "files": {setting: copy's name, ...}}

Reading a run (lab.runs.load: lab generate, export-hf, eval, serve) and resuming it build the
tokenizer from these copies, so the run works after the original files are moved or deleted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lab.errors import LabError
from lab.files import fsync, replacing, sha256, write_text_atomically
from lab.interfaces import Tokenizer
from lab.runs.layout import TOKENIZER, TOKENIZER_MANIFEST


def keep(tokenizer: Tokenizer, folder) -> None:
    """Copy the tokenizer's files into `folder` (a run's tokenizer/), each atomically, the manifest last."""
    folder = Path(folder)
    files = tokenizer.files()
    if not files:
        return  # its files ship with its package
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for setting, path in sorted(files.items()):
        name = Path(path).name
        if name in names.values() or name == TOKENIZER_MANIFEST:
            name = f"{setting}-{name}"
        _copy_atomically(Path(path), folder / name)
        names[setting] = name
    manifest = {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint(), "files": names}
    write_text_atomically(folder / TOKENIZER_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    fsync(folder)


def _copy_atomically(source: Path, target: Path) -> None:
    with open(source, "rb") as f, replacing(target, "wb") as copy:
        shutil.copyfileobj(f, copy)


def use_kept(raw: dict, run_dir, source: str | None = None) -> None:
    """Point a raw recipe's [tokenizer] settings at the copies kept in run_dir/tokenizer/ (if the run
    kept any, for the same tokenizer). source: the recipe file a resumed run was started with; its
    tokenizer files, where they still exist, must be the run's own."""
    folder = Path(run_dir) / TOKENIZER
    try:
        manifest = json.loads((folder / TOKENIZER_MANIFEST).read_text())
    except (OSError, ValueError):
        return
    table = raw.get("tokenizer")
    if not isinstance(table, dict) or table.get("name") != manifest.get("name"):
        return  # another tokenizer: the data and shape checks say what differs
    for setting, name in manifest.get("files", {}).items():
        kept, given = folder / name, table.get(setting)
        if source and isinstance(given, str) and Path(given).is_file():
            if sha256(Path(given)) != sha256(kept):
                raise LabError(
                    f"{source} [tokenizer] {setting} = '{given}' is not the tokenizer {run_dir} was trained "
                    f"with (a copy of that one is kept in {kept}). A run keeps its tokenizer: start a new run "
                    f"with --set train.out_dir=..., or point [tokenizer] {setting} at {kept}"
                )
            continue  # the same file: the recipe stays as the user wrote it
        table[setting] = str(kept)
