"""The corpus that ships with lab, so `lab run recipes/gpt_small.toml` works with no network: the
tinyshakespeare text in this package, tokenized on first use into the user's cache and reused after.

The cache folder is written by lab.data.prepare like any other (temporary files renamed into place, meta.json
last), so a run killed while tokenizing, or two runs tokenizing at once, never leave a broken cache.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lab.data.prepare import prepare
from lab.data.tokens import SPLITS, token_dtype
from lab.errors import LabError
from lab.files import cache_folder
from lab.interfaces import Tokenizer

CORPUS = Path(__file__).with_name("tinyshakespeare.txt")
VAL_FRACTION = 0.1  # the last 10% of the text, as nanoGPT's shakespeare prepare.py holds out


def tinyshakespeare(tokenizer: Tokenizer) -> Path:
    """The folder of the shipped corpus tokenized with `tokenizer`, made on first use."""
    safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", tokenizer.name)  # a tokenizer's name may hold a '/'
    # Trained tokenizers share a name (bpe, char): the fingerprint tells their vocabularies apart.
    suffix = f"-{tokenizer.fingerprint()}" if tokenizer.files() else ""
    folder = cache_folder() / f"tinyshakespeare-{safe_name}{suffix}"
    if not is_prepared(folder, tokenizer):
        print(f"tokenizing the shipped tinyshakespeare with {tokenizer.name} into {folder} (first run only)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            prepare([CORPUS], folder, tokenizer, VAL_FRACTION, workers=1, progress=False)
        except OSError as e:
            raise LabError(
                f"cannot write the token cache {folder} ({e.strerror}); set LAB_CACHE to a "
                "folder you can write"
            ) from None
    return folder


def is_prepared(folder: Path, tokenizer: Tokenizer) -> bool:
    """Whether the folder holds this corpus, whole, tokenized by this tokenizer."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        itemsize = token_dtype(tokenizer.vocab_size).itemsize
        return (
            (meta["tokenizer"], meta["vocab_size"]) == (tokenizer.name, tokenizer.vocab_size)
            and meta.get("tokenizer_fingerprint", tokenizer.fingerprint()) == tokenizer.fingerprint()
            and meta["input_bytes"] == CORPUS.stat().st_size
            and all((folder / f"{s}.bin").stat().st_size == meta[f"{s}_tokens"] * itemsize for s in SPLITS)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False
