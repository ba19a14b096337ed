"""The `char` tokenizer: one token per character, as nanoGPT's shakespeare_char. The characters are
those of the training text, listed in a vocab.json that `lab tokenizer train --char` writes:

    {"chars": ["\\n", " ", "!", ...]}     token i is chars[i]
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from lab.errors import LabError
from lab.interfaces import Tokenizer
from lab.recipe import PATH
from lab.slots import ComponentConfig

# The 65 characters of the shipped tinyshakespeare: recipes/shakespeare_char.toml's vocabulary.
SHAKESPEARE = Path(__file__).parent / "shakespeare" / "char" / "vocab.json"
MAKE_ONE = "make one with: lab tokenizer train YOUR_TEXT --char --out DIR"


class CharConfig(ComponentConfig):
    vocab: str = Field(
        description="a vocab.json of characters (or a folder holding one) written by "
        "`lab tokenizer train --char`, relative to the recipe file",
        examples=[str(SHAKESPEARE)],
        json_schema_extra=PATH,
    )


def read_vocab(path: Path) -> tuple[Path, list[str]]:
    if path.is_dir() and (path / "vocab.json").is_file():
        path = path / "vocab.json"
    if not path.is_file():
        raise LabError(
            f"[tokenizer] vocab = '{path}': no such file. Fix the path in the recipe, or {MAKE_ONE} "
            'and set vocab = "DIR/vocab.json"'
        )
    try:
        chars = json.loads(path.read_text())["chars"]
        if (
            not chars
            or not all(isinstance(c, str) and len(c) == 1 for c in chars)
            or len(set(chars)) < len(chars)
        ):
            raise ValueError('"chars" must be a list of distinct single characters')
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise LabError(
            f'{path} is not a char vocabulary ({e}); it should be JSON like {{"chars": ["a", "b"]}}; '
            f"{MAKE_ONE}"
        ) from None
    return path, chars


class CharTokenizer(Tokenizer):
    name = "char"
    eot_id = None  # as nanoGPT's: documents simply follow one another

    def __init__(self, config: CharConfig):
        self.path, self.chars = read_vocab(Path(config.vocab).expanduser())
        self.ids = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise LabError(
                f"the character {c!r} (U+{ord(c):04X}) is not in the char vocabulary {self.path} "
                f"({self.vocab_size} characters of the text it was made from). Make the vocabulary "
                f"from text that has it (lab tokenizer train YOUR_TEXT --char --out DIR), or remove "
                f"it from the text"
            ) from None

    def decode(self, ids) -> str:
        # An id past the characters is one of the padding rows of a vocab_multiple-padded model,
        # which an untrained model may still sample: it stands for no text.
        return "".join(self.chars[i] if i < self.vocab_size else "" for i in ids)

    def files(self) -> dict[str, Path]:
        return {"vocab": self.path}

    def hf_json(self) -> str:
        """A Hugging Face tokenizer.json with the same ids: each character a word of a WordLevel model."""
        from lab_tokenizers.bpe import tokenizers_library

        tk = tokenizers_library()
        tokenizer = tk.Tokenizer(tk.models.WordLevel(self.ids, unk_token=None))
        tokenizer.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")
        tokenizer.decoder = tk.decoders.Fuse()  # joins the characters back without spaces
        return tokenizer.to_str()
