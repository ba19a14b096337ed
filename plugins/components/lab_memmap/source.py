"""The memmap data source: each row of a batch is a random window of the split's token file, or of its
shards (a folder with a manifest.json) read end to end as one stream, so windows are drawn across
every shard and one may span two.

A window's start is a function of (seed, split, step, row) and nothing else, so the batch of a step is
the same whenever it is asked for (exact resume needs no saved state) and whoever asks for it (a
process of a distributed run takes its rows of the same global batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lab.data.shards import MANIFEST, ShardStream, read_manifest, shard_paths
from lab.data.tokens import SPLITS, check_meta_matches, read_meta
from lab.errors import LabError
from lab.interfaces import Batch, DataContext, DataSource, document_ids
from lab_memmap.embedded import tinyshakespeare

SPLIT_IDS = {split: i for i, split in enumerate(SPLITS)}
SCAN_CHUNK = 1 << 24  # tokens per step of the largest-id scan: bounded memory on any file size


class MemmapData(DataSource):
    any_layout = True  # a window is a function of (seed, split, step, row): no position to carry over

    def __init__(self, config, context: DataContext):
        self.block_size, self.vocab_size = context.block_size, context.vocab_size
        self.seed = context.seed % 2**64  # numpy seeds are non-negative; a negative seed still works
        folder = Path(config.path).expanduser() if config.path else tinyshakespeare(context.tokenizer)
        self.folder = folder
        self.paths: dict[str, Path | str]  # a split's file, or its shards' pattern, for messages
        self.tokens: dict[str, Any]  # a split's tokens: a memmap, or a ShardStream over the shards
        meta: dict | None
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is not None:  # shards: each split's, in order, read as one stream
            check_meta_matches(manifest, folder, context.tokenizer)
            dtype = np.dtype(manifest["dtype"])
            self.paths = {split: f"{folder}/{split}-*.bin" for split in SPLITS}  # names in messages
            self.tokens = {
                split: ShardStream(list(shard_paths(folder, manifest, split)), dtype) for split in SPLITS
            }
            meta, self.meta_name = manifest, MANIFEST
        else:  # train.bin and val.bin
            check_folder(folder)
            meta, self.meta_name = read_meta(folder), "meta.json"
            if meta is not None:
                check_meta_matches(meta, folder, context.tokenizer)
            dtype = np.dtype(meta["dtype"] if meta else config.dtype)
            files = {split: folder / f"{split}.bin" for split in SPLITS}
            self.paths = dict(files)
            self.tokens = {split: open_tokens(files[split], dtype, meta) for split in SPLITS}
        max_id = meta.get("max_token_id") if meta else None
        if max_id is None:
            max_id = max(largest_id(tokens) for tokens in self.tokens.values())
        check_ids_fit(max_id, folder, context, have_meta=meta is not None)
        for split, tokens in self.tokens.items():
            check_long_enough(tokens, folder / f"{split}.bin", context.block_size)
        # Document-aligned rows: each window starts at an end-of-text token, drawn from their positions.
        self.documents, self.max_document_tokens = config.documents, config.max_document_tokens
        self.eot_id = context.tokenizer.eot_id
        if self.documents:
            self.doc_starts = {
                split: document_starts(tokens, self.eot_id, self.paths[split], context)
                for split, tokens in self.tokens.items()
            }

    def batch(self, split: str, step: int, rows: range) -> Batch:
        tokens, T = self.tokens[split], self.block_size
        # One slice per row into a preallocated array, then numpy copies for x and y: 0.19 ms for
        # B=64, T=1024, against 0.34 ms for one fancy index over all (B, T) positions. (torch's
        # .contiguous() for the same copies took 25 ms on a busy 2-core machine: it spreads small
        # copies over threads.)
        windows = np.empty((len(rows), T + 1), dtype=np.int64)
        for i, start in enumerate(self.window_starts(split, step, rows)):
            windows[i] = tokens[start : start + T + 1]
        if (
            windows.max(initial=0) >= self.vocab_size
        ):  # meta.json's max_token_id was trusted: check what is read
            raise LabError(
                f"{self.paths[split]} holds token id {windows.max()}, beyond the model's vocabulary of "
                f"{self.vocab_size} tokens, though its {self.meta_name} says otherwise: the file was changed "
                f"after lab prepare wrote it. Run lab prepare again into {self.folder}"
            )
        x, y = windows[:, :-1].copy(), windows[:, 1:].copy()  # y is x one token later
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if self.documents:
            assert self.eot_id is not None  # documents = true refuses a tokenizer without one
            return x, y, {"doc_ids": document_ids(x, self.eot_id, self.max_document_tokens)}
        return x, y

    def window_starts(self, split: str, step: int, rows) -> np.ndarray:
        """Where each row's window starts. One generator keyed by (seed, split, step) draws the starts
        of the step's global batch in row order, up to the last row asked for; so a row's start is the
        same whoever asks for it, and one generator per step (not per row) keeps this at ~10 us."""
        rng = np.random.default_rng([self.seed, SPLIT_IDS[split], step])
        if self.documents:  # a document's start: an end-of-text token's position
            starts = self.doc_starts[split]
            return starts[rng.integers(len(starts), size=max(rows, default=-1) + 1)[list(rows)]]
        starts = rng.integers(len(self.tokens[split]) - self.block_size, size=max(rows, default=-1) + 1)
        return starts[list(rows)]


def document_starts(
    tokens: np.ndarray, eot_id: int | None, path: Path | str, context: DataContext
) -> np.ndarray:
    """Positions of the end-of-text tokens a whole window (block_size + 1 tokens) can start at, read in
    chunks so a file of any size takes bounded memory."""
    if eot_id is None:
        raise LabError(
            f"[data] documents = true, but tokenizer '{context.tokenizer.name}' has no end-of-text token "
            "to find documents by; use a tokenizer with one, or set documents = false"
        )
    last = len(tokens) - context.block_size - 1  # the last start with a whole window after it
    found = [
        i + np.flatnonzero(tokens[i : min(i + SCAN_CHUNK, last + 1)] == eot_id)
        for i in range(0, max(last + 1, 0), SCAN_CHUNK)
    ]
    starts = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    if not len(starts):
        raise LabError(
            f"{path} has no end-of-text token ({eot_id}) with block_size + 1 = {context.block_size + 1} "
            "tokens after it, so [data] documents = true finds no document to start a row at: prepare "
            "the text as separate documents (lab prepare puts an end-of-text between them), or set "
            "documents = false"
        )
    return starts


def check_folder(folder: Path) -> None:
    make_it = f"make it with: lab prepare YOUR_TEXT --out {folder}"
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise LabError(f"data folder {folder} ([data] path) {what}; {make_it}")
    for split in SPLITS:
        if not (folder / f"{split}.bin").is_file():
            raise LabError(
                f"{folder / split}.bin not found: a data folder holds train.bin and val.bin; {make_it}"
            )


def open_tokens(path: Path, dtype: np.dtype, meta: dict | None) -> np.ndarray:
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise LabError(
            f"{path} is {size} bytes, not a whole number of {dtype.name} tokens ({dtype.itemsize} bytes "
            f"each): it is truncated or of another type; set [data] dtype to the type it was written "
            f"with, or re-create it with lab prepare"
        )
    count = size // dtype.itemsize
    split = path.stem
    if meta is not None and count != meta[f"{split}_tokens"]:
        raise LabError(
            f"{path} holds {count} tokens but {path.parent}/meta.json says {meta[f'{split}_tokens']}: the "
            f"folder was changed after lab prepare wrote it; run lab prepare again into {path.parent}"
        )
    if count == 0:
        return np.zeros(0, dtype=dtype)  # numpy cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


def largest_id(tokens: np.ndarray) -> int:
    """The largest token id, read in chunks so a file of any size takes bounded memory."""
    return max((int(tokens[i : i + SCAN_CHUNK].max()) for i in range(0, len(tokens), SCAN_CHUNK)), default=-1)


def check_ids_fit(max_id: int, folder: Path, context: DataContext, have_meta: bool) -> None:
    if max_id < context.vocab_size:
        return
    hint = "" if have_meta else ' If the files hold uint32 tokens, set [data] dtype = "uint32".'
    raise LabError(
        f"the token files in {folder} hold ids up to {max_id}, but the model's vocabulary has "
        f"{context.vocab_size} tokens: set [model] vocab_size to at least {max_id + 1}, or prepare the "
        f"data with the recipe's tokenizer.{hint}"
    )


def check_long_enough(tokens: np.ndarray, path: Path, block_size: int) -> None:
    if len(tokens) > block_size:  # a window is block_size + 1 tokens: x and, one later, y
        return
    more = " (lab prepare --val-fraction above 0 fills it)" if path.stem == "val" and not len(tokens) else ""
    raise LabError(
        f"{path} holds {len(tokens)} tokens{more}, too few for one window of [model] block_size = "
        f"{block_size} plus 1: lower block_size below {max(len(tokens), 1)}, or prepare more text"
    )
