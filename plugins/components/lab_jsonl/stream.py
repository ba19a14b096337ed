"""The jsonl data source: a stream of token windows read from text files as training goes.

Reading. The files (path's, in order; a folder's sorted) are read as *units*: a non-blank line of a
.jsonl file (a document, its "text" field), a row of a .parquet file (its text column, read a row
group at a time by lab.data.text), or a ~64 KB piece of any other file (a text file is one document),
cut where tokenizing the pieces apart gives the ids of the whole. A hash of a unit's
bytes puts it in val with probability val_fraction, unless val_path names val's own files.

Sharing out. Train unit j goes to process j % world_size: each process tokenizes its share only, and
reads past the others' (reading is cheap next to tokenizing). A process's tokens are its units' ids
one after another, the tokenizer's end-of-text token before each document (and before a piece that
does not continue the one before it in this process's stream). Each row takes the next
block_size + 1 tokens and moves on by block_size. At the end of the files the stream starts over.

Resuming. state_dict() is where the stream is: file, byte offset (a .parquet file's row) and line of
the next unit, how many
train units were counted, the epoch, and the tokens read but not yet used. Loaded into a fresh source
it gives the very rows that would have come next. It is each process's own, so a run continues on
the same number of processes only (any_layout = False): lab refuses another layout with a message.

Validation. Every process reads the whole val split from its start, and val row i of step s is
window s * rows + i of it: the same whoever asks and whenever, so the val loss compares like with
like. Past the end of the val split the windows repeat.
"""

from __future__ import annotations

import codecs
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch

from lab.data.text import Reading, decode, find_input_files, jsonl_text, last_seam, parquet_texts
from lab.errors import LabError
from lab.interfaces import Batch, DataContext, DataSource, document_ids

SAMPLE = Path(__file__).with_name("sample.jsonl")
PIECE_BYTES = 1 << 16  # a text file's unit: small, as a process's unused tokens are saved in checkpoints
WHOLE = (".jsonl", ".parquet")  # files whose units are whole documents


@dataclass
class Unit:
    """A .jsonl line or a piece of a text file, as read: bytes [start, end) of file `file`."""

    raw: bytes
    path: Path
    line: int  # the line it starts on (a .parquet file's row, from 1), for messages
    file: int
    start: int
    end: int

    @property
    def starts_document(self) -> bool:
        return self.path.suffix in WHOLE or self.start == 0

    def text(self) -> str:
        if self.path.suffix == ".parquet":
            return self.raw.decode()
        if self.path.suffix != ".jsonl":
            return decode(
                codecs.getincrementaldecoder("utf-8")(), self.raw, self.path, self.start, final=True
            )
        return jsonl_text(self.raw, self.path, self.line)

    def draw(self) -> float:
        """Uniform in [0, 1) and a function of the bytes alone: the same split on every process and run."""
        digest = hashlib.blake2b(self.raw, digest_size=8).digest()
        return (int.from_bytes(digest, "little") >> 11) / 2**53  # 53 bits: exact in a float, < 1


class Reader:
    """The units of a list of files, in order, from a position: [file index, byte offset, line]."""

    def __init__(self, files: list[Path], position=(0, 0, 1), reading: Reading | None = None):
        self.files, self.reading = files, reading or Reading()
        self.file, self.offset, self.line = position
        self.handle: BinaryIO | None = None
        # A .parquet file's (row, text, bytes) from the row at offset on.
        self.rows: Iterator[tuple[int, str, int]] | None = None

    @property
    def position(self) -> list[int]:
        return [self.file, self.offset, self.line]

    def next(self) -> Unit | None:
        """The next unit, or None past the end of the last file."""
        while self.file < len(self.files):
            if self.files[self.file].suffix == ".parquet":
                unit = self.next_row()
                if unit is not None:
                    return unit
                self.close()
                self.file, self.offset, self.line = self.file + 1, 0, 1
                continue
            if self.handle is None:
                self.handle = open(self.files[self.file], "rb")
                self.handle.seek(self.offset)
            start, line = self.offset, self.line
            raw = self.next_line() if self.files[self.file].suffix == ".jsonl" else self.next_piece()
            if raw:
                self.offset += len(raw)
                self.line += raw.count(b"\n")
                if raw.strip() or self.files[self.file].suffix != ".jsonl":  # a blank line is no document
                    return Unit(raw, self.files[self.file], line, self.file, start, self.offset)
                continue
            self.close()
            self.file, self.offset, self.line = self.file + 1, 0, 1
        return None

    def next_row(self) -> Unit | None:
        """The next row of a .parquet file with text; offset and line count rows."""
        if self.rows is None:
            self.rows = parquet_texts(self.files[self.file], self.reading, start_row=self.offset)
        row = next(self.rows, None)
        if row is None:
            return None
        number, text, _ = row
        self.offset, self.line = number + 1, number + 2
        return Unit(text.encode(), self.files[self.file], number + 1, self.file, number, number + 1)

    def next_line(self) -> bytes:
        assert self.handle is not None  # next() opened the file
        return self.handle.readline()

    def next_piece(self) -> bytes:
        """About PIECE_BYTES, cut after a seam (lab.data.text.last_seam: tokenizing the pieces apart gives
        the ids of the whole); the rest of the file at its end."""
        assert self.handle is not None  # next() opened the file
        raw = b""
        while True:
            block = self.handle.read(PIECE_BYTES)
            raw += block
            if len(block) < PIECE_BYTES:  # the end of the file
                return raw
            cut = last_seam(raw)
            if cut is None and len(raw) >= 4 * PIECE_BYTES:  # no seam for a while: a line end will do
                cut = raw.rfind(b"\n") + 1 or whole_characters(raw)
            if cut is not None:
                self.handle.seek(self.offset + cut)
                return raw[:cut]

    def close(self) -> None:
        self.rows = None
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def whole_characters(raw: bytes) -> int:
    """Where the last (maybe incomplete) UTF-8 character of raw starts."""
    i = len(raw) - 1
    while i > 0 and raw[i] & 0xC0 == 0x80:
        i -= 1
    return i


