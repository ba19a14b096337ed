"""Random token windows from train.bin / val.bin files (as `lab prepare` writes them), read through
numpy.memmap: the corpus stays on disk and only the windows a batch needs are paged in.

With `path = ""` the data is the tinyshakespeare that ships with lab, tokenized on first use into
the user's cache (see embedded.py)."""

from typing import Literal

from pydantic import Field, NonNegativeInt, model_validator

from lab import hookimpl
from lab.recipe import PATH
from lab.slots import ComponentConfig
from lab_memmap.source import MemmapData


class MemmapConfig(ComponentConfig):
    path: str = Field(
        "",
        description="folder with train.bin, val.bin and meta.json (from `lab prepare`), relative to "
        "the recipe file; empty: the tinyshakespeare that ships with lab",
        json_schema_extra=PATH,
    )
    dtype: Literal["uint16", "uint32"] = Field(
        "uint16", description="token width of the .bin files when the folder has no meta.json"
    )
    documents: bool = Field(
        False,
        description="rows start at an end-of-text token (a document's start), and each batch carries "
        "its document ids (meta['doc_ids']) for document masking",
    )
    max_document_tokens: NonNegativeInt = Field(
        0, description="with documents: a longer document is cut into pieces of this many tokens; 0: no cap"
    )

    @model_validator(mode="after")
    def _cap_needs_documents(self):
        if self.max_document_tokens and not self.documents:
            raise ValueError("max_document_tokens needs documents = true")
        return self


@hookimpl
def lab_components(register):
    register("data", "memmap", MemmapData, MemmapConfig, "random windows from token files via numpy.memmap")
