"""The tokenizers: GPT-2's byte-level BPE (`gpt2`, from files shipped here), the `bpe` component that
loads a tokenizer.json that `lab tokenizer train` (lab_tokenizer_train) writes, and the `char` component
that reads its character list."""

from lab import hookimpl
from lab_tokenizers.bpe import BPEConfig, BPETokenizer
from lab_tokenizers.char import CharConfig, CharTokenizer
from lab_tokenizers.gpt2 import GPT2Config, GPT2Tokenizer


@hookimpl
def lab_components(register):
    register(
        "tokenizer",
        "gpt2",
        GPT2Tokenizer,
        GPT2Config,
        "GPT-2 byte-level BPE (tiktoken, from files shipped with lab; no download)",
    )
    register(
        "tokenizer",
        "bpe",
        BPETokenizer,
        BPEConfig,
        "byte-level BPE from a tokenizer.json (train one: lab tokenizer train)",
    )
    register(
        "tokenizer",
        "char",
        CharTokenizer,
        CharConfig,
        "one token per character of a vocab.json (make one: lab tokenizer train --char)",
    )
