"""`lab prepare`: text in, token files out.

    lab prepare corpus/ more.jsonl --out data/mycorpus

writes three files into the --out folder:

    train.bin   token ids, one after another: uint16 when the vocabulary fits in 16 bits, else uint32
    val.bin     the same, for the held-out documents
    meta.json   tokenizer (name, fingerprint, files), vocab_size, dtype, token and document counts, the
                largest id: what a data source checks the .bin files against before it trusts them
    tokenizer/  copies of the files a trained tokenizer was built from (lab.runs.tokenizer_files), if any

A document is a .txt file (folders are searched for them recursively) or one line of a .jsonl file
(its "text" field). The tokenizer's end-of-text token goes between the documents of a split. Each
document goes to val with probability --val-fraction, decided by a hash of its text, so the same
inputs always give the same split and a duplicated document never sits on both sides. A single
document is cut at a line boundary instead: the first (1 - F) of its text trains, the rest validates.

Input is streamed: big text files are read in pieces of about a megabyte, cut between lines, and
tokens are appended to the output as they come, so a corpus needs no more memory than a few pieces.
Large inputs are tokenized by several processes; the files are written under temporary names and
renamed into place at the end (meta.json last), so an interrupted run never leaves a half-written
folder that looks finished.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import multiprocessing
import os
from collections import deque
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from lab.data.text import (
    INPUT_HELP,
    PIECE_BYTES,
    Document,
    Segment,
    documents,
    find_input_files,
    line_cut,
    read_text,
)
from lab.data.tokens import SPLITS, token_dtype
from lab.errors import LabError
from lab.files import fsync, remove_stale_temporaries, temporary, usual_mode, write_text_atomically
from lab.interfaces import Tokenizer
from lab.runs import tokenizer_files
from lab.runs.layout import TOKENIZER

PARALLEL_BYTES = 8 << 20  # inputs at least this big are tokenized by one process per core


def build_tokenizer(name: str | None, recipe: str | None = None, overrides=()) -> Tokenizer:
    """The recipe's [tokenizer] (a tokenizer with settings, such as a trained file); else the registered
    tokenizer `name` with its default settings; with neither, the only one installed that needs no settings."""
    from lab.plugins import registry

    if recipe is not None:
        if name is not None:
            raise LabError(
                "give --tokenizer NAME or --recipe RECIPE, not both: the recipe's [tokenizer] "
                "table names the tokenizer and its settings"
            )
        from lab.recipe import load_recipe

        return load_recipe(recipe, overrides).parts["tokenizer"].build()
    installed = registry().components["tokenizer"]
    if name is None:
        plain = [
            n
            for n, c in installed.items()
            if not any(f.is_required() for f in c.Config.model_fields.values())
        ]
        if len(plain) != 1:
            raise LabError(
                f"--tokenizer NAME is needed to choose among the installed tokenizers: "
                f"{', '.join(sorted(installed)) or 'none (pip install -e .)'}; a tokenizer with "
                "settings (a trained file) comes from a recipe: --recipe RECIPE"
            )
        name = plain[0]
    component = registry().get("tokenizer", name, where="--tokenizer")
    needed = [key for key, f in component.Config.model_fields.items() if f.is_required()]
    if needed:
        raise LabError(
            f"tokenizer '{name}' needs settings ({', '.join(needed)}): name it in a recipe's "
            f"[tokenizer] table and give --recipe RECIPE instead of --tokenizer {name}"
        )
    return component.factory(component.Config())


def prepare(
    inputs: Iterable,
    out,
    tokenizer: Tokenizer,
    val_fraction: float = 0.1,
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into out/train.bin, out/val.bin and out/meta.json; returns the meta.

    workers: tokenizing processes; 0 picks one per core for large inputs and one otherwise."""
    inputs = [str(i) for i in inputs]
    if not 0 <= val_fraction < 1:
        raise LabError(
            f"--val-fraction {val_fraction} is outside [0, 1): give the share of documents "
            "held out for validation, e.g. --val-fraction 0.1"
        )
    if workers < 0:
        raise LabError(
            f"--workers {workers} is negative: give a number of processes, or 0 to choose by input size"
        )
    files = find_input_files(inputs)
    out = make_folder(out)
    total_bytes = sum(f.stat().st_size for f in files)
    if workers == 0:
        workers = cpu_count() if total_bytes >= PARALLEL_BYTES else 1

    output = Output(out, tokenizer, val_fraction)
    try:
        items = work_items(plan_segments(files, val_fraction))
        # disable=None: a bar on a terminal, nothing in a log file
        bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="tokenizing",
            disable=None if progress else True,
        )
        with bar:
            for results, nbytes in tokenize_all(items, tokenizer, workers):
                output.add(results)
                bar.update(nbytes)
        if output.tokens == 0:
            raise LabError(f"no text in {', '.join(inputs)}: the inputs are empty. {INPUT_HELP}")
        output.keep_both_splits()
        tokenizer_files.keep(tokenizer, out / TOKENIZER)  # the vocabulary travels with the data
        meta = output.meta(inputs=inputs, input_bytes=total_bytes)
        output.finish(meta)
    finally:
        output.discard()
    return meta


