"""What evaluation reads: text to score (text files, .jsonl documents, prepared data folders) and
multiple-choice tasks (.jsonl, HellaSwag's format or a generic one). Every mistake in a file is one
LabError naming the file, the line and the fix."""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab.data.text import decode, jsonl_documents
from lab.data.tokens import check_meta_matches, read_meta
from lab.errors import LabError

TEXT_HELP = (
    'give text files (.txt or any UTF-8 text), .jsonl files with a "text" field per line, or a '
    "data folder made by `lab prepare`"
)
TASK_HELP = (
    'each line of a task file is a JSON object: {"context": "...", "choices": ["...", ...], '
    '"label": N} or HellaSwag\'s {"ctx": "...", "endings": [...], "label": N}'
)


def read_token_sequences(path, tokenizer) -> list[list[int]]:
    """The token sequences `lab eval --text` scores in a file or folder: each document of a text or
    .jsonl file after an end-of-text token, or a prepared folder's val split as one stream."""
    path = Path(path)
    if path.is_dir():
        seqs = [prepared_val_tokens(path, tokenizer)]
    elif not path.is_file():
        raise LabError(f"{path} not found; {TEXT_HELP}")
    elif path.suffix == ".jsonl":
        seqs = [document_ids(tokenizer, doc.text) for doc in jsonl_documents(path)]
    else:
        seqs = [document_ids(tokenizer, read_text_file(path))]
    if not seqs or all(len(s) < 2 for s in seqs):
        raise LabError(f"{path} has no text to score; {TEXT_HELP}")
    return seqs


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if b"\0" in data:  # UTF-8 text never holds a NUL byte; binary files nearly always do
        raise LabError(f"{path} is not a text file (it holds NUL bytes); {TEXT_HELP}")
    return decode(codecs.getincrementaldecoder("utf-8")(), data, path, 0, final=True)


def prepared_val_tokens(folder: Path, tokenizer) -> list[int]:
    """val.bin of a folder `lab prepare` made, checked against its meta.json as the data sources do."""
    meta = read_meta(folder)
    if meta is None or not (folder / "val.bin").is_file():
        raise LabError(
            f"{folder} is a folder without val.bin and meta.json, not a data folder made by "
            f"`lab prepare`; {TEXT_HELP}"
        )
    check_meta_matches(meta, folder, tokenizer)
    return np.fromfile(folder / "val.bin", dtype=np.dtype(meta["dtype"])).astype(np.int64).tolist()


def read_task(path) -> list[Item]:
    """A multiple-choice task: one JSON object per line, generic ({"context", "choices", "label"})
    or HellaSwag's ({"ctx" or "ctx_a"/"ctx_b", "activity_label", "endings", "label"}, its text cleaned
    as lm-evaluation-harness cleans it)."""
    path = Path(path)
    if not path.is_file():
        raise LabError(f"task file {path} not found; {TASK_HELP}")
    items = []
    for number, line in enumerate(read_text_file(path).splitlines(), 1):
        if line.strip():
            items.append(parse_item(line, f"{path} line {number}"))
    if not items:
        raise LabError(f"task file {path} holds no items; {TASK_HELP}")
    return items


def parse_item(line: str, where: str) -> Item:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise LabError(f"{where} is not valid JSON ({e}); {TASK_HELP}") from None
    if not isinstance(record, dict):
        raise LabError(f"{where} is not a JSON object; {TASK_HELP}")
    if "endings" in record:
        context, choices = hellaswag_context(record, where), record["endings"]
        if isinstance(choices, list):
            choices = [hellaswag_clean(c) if isinstance(c, str) else c for c in choices]
    elif "choices" in record:
        context, choices = record.get("context"), record["choices"]
    else:
        raise LabError(f'{where} has neither "choices" nor "endings"; {TASK_HELP}')
    if not isinstance(context, str):
        raise LabError(f"{where}: the context must be a string; {TASK_HELP}")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise LabError(f"{where}: the choices must be a list of at least two non-empty strings; {TASK_HELP}")
    label = record.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)  # Hugging Face's copy of HellaSwag writes labels as strings
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise LabError(
            f"{where}: label {label!r} is not the index of one of its {len(choices)} choices "
            f"(0 to {len(choices) - 1})"
        )
    return Item(context, choices, label)


def hellaswag_context(record: dict, where: str) -> str:
    """lm-evaluation-harness's HellaSwag query: 'activity label: ctx_a Ctx_b', cleaned."""
    if isinstance(record.get("ctx_a"), str) and isinstance(record.get("ctx_b"), str):
        ctx = record["ctx_a"] + " " + record["ctx_b"].capitalize()
    elif isinstance(record.get("ctx"), str):
        ctx = record["ctx"]
    else:
        raise LabError(
            f'{where}: a HellaSwag item needs a "ctx" string (or "ctx_a" and "ctx_b"); {TASK_HELP}'
        )
    label = record.get("activity_label")
    return hellaswag_clean(f"{label}: {ctx}" if isinstance(label, str) and label else ctx)


def hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow items carry [title]-style markup; lm-evaluation-harness removes it so."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def document_ids(tokenizer, text: str) -> list[int]:
    """A document's tokens, after the end-of-text token when the tokenizer has one, so that its
    first token is scored too (as a document starts in training data, and as lm-eval does)."""
    prefix = [tokenizer.eot_id] if tokenizer.eot_id is not None else []
    return prefix + tokenizer.encode(text)


@dataclass(frozen=True)
class Item:
    """A multiple-choice question: the context, the choices that may continue it, the right one."""

    context: str
    choices: list[str]
    label: int
