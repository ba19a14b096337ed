"""Reading text corpora: the one place that finds the input files and turns them into documents,
for `lab prepare`, the data sources, `lab tokenizer train` and `lab eval --text`.

A document is a .txt file (folders are searched for them recursively), one line of a .jsonl file (its
"text" field), one row of a .parquet file (its text column, read one row group at a time with
pyarrow), or one row of a Hugging Face dataset (`--dataset NAME`, streamed; a `save_to_disk` folder
or the local cache when offline). Big text files are read in pieces of about PIECE_BYTES, cut where
tokenizing the pieces apart gives the same ids as tokenizing the whole.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lab.errors import LabError

PIECE_BYTES = 1 << 20  # text handed to the tokenizer at once: big enough to amortise, small enough to stream
INPUT_HELP = (
    'Give text files, .jsonl files with a "text" field per line, .parquet files with a text column '
    "(--text-field), or folders of them; or a Hugging Face dataset (--dataset NAME)"
)
CORPORA_EXTRA = "pip install 'lab[corpora]'"


SUFFIXES = (".txt", ".jsonl", ".parquet")  # what a folder of inputs is searched for


def find_input_files(inputs: list[str], where: str = "", fix: str = INPUT_HELP) -> list[Path]:
    """The files of `inputs`: files as given, folders searched recursively for .txt, .jsonl, .parquet.
    where: how a message names the inputs (e.g. "[data] path: "); fix: what it suggests."""
    files = []
    for name in inputs:
        path = Path(name).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise LabError(
                    f"{where}folder {name} holds no .txt or .jsonl files (nor .parquet; searched "
                    f"recursively). {fix}"
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


@dataclass
class Reading:
    """How documents are read, and what reading them found: the same settings for every reader."""

    text_field: str = "text"  # a .parquet file's or a dataset's text column
    min_chars: int = 0  # shorter documents are dropped (and counted)
    skip_bad: bool = False  # a corrupt file or row group: skipped with a warning, or refused
    dropped_short: int = 0
    skipped: list[str] = field(default_factory=list)  # what was skipped, named

    def keep(self, text: str) -> bool:
        if len(text) < self.min_chars:
            self.dropped_short += 1
            return False
        return True

    def bad(self, what: str, why: str) -> None:
        """A corrupt file or row group: refused (one message naming it), or skipped and named."""
        if not self.skip_bad:
            raise LabError(
                f"{what} cannot be read ({why}); replace it, or give --on-bad-input skip to leave "
                "it out (it is named in the manifest)"
            )
        print(f"warning: skipping {what}: {why}", file=sys.stderr)
        self.skipped.append(f"{what}: {why}")


def documents(files: list[Path], reading: Reading | None = None) -> Iterator[Document]:
    reading = reading or Reading()
    for path in files:
        if path.suffix == ".jsonl":
            docs = jsonl_documents(path)
        elif path.suffix == ".parquet":
            docs = parquet_documents(path, reading)
        elif path.stat().st_size:
            if path.stat().st_size < reading.min_chars:  # a whole file is one document, read in pieces:
                reading.dropped_short += 1  # judged by its bytes (never fewer than its characters)
                continue
            docs = iter([Document(path, None, path.stat().st_size)])
        else:
            continue
        for doc in docs:
            if doc.text is None or reading.keep(doc.text):
                yield doc


# --- Parquet ------------------------------------------------------------------------------------


def pyarrow_parquet():
    try:
        import pyarrow.parquet
    except ImportError:
        raise LabError(f"reading .parquet files needs pyarrow: {CORPORA_EXTRA}") from None
    return pyarrow.parquet


def open_parquet(path: Path, reading: Reading):
    """A pyarrow ParquetFile whose text column is a string; None when it is corrupt and skipped."""
    pq = pyarrow_parquet()
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError... for a damaged footer
        reading.bad(str(path), f"not a readable Parquet file: {e}")
        return None
    schema = parquet.schema_arrow
    if reading.text_field not in schema.names:
        raise LabError(
            f"{path} has no column '{reading.text_field}' (its columns: {', '.join(schema.names)}); "
            "name the text column with --text-field"
        )
    kind = schema.field(reading.text_field).type
    if str(kind) not in ("string", "large_string", "string_view"):
        raise LabError(
            f"{path}: column '{reading.text_field}' holds {kind}, not text; name the text column "
            f"with --text-field (its columns: {', '.join(schema.names)})"
        )
    return parquet


def parquet_texts(path: Path, reading: Reading, start_row: int = 0) -> Iterator[tuple[int, str, int]]:
    """(row, text, bytes) for each non-empty text of a .parquet file from start_row on, read one row
    group at a time: memory holds one row group's column, whatever the file's size. `bytes` is the
    row group's share of the file, given with its first row, for progress bars."""
    parquet = open_parquet(path, reading)
    if parquet is None:
        return
    first = 0  # the row group's first row
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if first + rows <= start_row:
            first += rows
            continue
        try:
            column = parquet.read_row_group(group, columns=[reading.text_field]).column(0).to_pylist()
        except Exception as e:  # a damaged page: pyarrow's own errors, OSError
            reading.bad(f"{path} row group {group}", str(e))
            first += rows
            continue
        nbytes = parquet.metadata.row_group(group).total_byte_size
        for i in range(max(start_row - first, 0), rows):
            if column[i]:
                yield first + i, column[i], nbytes
                nbytes = 0
        first += rows


