"""`lab prepare --shard-tokens N`: a corpus of any size as token files of N tokens each, with a manifest.

    lab prepare fineweb/ --out data/fineweb --shard-tokens 100M --val-tokens 10M

The input is cut into *parts*: each input file, or each shard of a Hugging Face dataset. A part is
tokenized on its own into shards named SPLIT-PART-K.bin (K counts that part's shards of that split;
only a part's last shard of a split holds fewer than N tokens), written under temporary names and
renamed into place when the part is whole; then parts/PART.json records its shards (names, token
counts, SHA-256) and what was dropped. A part with a record is done: an interrupted prepare (Ctrl-C, a
full disk, a killed job) run again continues with the next part, and SLURM tasks (`--slurm`, or
`--task I/N` from another queue) each do their share of the parts. The last step checks every part's
shards against its record and writes manifest.json: the shards of each split in input order, their
token counts and SHA-256, the tokenizer's fingerprint, the input and the settings. A data source reads
a split's shards as one stream.

Every document starts with the tokenizer's end-of-text token, so the shards of every part put end to
end separate documents the same way. A document goes to val by a hash of its text (--val-fraction),
or, with --val-tokens N, the first documents of the input go to val until it holds N tokens (the
speedrun's validation set is the first tokens of FineWeb's); --max-tokens stops after N tokens.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from lab.data.prepare import TokenWriter, document_segments, make_folder, tokenize_all, work_items
from lab.data.text import (
    DatasetSpec,
    Reading,
    dataset_documents,
    dataset_parts,
    documents,
    find_input_files,
    open_dataset,
)
from lab.data.tokens import SPLITS, token_dtype
from lab.errors import LabError
from lab.files import fsync, remove_stale_temporaries, sha256, write_text_atomically
from lab.interfaces import Tokenizer
from lab.runs import tokenizer_files
from lab.runs.layout import TOKENIZER

MANIFEST = "manifest.json"
PARTS = "parts"  # the folder of part records
FORMAT = "lab-shards-1"
MANIFEST_KEYS = ("format", "tokenizer", "vocab_size", "dtype", "shards", "train_tokens", "val_tokens")


@dataclass
class Settings:
    """Everything that decides a sharded folder's bytes: a re-run with other settings is refused, so
    the parts of one folder were all made the same way. Plain data, so SLURM tasks can carry it."""

    inputs: list[str]
    dataset: dict | None  # DatasetSpec's fields
    text_field: str = "text"
    min_chars: int = 0
    skip_bad: bool = False
    shard_tokens: int = 100_000_000
    val_fraction: float = 0.1
    val_tokens: int = 0  # > 0: the first val_tokens tokens of the input are val, not a share by hash
    max_tokens: int = 0  # > 0: stop after this many tokens
    tokenizer: str = ""  # the tokenizer's name and fingerprint, checked on a re-run
    tokenizer_fingerprint: str = ""

    def reading(self) -> Reading:
        return Reading(self.text_field, self.min_chars, self.skip_bad)

    def check(self) -> None:
        for name, value in (("--shard-tokens", self.shard_tokens),):
            if value <= 0:
                raise LabError(f"{name} {value}: give a positive number of tokens, e.g. 100M")
        for name, value in (("--val-tokens", self.val_tokens), ("--max-tokens", self.max_tokens)):
            if value < 0:
                raise LabError(f"{name} {value} is negative: give a number of tokens, e.g. 10M")
        if not 0 <= self.val_fraction < 1:
            raise LabError(f"--val-fraction {self.val_fraction} is outside [0, 1): e.g. --val-fraction 0.01")


@dataclass
class Part:
    """One piece of the input, tokenized on its own: a file, or shard `shard` of `shards` of a dataset."""

    index: int
    source: str
    shard: int = 0
    shards: int = 1

    def documents(self, settings: Settings, reading: Reading):
        if settings.dataset is not None:
            return dataset_documents(DatasetSpec(**settings.dataset), reading, self.shard, self.shards)
        return documents([Path(self.source)], reading)

    def describe(self) -> str:
        return f"{self.source} shard {self.shard + 1}/{self.shards}" if self.shards > 1 else self.source


def plan_parts(settings: Settings) -> list[Part]:
    if settings.dataset is None:
        return [Part(i, str(f)) for i, f in enumerate(find_input_files(settings.inputs))]
    spec = DatasetSpec(**settings.dataset)
    count = dataset_parts(open_dataset(spec))
    return [Part(i, spec.name, i, count) for i in range(count)]


def parse_count(text: str) -> int:
    """'100M' -> 100_000_000; also K, G (B), and plain or underscored numbers."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}
    text = str(text).strip().replace("_", "")
    try:
        if text[-1:].upper() in units:
            return int(float(text[:-1]) * units[text[-1].upper()])
        return int(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a number of tokens (e.g. 100M, 10M, 5000)") from None


# --- preparing ----------------------------------------------------------------------------------


def prepare_shards(
    settings: Settings,
    out,
    tokenizer: Tokenizer,
    workers: int = 1,
    task: tuple[int, int] | None = None,
    progress: bool = True,
) -> dict | None:
    """Tokenize the parts not yet done (task (i, n): every n-th from the i-th only); then, unless
    this is one task of several, check every part and write the manifest, which is returned."""
    settings.check()
    settings.tokenizer, settings.tokenizer_fingerprint = tokenizer.name, tokenizer.fingerprint()
    out = make_folder(out)
    (out / PARTS).mkdir(exist_ok=True)
    remove_stale_temporaries(out / PARTS)
    check_same_settings(out, settings)
    parts = plan_parts(settings)
    records = read_records(out, parts)
    total = sum(r["tokens"] for r in records.values())
    for part in parts:
        if part.index in records or (task is not None and part.index % task[1] != task[0]):
            continue
        if settings.max_tokens and total >= settings.max_tokens:
            break
        budget = settings.max_tokens - total if settings.max_tokens else 0
        record = prepare_part(part, settings, out, tokenizer, workers, budget, progress)
        records[part.index] = record
        total += record["tokens"]
    if task is not None:
        return None
    return write_manifest(out, settings, parts, records, tokenizer)


def check_same_settings(out: Path, settings: Settings) -> None:
    path = out / PARTS / "settings.json"
    wanted = asdict(settings)
    if path.exists():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None
        if before != wanted:
            changed = (
                [k for k in wanted if not isinstance(before, dict) or before.get(k) != wanted[k]]
                if isinstance(before, dict)
                else ["(unreadable)"]
            )
            raise LabError(
                f"--out {out} holds parts prepared with other settings ({', '.join(changed)} differ); "
                "its shards cannot be mixed with these. Give --out a new folder, or run the command it was "
                f"started with (see {path})"
            )
        return
    write_text_atomically(path, json.dumps(wanted, indent=2) + "\n")


def record_path(out: Path, index: int) -> Path:
    return out / PARTS / f"{index:05d}.json"


def read_records(out: Path, parts: list[Part]) -> dict[int, dict]:
    records = {}
    for part in parts:
        path = record_path(out, part.index)
        if path.exists():
            try:
                records[part.index] = json.loads(path.read_text())
            except ValueError:
                path.unlink()  # a damaged record: the part is done again
    return records


def prepare_part(
    part: Part, settings: Settings, out: Path, tokenizer: Tokenizer, workers: int, budget: int, progress: bool
) -> dict:
    """Tokenize one part into its shards; the record, written last, says it is done."""
    reading = settings.reading()
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(out, split, part.index, settings.shard_tokens, dtype) for split in SPLITS}
    val_first = settings.val_tokens if part.index == 0 else 0  # the input's first documents are val
    current: ShardWriter | None = None
    written = 0
    try:
        segments = (s for doc in part.documents(settings, reading) for s in document_segments(doc, None))
        bar = tqdm(
            desc=f"part {part.index}", unit=" tok", unit_scale=True, disable=None if progress else True
        )
        with bar:
            for results, _ in tokenize_all(work_items(segments), tokenizer, workers):
                for ids, starts_document, _, draw in results:
                    if starts_document:
                        current = writers[choose_split(settings, writers, val_first, draw)]
                        ids = np.concatenate([np.array([tokenizer.eot_id], dtype=ids.dtype), ids])
                        current.documents += 1
                    assert current is not None  # a part's first segment starts a document
                    if budget and written + len(ids) > budget:
                        ids = ids[: budget - written]
                    current.write(ids)
                    written += len(ids)
                    bar.update(len(ids))
                if budget and written >= budget:
                    break
        shards = {split: writer.finish() for split, writer in writers.items()}
    finally:
        for writer in writers.values():
            writer.discard()
    record = {
        "part": part.index,
        "source": part.describe(),
        "tokens": written,
        "documents": {split: w.documents for split, w in writers.items()},
        "dropped_short": reading.dropped_short,
        "skipped": reading.skipped,
        "shards": shards,
        "max_token_id": max(w.max_id for w in writers.values()),
    }
    fsync(out)
    write_text_atomically(record_path(out, part.index), json.dumps(record, indent=2) + "\n")
    return record