# --- inputs -> documents -> segments -> work items ---------------------------------------------


def make_folder(out) -> Path:
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise LabError(
            f"--out {out} is a file, not a folder: give a folder for train.bin, val.bin and meta.json"
        ) from None
    except PermissionError:
        raise LabError(
            f"cannot create the --out folder {out}: permission denied; choose a folder you can write"
        ) from None
    remove_stale_temporaries(out)  # left by a lab prepare that was killed
    return out


def refuse_foreign_files(out: Path) -> None:
    """`lab prepare` overwrites the train.bin, val.bin and meta.json it wrote before, never files of
    those names that it did not write: it wrote them if meta.json is its own."""
    ours = [name for name in (*(f"{split}.bin" for split in SPLITS), "meta.json") if (out / name).exists()]
    if not ours:
        return
    try:
        meta = json.loads((out / "meta.json").read_text())
        if isinstance(meta, dict) and {"tokenizer", "vocab_size", "dtype", "train_tokens"} <= meta.keys():
            return
    except (OSError, ValueError):
        pass
    raise LabError(
        f"--out {out} holds {', '.join(ours)} that lab prepare did not write (no meta.json of "
        "its own beside them); it will not overwrite them. Give --out a new folder"
    )


def plan_segments(files: list[Path], val_fraction: float) -> Iterator[tuple[Segment, int]]:
    """Every document's segments with the input bytes each accounts for. A lone document is cut
    in two by position, since drawing its split would put all of it on one side."""
    docs = documents(files)
    first, second = next(docs, None), next(docs, None)
    if first is None:
        return
    if second is None:
        yield from split_single_document(first, val_fraction)
        return
    for doc in itertools.chain([first, second], docs):
        yield from document_segments(doc, None)


def document_segments(doc: Document, split: str | None, start: int = 0, stop: int | None = None):
    if doc.text is not None:
        text = doc.text[start:stop]
        if text:
            yield Segment(text, True, split), doc.nbytes if start == 0 else 0
        return
    pieces = read_text(doc.path, start, doc.path.stat().st_size if stop is None else stop, PIECE_BYTES)
    for i, (text, nbytes) in enumerate(pieces):
        yield Segment(text, i == 0, split), nbytes


