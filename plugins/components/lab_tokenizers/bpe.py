"""The `bpe` tokenizer: a byte-level BPE read from a tokenizer.json, Hugging Face tokenizers' format
(what `lab tokenizer train` writes, and what transformers' PreTrainedTokenizerFast loads)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from lab.errors import LabError
from lab.interfaces import Tokenizer
from lab.recipe import PATH
from lab.slots import ComponentConfig

ENDOFTEXT = "<|endoftext|>"
# A 4096-token BPE of the shipped tinyshakespeare: recipes/shakespeare_bpe.toml's, and the example
# lab.testing's checks build this component with.
SHAKESPEARE = Path(__file__).parent / "shakespeare" / "bpe4k" / "tokenizer.json"
TRAIN_ONE = "train one with: lab tokenizer train YOUR_TEXT --vocab-size 4096 --out DIR"


class BPEConfig(ComponentConfig):
    path: str = Field(
        description="a tokenizer.json (or a folder holding one) written by `lab tokenizer train`, "
        "relative to the recipe file",
        examples=[str(SHAKESPEARE)],
        json_schema_extra=PATH,
    )


def tokenizers_library():
    try:
        import tokenizers
    except ImportError:
        raise LabError(
            "the bpe tokenizer needs Hugging Face tokenizers: pip install 'lab[tokenizers]'"
        ) from None
    return tokenizers


def read_tokenizer_json(path: Path):
    """A tokenizers.Tokenizer from a file, or one message saying what is wrong with it."""
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise LabError(
            f"[tokenizer] path = '{path}': no such file. Fix the path in the recipe, or {TRAIN_ONE} "
            'and set path = "DIR/tokenizer.json"'
        )
    try:
        return path, tokenizers_library().Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any malformed file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LabError(
            f"{path} is not a tokenizer.json that Hugging Face tokenizers can read ({reason}); {TRAIN_ONE}"
        ) from None


class BPETokenizer(Tokenizer):
    name = "bpe"

    def __init__(self, config: BPEConfig):
        self.path, self.tokenizer = read_tokenizer_json(Path(config.path).expanduser())
        # <|endoftext|> in user text is plain text, not the special token: data can't forge it.
        self.tokenizer.encode_special_tokens = True
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.eot_id = self.tokenizer.token_to_id(ENDOFTEXT)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def files(self) -> dict[str, Path]:
        return {"path": self.path}

    def hf_json(self) -> str:
        return self.path.read_text()