def choose_split(settings: Settings, writers: dict, val_first: int, draw: float) -> str:
    if settings.val_tokens:
        return "val" if writers["val"].tokens < val_first else "train"
    return "val" if draw < settings.val_fraction else "train"


class ShardWriter:
    """One split of one part: token files of at most shard_tokens tokens, SPLIT-PART-K.bin, under
    temporary names until finish()."""

    def __init__(self, out: Path, split: str, part: int, shard_tokens: int, dtype: np.dtype):
        self.out, self.split, self.part, self.shard_tokens, self.dtype = out, split, part, shard_tokens, dtype
        self.finished: list[TokenWriter] = []
        self.current: TokenWriter | None = None
        self.tokens = self.documents = 0
        self.max_id = -1

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.current is None or self.current.tokens == self.shard_tokens:
                self.next_shard()
            assert self.current is not None  # next_shard made it
            room = self.shard_tokens - self.current.tokens
            self.current.write(ids[:room])
            self.tokens += len(ids[:room])
            self.max_id = max(self.max_id, int(ids[:room].max()))
            ids = ids[room:]

    def next_shard(self) -> None:
        if self.current is not None:
            self.finished.append(self.current)
        name = f"{self.split}-{self.part:05d}-{len(self.finished):04d}.bin"
        self.current = TokenWriter(self.out / name, self.dtype, None)

    def finish(self) -> list[dict]:
        """Rename the shards into place; their names, token counts and SHA-256."""
        writers = self.finished + ([self.current] if self.current is not None else [])
        shards = []
        for writer in writers:
            writer.finish()
            shards.append(
                {"name": writer.path.name, "tokens": writer.tokens, "sha256": writer.sha.hexdigest()}
            )
        self.finished, self.current = [], None
        return shards

    def discard(self) -> None:
        for writer in self.finished + ([self.current] if self.current is not None else []):
            writer.discard()