class Stream:
    """One split's windows of block_size + 1 tokens for one process: the units `in_split` says are
    this split's, every world-th of them (this process's share), tokenized one after another."""

    def __init__(
        self,
        files: list[Path],
        in_split: Callable[[Unit], bool],
        context: DataContext,
        rank: int = 0,
        world: int = 1,
        repeat: bool = True,
        documents: bool = False,
        reading: Reading | None = None,
    ):
        self.files, self.in_split, self.tokenizer = files, in_split, context.tokenizer
        self.block_size, self.rank, self.world, self.repeat = context.block_size, rank, world, repeat
        self.reading = reading or Reading()
        self.reader = Reader(files, reading=self.reading)
        self.seen = 0  # units of this split read so far, every process's: unit j is process j % world's
        self.epoch = 0  # passes over the files completed
        self.took = False  # whether this pass gave this process a unit yet
        self.last: list[int] | None = (
            None  # [file, end] of the last unit taken: one starting there continues it
        )
        self.buffer = np.zeros(0, dtype=np.int64)  # tokens read and not yet used
        self.documents = documents  # every window starts at an end-of-text token

    def window(self) -> np.ndarray | None:
        """The next block_size + 1 tokens; None past the end of a split that does not repeat."""
        while self.align() <= self.block_size:
            unit = self.reader.next()
            if unit is None:
                if not self.repeat:
                    return None
                self.start_over()
            elif self.in_split(unit):
                mine = self.seen % self.world == self.rank
                self.seen += 1
                if mine:
                    self.add(unit)
        window, self.buffer = self.buffer[: self.block_size + 1], self.buffer[self.block_size :]
        return window

    def align(self) -> int:
        """With documents, drop the buffer's tokens before its first end-of-text (the rest of a
        document a row already started). Returns the tokens left."""
        if self.documents and len(self.buffer) and self.buffer[0] != self.tokenizer.eot_id:
            at = np.flatnonzero(self.buffer == self.tokenizer.eot_id)
            self.buffer = self.buffer[at[0] :] if len(at) else self.buffer[:0]
        return len(self.buffer)

    def add(self, unit: Unit) -> None:
        self.took = True
        text = unit.text()
        continues = not unit.starts_document and self.last == [unit.file, unit.start]
        self.last = [unit.file, unit.end]
        if not text:
            return
        ids = self.tokenizer.encode(text)
        if self.tokenizer.eot_id is not None and not continues:
            ids = [self.tokenizer.eot_id] + ids
        self.buffer = np.concatenate([self.buffer, np.asarray(ids, dtype=np.int64)])

    def start_over(self) -> None:
        if not self.took:
            names = ", ".join(str(f) for f in self.files[:3]) + (" ..." if len(self.files) > 3 else "")
            whose = f" for process {self.rank} of {self.world}" if self.world > 1 else ""
            raise LabError(
                f"no training text in {names}{whose}: a whole pass over the files gave none "
                f"({self.seen} train documents or pieces in all). Give more text in [data] path"
                + (", or train on fewer processes" if self.world > 1 else "")
            )
        self.reader.close()
        self.reader, self.epoch, self.took = Reader(self.files, reading=self.reading), self.epoch + 1, False

    def state_dict(self) -> dict:
        return {
            "position": self.reader.position,
            "seen": self.seen,
            "epoch": self.epoch,
            "took": self.took,
            "last": None if self.last is None else list(self.last),
            "buffer": torch.from_numpy(self.buffer.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        self.reader.close()
        self.reader = Reader(self.files, state["position"], self.reading)
        self.seen, self.epoch, self.took = state["seen"], state["epoch"], state["took"]
        self.last = None if state["last"] is None else list(state["last"])
        self.buffer = state["buffer"].numpy().astype(np.int64)


class JsonlData(DataSource):
    any_layout = False  # each process's position in its share of the documents is its own

    def __init__(self, config, context: DataContext):
        self.documents, self.max_document_tokens = config.documents, config.max_document_tokens
        self.eot_id = context.tokenizer.eot_id
        if self.documents and self.eot_id is None:
            raise LabError(
                f"[data] documents = true, but tokenizer '{context.tokenizer.name}' has no end-of-text "
                "token to mark where documents start; use a tokenizer with one, or set documents = false"
            )
        self.files = find_input_files(as_list(config.path), "[data] path: ") if config.path else [SAMPLE]
        if config.val_path:
            val_files, in_val = (
                find_input_files(as_list(config.val_path), "[data] val_path: "),
                (lambda unit: True),
            )
        elif config.val_fraction > 0:
            val_files, in_val = self.files, (lambda unit: unit.draw() < config.val_fraction)
        else:
            raise LabError(
                "[data] val_fraction = 0 and no val_path: the run's validation would have no "
                "text; set val_fraction (e.g. 0.05) or val_path to files to validate on"
            )
        in_train = (lambda unit: True) if config.val_path else (lambda unit: not in_val(unit))
        reading = Reading(text_field=config.text_field)
        self.train = Stream(
            self.files,
            in_train,
            context,
            context.rank,
            context.world_size,
            documents=self.documents,
            reading=reading,
        )
        self.val = Stream(val_files, in_val, context, repeat=False, documents=self.documents, reading=reading)
        self.val_windows: list[np.ndarray] = []  # val's windows so far, from its start
        self.val_where = (
            "[data] val_path " if config.val_path else f"[data] val_fraction {config.val_fraction} of "
        )

    def batch(self, split: str, step: int, rows: range) -> Batch:
        if split == "train":
            windows = [self.train.window() for _ in rows]
        else:
            windows = [self.val_window(step * len(rows) + i) for i in range(len(rows))]
        # The train split repeats, so its window() never gives None
        tokens = torch.from_numpy(np.stack(windows))  # type: ignore[arg-type]
        x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # y is x one token later
        if self.documents:
            assert self.eot_id is not None  # documents = true refuses a tokenizer without one
            return x, y, {"doc_ids": document_ids(x, self.eot_id, self.max_document_tokens)}
        return x, y

    def val_window(self, i: int) -> np.ndarray:
        while len(self.val_windows) <= i:
            window = self.val.window()
            if window is None:  # the end of the val split: its windows repeat
                break
            self.val_windows.append(window)
        if not self.val_windows:
            raise LabError(
                f"no validation text: {self.val_where}{', '.join(map(str, self.val.files))} gives "
                f"fewer than block_size + 1 = {self.val.block_size + 1} tokens; raise val_fraction, "
                "or set val_path to more text"
            )
        return self.val_windows[i % len(self.val_windows)]

    def state_dict(self) -> dict:
        return {"files": [[str(f), f.stat().st_size] for f in self.files], "train": self.train.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:  # a fresh start
            return
        check_same_files(state["files"], self.files)
        self.train.load_state_dict(state["train"])


def check_same_files(saved: list, files: list[Path]) -> None:
    """A stream resumes at byte offsets: the files must be the ones it was reading."""
    names = [name for name, _ in saved]
    if names != [str(f) for f in files]:
        raise LabError(
            f"[data] path lists other files than when the checkpoint was saved ({', '.join(names)}); "
            "resuming needs the same files. Set path back, or start a new run with another train.out_dir"
        )
    for (name, size), f in zip(saved, files):
        if f.stat().st_size < size:
            raise LabError(
                f"{name} is {f.stat().st_size} bytes, {size} when the checkpoint was saved: the "
                "data changed under the run, so it cannot continue where it stopped. Restore the "
                "file, or start a new run with another train.out_dir"
            )


def as_list(spec: str | list[str]) -> list[str]:
    return [spec] if isinstance(spec, str) else spec
