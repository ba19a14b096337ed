"""`lab prepare`: text in, token files out.

    lab prepare corpus/ more.jsonl --out data/mycorpus

writes three files into the --out folder:

    train.bin   token ids, one after another: uint16 when the vocabulary fits in 16 bits, else uint32
    val.bin     the same, for the held-out documents
    meta.json   tokenizer (name, fingerprint, files), vocab_size, dtype, token and document counts, the
                largest id: what a data source checks the .bin files against before it trusts them
    tokenizer/  copies of the files a trained tokenizer was built from (lab.tokenizer_files), if any

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

import codecs
import hashlib
import itertools
import json
import mmap
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from lab import tokenizer_files
from lab.errors import LabError
from lab.files import cannot_write, fsync, remove_stale_temporaries, temporary, usual_mode, write_text_atomically
from lab.interfaces import Tokenizer

SPLITS = ("train", "val")
PIECE_BYTES = 1 << 20  # text handed to the tokenizer at once: big enough to amortise, small enough to stream
PARALLEL_BYTES = 8 << 20  # inputs at least this big are tokenized by one process per core
INPUT_HELP = "lab prepare takes text files, folders of .txt files, and .jsonl files with a \"text\" field per line"


def cli_prepare(args) -> int:
    tokenizer = build_tokenizer(args.tokenizer, args.recipe, args.overrides)
    refuse_foreign_files(Path(args.out).expanduser())
    try:
        meta = prepare(args.inputs, args.out, tokenizer, args.val_fraction, args.workers)
    except OSError as e:  # the half-written files are gone already (Output.discard)
        raise cannot_write(e.filename or args.out, e, fix="Free some space, or give --out a folder on "
                           "another disk") from None
    print(f"wrote {args.out}: " + ", ".join(
        f"{split}.bin {meta[f'{split}_tokens']:,} tokens ({_count(meta[f'{split}_documents'], 'document')})"
        for split in SPLITS) + f"; {meta['dtype']}, tokenizer {meta['tokenizer']}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def build_tokenizer(name: str | None, recipe: str | None = None, overrides=()) -> Tokenizer:
    """The recipe's [tokenizer] (a tokenizer with settings, such as a trained file); else the registered
    tokenizer `name` with its default settings; with neither, the only one installed that needs no settings."""
    from lab.plugins import registry

    if recipe is not None:
        if name is not None:
            raise LabError("give --tokenizer NAME or --recipe RECIPE, not both: the recipe's [tokenizer] "
                           "table names the tokenizer and its settings")
        from lab.recipe import load_recipe

        return load_recipe(recipe, overrides).parts["tokenizer"].build()
    installed = registry().components["tokenizer"]
    if name is None:
        plain = [n for n, c in installed.items() if not any(f.is_required() for f in c.Config.model_fields.values())]
        if len(plain) != 1:
            raise LabError(f"--tokenizer NAME is needed to choose among the installed tokenizers: "
                           f"{', '.join(sorted(installed)) or 'none (pip install -e .)'}; a tokenizer with "
                           "settings (a trained file) comes from a recipe: --recipe RECIPE")
        name = plain[0]
    component = registry().get("tokenizer", name, where="--tokenizer")
    needed = [key for key, f in component.Config.model_fields.items() if f.is_required()]
    if needed:
        raise LabError(f"tokenizer '{name}' needs settings ({', '.join(needed)}): name it in a recipe's "
                       f"[tokenizer] table and give --recipe RECIPE instead of --tokenizer {name}")
    return component.factory(component.Config())


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest type that holds every id: half the disk and memory bandwidth for GPT-2's 50257."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare(inputs: Iterable, out, tokenizer: Tokenizer, val_fraction: float = 0.1, workers: int = 0,
            progress: bool = True) -> dict:
    """Tokenize `inputs` into out/train.bin, out/val.bin and out/meta.json; returns the meta.

    workers: tokenizing processes; 0 picks one per core for large inputs and one otherwise."""
    inputs = [str(i) for i in inputs]
    if not 0 <= val_fraction < 1:
        raise LabError(f"--val-fraction {val_fraction} is outside [0, 1): give the share of documents "
                       "held out for validation, e.g. --val-fraction 0.1")
    if workers < 0:
        raise LabError(f"--workers {workers} is negative: give a number of processes, or 0 to choose by input size")
    files = find_input_files(inputs)
    out = make_folder(out)
    total_bytes = sum(f.stat().st_size for f in files)
    if workers == 0:
        workers = cpu_count() if total_bytes >= PARALLEL_BYTES else 1

    output = Output(out, tokenizer, val_fraction)
    try:
        items = work_items(plan_segments(files, val_fraction))
        # disable=None: a bar on a terminal, nothing in a log file
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None if progress else True)
        with bar:
            for results, nbytes in tokenize_all(items, tokenizer, workers):
                output.add(results)
                bar.update(nbytes)
        if output.tokens == 0:
            raise LabError(f"no text in {', '.join(inputs)}: the inputs are empty. {INPUT_HELP}")
        output.keep_both_splits()
        tokenizer_files.keep(tokenizer, out / tokenizer_files.FOLDER)  # the vocabulary travels with the data
        meta = output.meta(inputs=inputs, input_bytes=total_bytes)
        output.finish(meta)
    finally:
        output.discard()
    return meta


# --- inputs -> documents -> segments -> work items ---------------------------------------------


def find_input_files(inputs: list[str]) -> list[Path]:
    files = []
    for name in inputs:
        path = Path(name).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise LabError(f"input folder {name} holds no .txt files (searched recursively). {INPUT_HELP}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise LabError(f"input not found: {name}. {INPUT_HELP}")
    return files


def make_folder(out) -> Path:
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise LabError(f"--out {out} is a file, not a folder: give a folder for train.bin, val.bin and "
                       "meta.json") from None
    except PermissionError:
        raise LabError(f"cannot create the --out folder {out}: permission denied; choose a folder you "
                       "can write") from None
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
    raise LabError(f"--out {out} holds {', '.join(ours)} that lab prepare did not write (no meta.json of "
                   "its own beside them); it will not overwrite them. Give --out a new folder")


@dataclass
class Document:
    path: Path
    text: str | None  # a .jsonl line's text; None: the whole file at path, read in pieces
    nbytes: int  # input bytes it accounts for, for the progress bar


@dataclass
class Segment:
    """A piece of one document's text, tokenized on its own."""

    text: str
    starts_document: bool
    split: str | None  # None: the document's split is drawn from the hash of its first segment


