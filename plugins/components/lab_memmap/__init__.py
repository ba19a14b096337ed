"""Random token windows from train.bin / val.bin files (as `lab prepare` writes them), read through
numpy.memmap: the corpus stays on disk and only the windows a batch needs are paged in.

With `path = ""` the data is the tinyshakespeare that ships with lab, tokenized on first use into
the user's cache (see embedded.py)."""

from typing import Literal

from pydantic import Field

from lab import hookimpl
from lab.slots import ComponentConfig
from lab_memmap.source import MemmapData


class MemmapConfig(ComponentConfig):
    path: str = Field(
        "",
        description="folder with train.bin, val.bin and meta.json, or shards and a manifest.json (from "
        "`lab prepare`), relative to the current folder; empty: the tinyshakespeare that ships with lab",
    )
    dtype: Literal["uint16", "uint32"] = Field(
        "uint16", description="token width of the .bin files when the folder has no meta.json"
    )


@hookimpl
def lab_components(register):
    register("data", "memmap", MemmapData, MemmapConfig, "random windows from token files via numpy.memmap")
