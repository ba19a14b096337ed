"""`lab tokenizer train`: a byte-level BPE trained with Hugging Face tokenizers on your text, or the
characters of a text; the tokenizers it writes are loaded by lab_tokenizers' `bpe` and `char`."""

from lab import hookimpl
from lab.plugins import lazy_command


@hookimpl
def lab_commands(subparsers):
    p = subparsers.add_parser("tokenizer", help="train a tokenizer on your text (lab tokenizer train --help)")
    sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    t = sub.add_parser(
        "train", help="train a byte-level BPE (or list the characters) of text files, folders, .jsonl"
    )
    t.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="text files, folders of .txt, or .jsonl with a 'text' field",
    )
    t.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        metavar="N",
        help="tokens in the vocabulary, <|endoftext|> and the 256 bytes included (BPE)",
    )
    t.add_argument(
        "--out", required=True, metavar="DIR", help="folder for tokenizer.json (vocab.json with --char)"
    )
    t.add_argument("--char", action="store_true", help="a character vocabulary (vocab.json) instead of a BPE")
    t.add_argument(
        "--pattern", default=None, metavar="REGEX", help="pre-tokenisation regex; default: GPT-2's"
    )
    t.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        metavar="F",
        help="merge only pairs seen at least F times (default 2)",
    )
    t.set_defaults(func=lazy_command("lab_tokenizer_train.train", "cli_train"))