def parquet_documents(path: Path, reading: Reading) -> Iterator[Document]:
    for _, text, nbytes in parquet_texts(path, reading):
        yield Document(path, text, nbytes)


# --- Hugging Face datasets ----------------------------------------------------------------------


@dataclass
class DatasetSpec:
    """`--dataset NAME [--subset S] [--split SPLIT]`: a dataset on the Hub (or in the local cache),
    or a folder written by `Dataset.save_to_disk`."""

    name: str
    subset: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        return self.name + (f" ({self.subset})" if self.subset else "") + f" [{self.split}]"


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def open_dataset(spec: DatasetSpec):
    """The dataset's split as an iterable of rows: a save_to_disk folder, the local cache when
    HF_HUB_OFFLINE is set (memory-mapped Arrow files), else streamed from the Hub."""
    try:
        import datasets
    except ImportError:
        raise LabError(f"--dataset needs the datasets library: {CORPORA_EXTRA}") from None
    folder = Path(spec.name).expanduser()
    if folder.is_dir() and is_saved_dataset(folder):
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if spec.split not in loaded:
                raise LabError(
                    f"{folder} has no split '{spec.split}' (it has {', '.join(loaded)}); give --split"
                )
            loaded = loaded[spec.split]
        return loaded
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        return datasets.load_dataset(spec.name, spec.subset, split=spec.split, streaming=not offline)
    except Exception as e:  # the library raises ConnectionError, FileNotFoundError, ValueError...
        if offline:
            raise LabError(
                f"dataset {spec} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                f"download it first (with the network): HF_HUB_OFFLINE=0 lab prepare --dataset {spec.name}"
                + (f" --subset {spec.subset}" if spec.subset else "")
                + f" --split {spec.split} ..., or give a save_to_disk folder ({type(e).__name__}: {e})"
            ) from None
        raise LabError(f"cannot load dataset {spec}: {type(e).__name__}: {e}") from None


