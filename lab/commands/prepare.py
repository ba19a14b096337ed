"""`lab prepare`: text in, token files out (lab/data/prepare.py does the work)."""

from __future__ import annotations

from pathlib import Path

from lab.data.prepare import build_tokenizer, prepare, refuse_foreign_files
from lab.data.tokens import SPLITS
from lab.files import cannot_write


def cli_prepare(args) -> int:
    tokenizer = build_tokenizer(args.tokenizer, args.recipe, args.overrides)
    refuse_foreign_files(Path(args.out).expanduser())
    try:
        meta = prepare(args.inputs, args.out, tokenizer, args.val_fraction, args.workers)
    except OSError as e:  # the half-written files are gone already (Output.discard)
        raise cannot_write(
            e.filename or args.out, e, fix="Free some space, or give --out a folder on another disk"
        ) from None
    print(
        f"wrote {args.out}: "
        + ", ".join(
            f"{split}.bin {meta[f'{split}_tokens']:,} tokens ({_count(meta[f'{split}_documents'], 'document')})"
            for split in SPLITS
        )
        + f"; {meta['dtype']}, tokenizer {meta['tokenizer']}"
    )
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
