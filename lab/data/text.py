"""Reading text corpora: the one place that finds the input files and turns them into documents,
for `lab prepare`, the data sources, `lab tokenizer train` and `lab eval --text`.

A document is a .txt file (folders are searched for them recursively) or one line of a .jsonl file (its
"text" field). Big text files are read in pieces of about PIECE_BYTES, cut where tokenizing the pieces
apart gives the same ids as tokenizing the whole.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lab.errors import LabError

PIECE_BYTES = 1 << 20  # text handed to the tokenizer at once: big enough to amortise, small enough to stream
INPUT_HELP = 'Give text files, .jsonl files with a "text" field per line, or folders of them'


SUFFIXES = (".txt", ".jsonl")  # what a folder of inputs is searched for


def find_input_files(inputs: list[str], where: str = "", fix: str = INPUT_HELP) -> list[Path]:
    """The files of `inputs`: files as given, folders searched recursively for .txt and .jsonl.
    where: how a message names the inputs (e.g. "[data] path: "); fix: what it suggests."""
    files = []
    for name in inputs:
        path = Path(name).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise LabError(
                    f"{where}folder {name} holds no .txt or .jsonl files (searched recursively). {fix}"
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise LabError(f"{where}{name} not found. {fix}")
    return files


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
        raise LabError(
            f"{path} line {number} is not valid JSON ({e}); each line of a .jsonl "
            'file must be one JSON object with a "text" field'
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise LabError(
            f'{path} line {number} has no "text" string; each line of a .jsonl '
            'file must be a JSON object like {"text": "..."}'
        )
    return record["text"]


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
        raise LabError(
            f"{path} is not UTF-8 text (bad byte near offset {offset + e.start}); convert it, "
            f"e.g. iconv -f latin1 -t utf-8 {path} > fixed.txt"
        ) from None
