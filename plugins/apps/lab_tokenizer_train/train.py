"""`lab tokenizer train FILES... --vocab-size N --out DIR`: a byte-level BPE trained with Hugging Face
tokenizers on your text, written as DIR/tokenizer.json; with --char, the characters of the text as
DIR/vocab.json. The text is read as `lab prepare` reads it (text files, folders of .txt, .jsonl lines),
streamed in pieces cut between lines, so a corpus needs no more memory than the tokenizer's counts.

The BPE is GPT-2's kind: text is cut by GPT-2's pre-tokenisation regex (--pattern to change it), each
piece mapped to bytes, merges learnt over bytes (so any text encodes, nothing is unknown), and
<|endoftext|> is a special token. The same input and settings give the same file, byte for byte.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from lab.data.text import INPUT_HELP, documents, find_input_files, read_text
from lab.errors import LabError
from lab.files import write_text_atomically
from lab_tokenizers.bpe import ENDOFTEXT, tokenizers_library
from lab_tokenizers.gpt2 import PATTERN as GPT2_PATTERN

SPECIALS = [ENDOFTEXT]
SMALLEST = 256 + len(SPECIALS)  # every byte is a token, so nothing is ever unknown
# Text handed to the trainer at once. tokenizers counts the pieces of each on its threads, so many
# small ones keep every core busy where a few megabyte-sized ones leave cores idle at the end.
PIECE_BYTES = 64 << 10


def cli_train(args) -> int:
    if args.char:
        path, size = train_char(args.inputs, args.out)
        print(
            f"wrote {path}: {size} characters. Use it in a recipe:\n"
            f'  [tokenizer]\n  name = "char"\n  vocab = "{path}"',
            file=sys.stderr,
        )
        return 0
    if args.vocab_size is None:
        raise LabError(
            "lab tokenizer train needs --vocab-size N (e.g. 4096), or --char for a character vocabulary"
        )
    path, size = train_bpe(
        args.inputs, args.out, args.vocab_size, args.pattern or GPT2_PATTERN, args.min_frequency
    )
    print(
        f'wrote {path}: {size} tokens. Use it in a recipe:\n  [tokenizer]\n  name = "bpe"\n  path = "{path}"',
        file=sys.stderr,
    )
    return 0


def texts(inputs: list[str], progress: bool = True, what: str = "reading") -> Iterator[str]:
    """The text of every document of the inputs, in pieces of about PIECE_BYTES cut between lines."""
    files = find_input_files([str(i) for i in inputs])
    bar = tqdm(
        total=sum(f.stat().st_size for f in files),
        unit="B",
        unit_scale=True,
        desc=what,
        disable=None if progress else True,
    )  # None: a bar on a terminal, nothing in a log file
    with bar:
        for doc in documents(files):
            if doc.text is not None:
                bar.update(doc.nbytes)
                yield doc.text
                continue
            for text, nbytes in read_text(doc.path, 0, doc.path.stat().st_size, PIECE_BYTES):
                bar.update(nbytes)
                yield text


def output_file(out, name: str, make: bool = True) -> Path:
    """out/name, checked before any work: out is not a file, name is not there yet. make: create out
    now (else the caller does, with make_folder, once there is something to write)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise LabError(f"--out {out} is a file, not a folder: give a folder for {name}")
    if (out / name).exists():
        raise LabError(f"{out / name} exists; choose another --out folder, or move that file away first")
    if make:
        make_folder(out)
    return out / name


def make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabError(
            f"cannot create the --out folder {out} ({e.strerror}); choose a folder you can write"
        ) from None


def train_bpe(
    inputs, out, vocab_size: int, pattern: str = GPT2_PATTERN, min_frequency: int = 2, progress: bool = True
) -> tuple[Path, int]:
    """Train a byte-level BPE on the inputs and write out/tokenizer.json; (its path, its vocab size)."""
    if vocab_size < SMALLEST:
        raise LabError(
            f"--vocab-size {vocab_size} is smaller than the {SMALLEST} tokens a byte-level BPE starts "
            f"with (256 bytes + {ENDOFTEXT}); give at least {SMALLEST}, e.g. --vocab-size 4096"
        )
    check_vocab_fits(vocab_size, inputs)
    tokenizer = untrained_bpe(pattern)
    path = output_file(out, "tokenizer.json", make=False)
    seen = Counted(texts(inputs, progress))
    tokenizer.train_from_iterator(seen, trainer=bpe_trainer(vocab_size, min_frequency))
    refuse_empty(seen, inputs)
    make_folder(path.parent)  # only now: a refused or failed training leaves no empty --out behind
    write_text_atomically(path, tokenizer.to_str(pretty=True))
    return path, tokenizer.get_vocab_size()


# The token files of `lab prepare` hold uint32 ids at most.
LARGEST = 2**32


def check_vocab_fits(vocab_size: int, inputs) -> None:
    """Refuse a vocabulary the token files cannot hold or the text cannot fill, before the trainer
    (which sizes its tables by vocab_size, and aborts the process when it cannot allocate them) runs."""
    if vocab_size > LARGEST:
        raise LabError(
            f"--vocab-size {vocab_size} is more than the {LARGEST} token ids lab's token files hold (uint32)"
        )
    nbytes = sum(f.stat().st_size for f in find_input_files([str(i) for i in inputs]))
    most = SMALLEST + nbytes  # each merge shortens the text by at least one token
    if vocab_size > most and nbytes:  # no text at all: refuse_empty says so
        raise LabError(
            f"--vocab-size {vocab_size} is more than this text can make: {nbytes} bytes give at most "
            f"{nbytes} merges on top of the {SMALLEST} starting tokens; give at most {most} "
            f"(e.g. --vocab-size {min(most, 4096)}), or train on more text"
        )


def untrained_bpe(pattern: str = GPT2_PATTERN):
    """GPT-2's kind of BPE, before training: text cut by `pattern`, each piece as bytes."""
    tk = tokenizers_library()
    try:
        split = tk.pre_tokenizers.Split(tk.Regex(pattern), behavior="isolated")
    except Exception as e:  # tokenizers raises a bare Exception for a regex it cannot compile
        raise LabError(f"--pattern {pattern!r} is not a regex tokenizers can use ({e})") from None
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [split, tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = tk.decoders.ByteLevel()
    return tokenizer


def bpe_trainer(vocab_size: int, min_frequency: int = 2):
    tk = tokenizers_library()
    return tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIALS,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )


def train_char(inputs, out, progress: bool = True) -> tuple[Path, int]:
    """The sorted characters of the inputs, as out/vocab.json (nanoGPT's shakespeare_char vocabulary)."""
    path = output_file(out, "vocab.json")
    chars: set[str] = set()
    seen = Counted(texts(inputs, progress))
    for text in seen:
        chars.update(text)
    refuse_empty(seen, inputs)
    write_text_atomically(path, json.dumps({"chars": sorted(chars)}, ensure_ascii=False) + "\n")
    return path, len(chars)


class Counted:
    """An iterator of texts that counts their characters (tokenizers consumes it in Rust)."""

    def __init__(self, texts: Iterator[str]):
        self.texts, self.chars = texts, 0

    def __iter__(self):
        for text in self.texts:
            self.chars += len(text)
            yield text


def refuse_empty(seen: Counted, inputs) -> None:
    if seen.chars == 0:
        raise LabError(f"no text in {', '.join(map(str, inputs))}: the inputs are empty. {INPUT_HELP}")