def dataset_column_check(rows, spec: DatasetSpec, reading: Reading) -> None:
    features = getattr(rows, "features", None)
    if features is None:  # a stream may not know its columns before the first row
        return
    if reading.text_field not in features:
        raise LabError(
            f"dataset {spec} has no column '{reading.text_field}' (its columns: {', '.join(features)}); "
            "name the text column with --text-field"
        )
    dtype = getattr(features[reading.text_field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise LabError(
            f"dataset {spec}: column '{reading.text_field}' holds {dtype}, not text; name the text column "
            "with --text-field"
        )


def dataset_parts(rows) -> int:
    """How many parts a dataset splits into for tokenizing apart: its files (a streamed dataset's
    n_shards, a loaded one's Arrow files)."""
    if hasattr(rows, "cache_files"):
        return max(len(rows.cache_files), 1)
    return max(getattr(rows, "n_shards", 1), 1)


def dataset_documents(
    spec: DatasetSpec, reading: Reading, shard: int = 0, shards: int = 1
) -> Iterator[Document]:
    """Rows of the dataset (shard `shard` of `shards` of it, contiguous) as documents."""
    rows = open_dataset(spec)
    dataset_column_check(rows, spec, reading)
    if shards > 1:  # contiguous: each part is a run of rows, so the parts in order are the dataset in order
        contiguous = {"contiguous": True} if hasattr(rows, "cache_files") else {}
        rows = rows.shard(num_shards=shards, index=shard, **contiguous)
    for row in rows:
        if reading.text_field not in row:
            raise LabError(
                f"dataset {spec} has no column '{reading.text_field}' (its columns: {', '.join(row)}); "
                "name the text column with --text-field"
            )
        text = row[reading.text_field]
        if not isinstance(text, str):
            raise LabError(
                f"dataset {spec}: column '{reading.text_field}' holds {type(text).__name__}, not text; "
                "name the text column with --text-field"
            )
        if text and reading.keep(text):
            yield Document(Path(spec.name), text, len(text.encode()))


@dataclass
class Corpus:
    """What a command reads: input files and folders, or a dataset; and how (a Reading)."""

    inputs: list[str]
    reading: Reading = field(default_factory=Reading)
    dataset: DatasetSpec | None = None

    def files(self) -> list[Path]:
        return [] if self.dataset else find_input_files(self.inputs)

    def documents(self) -> Iterator[Document]:
        if self.dataset is not None:
            return dataset_documents(self.dataset, self.reading)
        return documents(self.files(), self.reading)

    def __str__(self) -> str:
        return str(self.dataset) if self.dataset else ", ".join(self.inputs)


def corpus_from_args(args) -> Corpus:
    """The Corpus of a command's INPUT arguments and add_reading_arguments' options."""
    inputs = [str(i) for i in args.inputs]
    if bool(inputs) == bool(getattr(args, "dataset", None)):
        raise LabError("give INPUT files or folders, or --dataset NAME (one of the two)")
    dataset = DatasetSpec(args.dataset, args.subset, args.split) if getattr(args, "dataset", None) else None
    return Corpus(inputs, reading_from_args(args), dataset)


def add_reading_arguments(parser, dataset: bool = True) -> None:
    """The options of the shared reader, for every command that reads a corpus."""
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="the text column of .parquet files and datasets (default: text)",
    )
    parser.add_argument(
        "--min-chars", type=int, default=0, metavar="N", help="drop (and count) documents shorter than N"
    )
    parser.add_argument(
        "--on-bad-input",
        choices=("refuse", "skip"),
        default="refuse",
        help="a corrupt file or Parquet row group: stop with its name (default), or skip it with a warning",
    )
    if dataset:
        parser.add_argument(
            "--dataset",
            default=None,
            metavar="NAME",
            help="a Hugging Face dataset (streamed; the local cache when HF_HUB_OFFLINE=1) or a "
            "save_to_disk folder",
        )
        parser.add_argument(
            "--subset", default=None, metavar="S", help="the dataset's configuration, e.g. sample-10BT"
        )
        parser.add_argument(
            "--split", default="train", metavar="SPLIT", help="the dataset's split (default: train)"
        )


def reading_from_args(args) -> Reading:
    if args.min_chars < 0:
        raise LabError(f"--min-chars {args.min_chars} is negative: give a number of characters, e.g. 100")
    return Reading(args.text_field, args.min_chars, args.on_bad_input == "skip")


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
