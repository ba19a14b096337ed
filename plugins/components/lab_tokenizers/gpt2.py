"""GPT-2's byte-level BPE through tiktoken, built from the vocab.bpe and encoder.json that ship in
this package: tiktoken.get_encoding("gpt2") would download them at run time."""

from functools import lru_cache
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from lab.interfaces import Tokenizer
from lab.slots import ComponentConfig

HERE = Path(__file__).parent / "gpt2"  # vocab.bpe and encoder.json, as OpenAI published them
ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k_pat_str / the original encoder.py).
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class GPT2Config(ComponentConfig):
    pass


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(HERE / "vocab.bpe"), encoder_json_file=str(HERE / "encoder.json")
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: len(ranks)},
        explicit_n_vocab=len(ranks) + 1,
    )


class GPT2Tokenizer(Tokenizer):
    name = "gpt2"

    def __init__(self, config: GPT2Config | None = None):
        self.encoding = gpt2_encoding()
        self.vocab_size = self.encoding.n_vocab  # 50257
        self.eot_id = self.encoding.eot_token  # 50256

    def encode(self, text: str) -> list[int]:
        # <|endoftext|> in user text is plain text, not the special token: data can't forge it.
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))