def split_single_document(doc: Document, val_fraction: float):
    if doc.text is not None:
        cut = line_cut(doc.text, int(len(doc.text) * (1 - val_fraction)), "\n")
    else:
        with open(doc.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as text:
            cut = line_cut(text, int(len(text) * (1 - val_fraction)), b"\n")
            while cut < len(text) and text[cut] & 0xC0 == 0x80:  # not inside a UTF-8 character
                cut += 1
    yield from document_segments(doc, "train", 0, cut)
    yield from document_segments(doc, "val", cut, None)


def work_items(segments: Iterable[tuple[Segment, int]]) -> Iterator[tuple[list[Segment], int]]:
    """Group segments (many short .jsonl documents, or one piece of a big file) into ~PIECE_BYTES of
    text per task, so a worker's time goes to tokenizing rather than to messages."""
    item, chars, nbytes = [], 0, 0
    for segment, n in segments:
        item.append(segment)
        chars += len(segment.text)
        nbytes += n
        if chars >= PIECE_BYTES:
            yield item, nbytes
            item, chars, nbytes = [], 0, 0
    if item:
        yield item, nbytes


# --- tokenizing ---------------------------------------------------------------------------------


def tokenize_item(item: tuple[list[Segment], int], tokenizer: Tokenizer):
    """A work item -> ([(ids, starts_document, split, draw)], bytes). `draw`, uniform in [0, 1) and
    a function of the text alone, decides the split of a document that starts here."""
    segments, nbytes = item
    dtype = token_dtype(tokenizer.vocab_size)
    results = []
    for segment in segments:
        ids = np.array(tokenizer.encode(segment.text), dtype=np.uint32)
        if len(ids) and ids.max() >= tokenizer.vocab_size:
            raise LabError(
                f"tokenizer '{tokenizer.name}' produced id {ids.max()}, beyond its vocab_size "
                f"{tokenizer.vocab_size}; the tokenizer plugin is broken, report it to its package"
            )
        draw = None
        if segment.starts_document and segment.split is None:
            digest = hashlib.blake2b(segment.text.encode(), digest_size=8).digest()
            draw = (int.from_bytes(digest, "little") >> 11) / 2**53  # 53 bits: exact in a float, < 1
        results.append((ids.astype(dtype), segment.starts_document, segment.split, draw))
    return results, nbytes


_worker_tokenizer: Tokenizer | None = None  # each pool process's own, set once by _init_worker


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _tokenize_in_worker(item):
    return tokenize_item(item, _worker_tokenizer)


def tokenize_all(items: Iterator, tokenizer: Tokenizer, workers: int) -> Iterator:
    """tokenize_item over items, in order, on `workers` processes."""
    if workers == 1:
        yield from map(partial(tokenize_item, tokenizer=tokenizer), items)
        return
    # Pool.imap would read the whole input ahead into its queue; a window of 2 tasks per worker
    # keeps every process busy while memory stays at a few pieces, whatever the corpus size.
    with multiprocessing.Pool(workers, _init_worker, (tokenizer,)) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.apply_async(_tokenize_in_worker, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, not the machine's
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# --- writing ------------------------------------------------------------------------------------


class Output:
    """The --out folder being written: a TokenWriter per split, and which one the current document goes to."""

    def __init__(self, out: Path, tokenizer: Tokenizer, val_fraction: float):
        self.out, self.tokenizer, self.val_fraction = out, tokenizer, val_fraction
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.train = TokenWriter(out / "train.bin", self.dtype, tokenizer.eot_id)
        self.val = TokenWriter(out / "val.bin", self.dtype, tokenizer.eot_id)
        self.current: TokenWriter | None = None  # the split of the document in progress

    @property
    def tokens(self) -> int:
        return self.train.tokens + self.val.tokens

    def add(self, results) -> None:
        for ids, starts_document, split, draw in results:
            if starts_document:
                split = split or ("val" if draw < self.val_fraction else "train")
                self.current = self.val if split == "val" else self.train
                self.current.start_document()
            self.current.write(ids)

    def keep_both_splits(self) -> None:
        # With few documents the draw can leave a split empty; move one document across so that a
        # run can both train and validate on the output.
        if self.val_fraction > 0 and self.val.tokens == 0 and self.train.documents >= 2:
            self.train.move_last_document(self.val)
        elif self.train.tokens == 0 and self.val.documents >= 2:
            self.val.move_last_document(self.train)

    def meta(self, **extra) -> dict:
        return {
            "tokenizer": self.tokenizer.name,
            "tokenizer_fingerprint": self.tokenizer.fingerprint(),
            "tokenizer_files": {setting: str(path) for setting, path in self.tokenizer.files().items()},
            "vocab_size": self.tokenizer.vocab_size,
            "eot_id": self.tokenizer.eot_id,
            "dtype": self.dtype.name,
            "train_tokens": self.train.tokens,
            "val_tokens": self.val.tokens,
            "train_documents": self.train.documents,
            "val_documents": self.val.documents,
            "max_token_id": max(self.train.max_id, self.val.max_id),
            "val_fraction": self.val_fraction,
            **extra,
        }

    def finish(self, meta: dict) -> None:
        self.train.finish()
        self.val.finish()
        write_text_atomically(
            self.out / "meta.json", json.dumps(meta, indent=2) + "\n"
        )  # last: its presence means the folder is whole
        fsync(self.out)

    def discard(self) -> None:
        """Remove the temporary files that finish() did not rename (after an error or Ctrl-C)."""
        self.train.discard()
        self.val.discard()


class TokenWriter:
    """One split's token file: appended to under a temporary name, renamed into place by finish()."""

    def __init__(self, path: Path, dtype: np.dtype, eot_id: int | None):
        self.path, self.dtype, self.eot_id = path, dtype, eot_id
        fd, tmp = temporary(path)
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")
        self.tokens = self.documents = 0
        self.max_id = -1
        self.last_document = (0, 0)  # (where its separator starts, where its text starts), in tokens

    def start_document(self) -> None:
        separator = self.tokens
        if self.documents and self.eot_id is not None:
            self.write(np.array([self.eot_id], dtype=self.dtype))
        self.last_document = (separator, self.tokens)
        self.documents += 1

    def write(self, ids: np.ndarray) -> None:
        if len(ids):
            ids.tofile(self.file)
            self.tokens += len(ids)
            self.max_id = max(self.max_id, int(ids.max()))

    def move_last_document(self, other: "TokenWriter") -> None:
        """Move this file's last document (and the separator before it) to the end of `other`."""
        separator, start = self.last_document
        self.file.flush()
        other.start_document()
        with open(self.tmp, "rb") as f:
            f.seek(start * self.dtype.itemsize)
            while chunk := f.read(16 << 20):
                other.write(np.frombuffer(chunk, dtype=self.dtype))
        self.file.truncate(separator * self.dtype.itemsize)
        self.file.seek(0, os.SEEK_END)
        self.tokens, self.documents = separator, self.documents - 1

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        usual_mode(self.tmp)
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        """Remove the temporary file, if finish() did not rename it."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)
