"""A data folder's token files, as `lab prepare` writes them and the data sources and `lab eval` read
them: train.bin and val.bin (token ids, uint16 when the vocabulary fits, else uint32) and meta.json
(the tokenizer's name and fingerprint, vocab_size, dtype, token counts). One reader and one check of
meta.json for every command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lab.errors import LabError
from lab.interfaces import Tokenizer

META_KEYS = ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens")


def read_meta(folder: Path) -> dict | None:
    path = folder / "meta.json"
    if not path.exists():
        return None
    redo = f"run lab prepare again, or delete {path} and set [data] dtype"
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise LabError(f"{path} is not valid JSON ({e}); {redo}") from None
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise LabError(f"{path} lacks {', '.join(missing)}; {redo}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise LabError(f"{path} has dtype {meta['dtype']!r}; token files are uint16 or uint32. {redo}")
    return meta


def check_meta_matches(meta: dict, folder: Path, tokenizer: Tokenizer) -> None:
    """The folder's tokens were made by this tokenizer: its name and, when meta.json has it, its
    fingerprint (trained tokenizers share a name), else its vocabulary size."""
    fingerprint = meta.get("tokenizer_fingerprint")  # written by lab prepare since tokenizers can be trained
    if fingerprint is not None and (meta["tokenizer"], fingerprint) == (
        tokenizer.name,
        tokenizer.fingerprint(),
    ):
        return
    if fingerprint is not None and meta["tokenizer"] == tokenizer.name:
        made_by = describe(meta["tokenizer"], fingerprint, meta.get("tokenizer_files") or {})
        recipe_has = describe(tokenizer.name, tokenizer.fingerprint(), tokenizer.files())
        raise LabError(
            f"{folder}/meta.json: the tokens were made by another tokenizer {made_by} than the recipe's "
            f"[tokenizer] {recipe_has}; point [tokenizer] at the tokenizer the data was made with, or re-run "
            f"lab prepare YOUR_TEXT --out {folder} --recipe RECIPE"
        )
    if (meta["tokenizer"], meta["vocab_size"]) != (tokenizer.name, tokenizer.vocab_size):
        raise LabError(
            f"{folder}/meta.json: the tokens were made by tokenizer '{meta['tokenizer']}' ({meta['vocab_size']} "
            f"tokens) but the recipe's [tokenizer] is '{tokenizer.name}' ({tokenizer.vocab_size} tokens); "
            f'set [tokenizer] name = "{meta["tokenizer"]}", or re-run: '
            f"lab prepare YOUR_TEXT --out {folder} "
            + (
                "--recipe RECIPE" if tokenizer.files() else f"--tokenizer {tokenizer.name}"
            )  # settings come from a recipe
        )


def describe(name: str, fingerprint: str, files: dict) -> str:
    where = ", ".join(f"{setting} = {str(path)!r}" for setting, path in files.items())
    return f"'{name}' ({where + ', ' if where else ''}fingerprint {fingerprint})"


SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest type that holds every id: half the disk and memory bandwidth for GPT-2's 50257."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