# --- the manifest -------------------------------------------------------------------------------


def write_manifest(
    out: Path, settings: Settings, parts: list[Part], records: dict, tokenizer: Tokenizer
) -> dict:
    """Check every part's shards against its record, then write manifest.json (last)."""
    stopped = settings.max_tokens and sum(r["tokens"] for r in records.values()) >= settings.max_tokens
    missing = [p for p in parts if p.index not in records]
    if missing and not stopped:
        raise LabError(
            f"{len(missing)} of {len(parts)} parts of {out} are not prepared yet (first: part "
            f"{missing[0].index}, "
            f"{missing[0].describe()}); run the same command again (or the --task commands still to run)"
        )
    done = [records[p.index] for p in parts if p.index in records]
    shards: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for record in done:
        for split in SPLITS:
            for shard in record["shards"][split]:
                check_shard(out, shard, f"{record_path(out, record['part'])}")
                shards[split].append({**shard, "mtime_ns": (out / shard["name"]).stat().st_mtime_ns})
    count = {split: sum(s["tokens"] for s in shards[split]) for split in SPLITS}
    if count["train"] == 0 or count["val"] == 0:
        empty = "train" if count["train"] == 0 else "val"
        raise LabError(
            f"the {empty} split of {out} is empty ({count['train']:,} train and {count['val']:,} val "
            "tokens): "
            "give more text, or change --val-fraction / --val-tokens"
        )
    if settings.val_tokens and count["val"] < settings.val_tokens:  # val comes from the first part only
        print(
            f"warning: val holds {count['val']:,} tokens, fewer than --val-tokens {settings.val_tokens:,}: "
            f"the first input ({parts[0].describe()}) has no more",
            file=sys.stderr,
        )
    tokenizer_files.keep(tokenizer, out / TOKENIZER)  # the vocabulary travels with the data
    manifest = {
        "format": FORMAT,
        "tokenizer": tokenizer.name,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "tokenizer_files": {setting: str(path) for setting, path in tokenizer.files().items()},
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "train_tokens": count["train"],
        "val_tokens": count["val"],
        "train_documents": sum(r["documents"]["train"] for r in done),
        "val_documents": sum(r["documents"]["val"] for r in done),
        "max_token_id": max(r["max_token_id"] for r in done),
        "dropped_short": sum(r["dropped_short"] for r in done),
        "skipped": [s for r in done for s in r["skipped"]],
        "input": {"dataset": settings.dataset} if settings.dataset else {"files": [p.source for p in parts]},
        "settings": asdict(settings),
        "shards": shards,
    }
    write_text_atomically(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    fsync(out)
    return manifest


def check_shard(out: Path, shard: dict, where: str) -> None:
    """A shard is the file its record or manifest describes: there, of its size, with its SHA-256."""
    path = out / shard["name"]
    redo = f"delete {where} and run lab prepare again to make it anew"
    if not path.is_file():
        raise LabError(f"shard {path} is missing ({where} lists it); restore it, or {redo}")
    if sha256(path) != shard["sha256"]:
        raise LabError(
            f"shard {path} was changed after lab prepare wrote it (its SHA-256 differs from {where}); {redo}"
        )


# --- reading a sharded folder --------------------------------------------------------------------


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest.json, checked to be one; None when the folder has none (single files)."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    redo = f"run lab prepare again into {folder}"
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise LabError(f"{path} is not valid JSON ({e}); {redo}") from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise LabError(f"{path} lacks {', '.join(missing)}; it is not a manifest lab prepare wrote. {redo}")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise LabError(f"{path} has dtype {manifest['dtype']!r}; token files are uint16 or uint32. {redo}")
    return manifest


def shard_paths(folder: Path, manifest: dict, split: str) -> Iterator[tuple[Path, int]]:
    """(path, tokens) of each shard of a split, each checked against the manifest: present, of the size
    it gives, and its SHA-256 when the file is not the one the manifest saw (its mtime differs)."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    where = folder / MANIFEST
    for shard in manifest["shards"][split]:
        path = folder / shard["name"]
        redo = f"restore it, or run lab prepare again into {folder}"
        if not path.is_file():
            raise LabError(f"shard {path} is missing ({where} lists it); {redo}")
        stat = path.stat()
        if stat.st_size != shard["tokens"] * itemsize:
            raise LabError(
                f"shard {path} is {stat.st_size} bytes, but {where} gives {shard['tokens']} tokens "
                f"({shard['tokens'] * itemsize} bytes): it was changed after lab prepare wrote it; {redo}"
            )
        if stat.st_mtime_ns != shard.get("mtime_ns") and sha256(path) != shard["sha256"]:
            raise LabError(
                f"shard {path} was changed after lab prepare wrote it (its SHA-256 is not the one in "
                f"{where}); {redo}"
            )
        yield path, shard["tokens"]


class ShardStream:
    """A split's shards as one array of tokens: stream[a:b] reads across shard boundaries."""

    def __init__(self, shards: list[tuple[Path, int]], dtype: np.dtype):
        self.arrays = [np.memmap(p, dtype=dtype, mode="r") for p, n in shards if n]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])  # where each shard begins in the stream
        self.dtype = dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(len(self))
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            array, base = self.arrays[first], self.starts[first]
            piece = array[start - base : min(stop - base, len(array))]
            pieces.append(piece)
            start += len(piece)
            first += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
