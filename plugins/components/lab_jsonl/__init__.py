"""Documents streamed from .jsonl and .txt files, tokenized as they are read: no `lab prepare`.

    [data]
    name = "jsonl"
    path = ["web.jsonl", "books/"]   # files, or folders searched for *.jsonl and *.txt

With `path = ""` it streams the small sample that ships with this package (speeches from
tinyshakespeare, one per line). See stream.py for how the documents are shared out between
processes and how a run resumes exactly where it stopped.
"""

from typing import ClassVar

from pydantic import Field, NonNegativeInt, model_validator

from lab import hookimpl
from lab.recipe import PATH
from lab.slots import ComponentConfig
from lab_jsonl.stream import JsonlData


class JsonlConfig(ComponentConfig):
    # The conformance checks also run with document-aligned rows.
    extra_settings: ClassVar[list[dict]] = [{"documents": True, "max_document_tokens": 16}]
    path: str | list[str] = Field(
        "",
        description='.jsonl files (one JSON object with a "text" field per line), text files, or '
        "folders searched for *.jsonl and *.txt; empty: the sample that ships with lab",
        json_schema_extra=PATH,
    )
    val_path: str | list[str] = Field(
        "",
        description="files or folders to validate on, in the same forms; empty: hold out "
        "val_fraction of the documents of path",
        json_schema_extra=PATH,
    )
    val_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="share of path's documents (a .jsonl line, or a ~64 KB piece of "
        "a text file) held out for validation when val_path is empty, "
        "chosen by a hash of each one's bytes",
    )
    documents: bool = Field(
        False,
        description="rows start at a document's start (its end-of-text token; the rest of a document "
        "that did not fit a row is dropped), and each batch carries its document ids "
        "(meta['doc_ids']) for document masking",
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
    register(
        "data",
        "jsonl",
        JsonlData,
        JsonlConfig,
        "documents streamed from .jsonl / .txt files, tokenized as they are read",
    )