def documents(files: list[Path]) -> Iterator[Document]:
    for path in files:
        if path.suffix == ".jsonl":
            yield from jsonl_documents(path)
        elif path.stat().st_size:
            yield Document(path, None, path.stat().st_size)


def jsonl_documents(path: Path) -> Iterator[Document]:
    nbytes = 0  # carries the bytes of skipped lines into the next document, so the bar ends full
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            nbytes += len(line)
            if not line.strip():
                continue
            text = jsonl_text(line, path, number)
            if text:
                yield Document(path, text, nbytes)
                nbytes = 0


def jsonl_text(line: bytes, path, number: int) -> str:
    """The "text" of a .jsonl line (number counts from 1), or one message naming the file and line."""
    try:
        record = json.loads(line)
    except ValueError as e:
        raise LabError(f"{path} line {number} is not valid JSON ({e}); each line of a .jsonl "
                       "file must be one JSON object with a \"text\" field") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise LabError(f"{path} line {number} has no \"text\" string; each line of a .jsonl "
                       "file must be a JSON object like {\"text\": \"...\"}")
    return record["text"]


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
    pieces = read_text(doc.path, start, doc.path.stat().st_size if stop is None else stop)
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


def line_cut(text, target: int, newline) -> int:
    """The first line start at or after `target`; `target` itself when no line starts there."""
    if target <= 0 or target >= len(text) or text[target - 1 : target] == newline:
        return min(max(target, 0), len(text))
    end = text.find(newline, target)
    return end + 1 if 0 <= end < len(text) - 1 else target


def read_text(path: Path, start: int, stop: int, piece_bytes: int = 0) -> Iterator[tuple[str, int]]:
    """Bytes [start, stop) of a UTF-8 file as (text, bytes) pieces of about piece_bytes (default
    PIECE_BYTES), each cut at a seam where tokenizing the pieces apart gives the same ids as
    tokenizing the whole."""
    piece_bytes = piece_bytes or PIECE_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = b"", start  # bytes read but not yet handed out, and where they start in the file
    with open(path, "rb") as f:
        f.seek(start)
        while offset + len(carry) < stop:
            block = f.read(min(piece_bytes, stop - offset - len(carry)))
            if not block:  # the file shrank while we read it
                break
            text = carry + block
            cut = last_seam(text, after=max(len(carry) - 1, 0))  # carry itself was searched already
            if cut is None:
                if len(text) < 4 * piece_bytes:
                    carry = text
                    continue
                cut = text.rfind(b"\n") + 1 or len(text)  # no seam for a while: settle for a line end
            yield decode(decoder, text[:cut], path, offset), cut
            carry, offset = text[cut:], offset + cut
    tail = decode(decoder, carry, path, offset, final=True)  # fails on a truncated last character
    if carry:
        yield tail, len(carry)


def last_seam(text: bytes, after: int = 0) -> int | None:
    """Where the last line of `text` that follows a seam (a newline past `after`) begins, or None.

    A seam is a single newline between two non-space characters: byte-level BPE tokenizers (GPT-2's
    and tiktoken's patterns) always split there. Elsewhere (blank lines, trailing spaces, CRLF line
    ends) a run of whitespace that spans the cut could be tokenized differently."""
    end = len(text) - 1  # the character after the newline must be in text too
    while (i := text.rfind(b"\n", max(after, 1), end)) > 0:
        if not text[i - 1 : i].isspace() and not text[i + 1 : i + 2].isspace():
            return i + 1
        end = i
    return None


def decode(decoder, data: bytes, path: Path, offset: int, final: bool = False) -> str:
    try:
        return decoder.decode(data, final=final)
    except UnicodeDecodeError as e:
        raise LabError(f"{path} is not UTF-8 text (bad byte near offset {offset + e.start}); convert it, "
                       f"e.g. iconv -f latin1 -t utf-8 {path} > fixed.txt") from None


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
            raise LabError(f"tokenizer '{tokenizer.name}' produced id {ids.max()}, beyond its vocab_size "
                           f"{tokenizer.vocab_size}; the tokenizer plugin is broken, report it to its package")
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
        write_text_atomically(self.out / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: its presence means the folder is whole
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
