"""`lab prepare`: text files, folders and .jsonl in; train.bin, val.bin and meta.json out, with the
end-of-text token between documents, the same output for any number of workers, and one clear
error for each input it cannot use."""

import json
import re

import numpy as np
import pytest
from pydantic import BaseModel

import lab.data.prepare as prepare_module
import lab.plugins
from lab.commands.cli import main
from lab.data.prepare import build_tokenizer, prepare
from lab.errors import LabError
from lab.plugins import registry
from lab_memmap.embedded import CORPUS

SHAKESPEARE = CORPUS.read_text()
DOCUMENTS = [
    "The first document.\nIt has two lines.\n",
    "Second: short.",
    "Third, with unicode: café, naïve, 日本語.\n",
    "Fourth document\n\nwith a blank line.",
    "Fifth.",
    "Sixth and last.\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    component = registry().get("tokenizer", "gpt2")
    return component.factory(component.Config())


def read_split(folder, split, dtype=np.uint16):
    return np.fromfile(folder / f"{split}.bin", dtype=dtype)


def documents_in(folder, tokenizer):
    """Every document's text, from both splits, cut at the end-of-text tokens."""
    texts = []
    for split in ("train", "val"):
        ids = read_split(folder, split).tolist()
        cuts = [-1] + [i for i, t in enumerate(ids) if t == tokenizer.eot_id] + [len(ids)]
        texts += [tokenizer.decode(ids[a + 1 : b]) for a, b in zip(cuts, cuts[1:]) if ids]
    return texts


# --- what it writes -----------------------------------------------------------------------------


def test_one_text_file_is_cut_at_a_line_boundary(tmp_path, tokenizer):
    text = "".join(f"line {i}: some words of the play\n" for i in range(100))
    (tmp_path / "play.txt").write_text(text)
    meta = prepare([tmp_path / "play.txt"], tmp_path / "out", tokenizer, val_fraction=0.2, progress=False)
    train, val = (tokenizer.decode(read_split(tmp_path / "out", s)) for s in ("train", "val"))
    assert train + val == text and train.endswith("\n")
    last_line = train.splitlines(keepends=True)[-1]
    assert len(train) - len(last_line) < 0.8 * len(text) <= len(train)  # the first line start past 80%
    assert tokenizer.eot_id not in read_split(tmp_path / "out", "train")  # one document: nothing to separate
    assert meta == json.loads((tmp_path / "out" / "meta.json").read_text())
    expected = {
        "tokenizer": "gpt2",
        "vocab_size": 50257,
        "dtype": "uint16",
        "eot_id": 50256,
        "train_documents": 1,
        "val_documents": 1,
    }
    assert {key: meta[key] for key in expected} == expected
    assert meta["train_tokens"] == len(read_split(tmp_path / "out", "train"))
    assert meta["val_tokens"] == len(read_split(tmp_path / "out", "val"))
    assert meta["max_token_id"] == max(read_split(tmp_path / "out", s).max() for s in ("train", "val"))


def test_a_folder_is_searched_for_txt_files_and_eot_separates_them(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    for i, text in enumerate(DOCUMENTS):
        path = corpus / ("sub" if i % 2 else "") / ("deeper" if i % 3 == 0 else "") / f"doc{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (corpus / "notes.md").write_text("not a .txt file: left out")
    meta = prepare([corpus], tmp_path / "out", tokenizer, val_fraction=0.4, progress=False)
    assert sorted(documents_in(tmp_path / "out", tokenizer)) == sorted(DOCUMENTS)
    assert meta["train_documents"] + meta["val_documents"] == len(DOCUMENTS)
    assert meta["train_documents"] and meta["val_documents"]
    for split in ("train", "val"):  # between documents, never before the first or after the last
        ids = read_split(tmp_path / "out", split)
        assert (ids == tokenizer.eot_id).sum() == meta[f"{split}_documents"] - 1
        assert ids[0] != tokenizer.eot_id and ids[-1] != tokenizer.eot_id


def test_jsonl_lines_are_documents(tmp_path, tokenizer):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(DOCUMENTS)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    meta = prepare([tmp_path / "docs.jsonl"], tmp_path / "out", tokenizer, val_fraction=0.3, progress=False)
    assert sorted(documents_in(tmp_path / "out", tokenizer)) == sorted(DOCUMENTS)
    assert meta["train_documents"] + meta["val_documents"] == len(DOCUMENTS)


def test_the_split_is_the_same_every_time_and_duplicates_stay_together(tmp_path, tokenizer):
    texts = [f"document number {i}\n" for i in range(40)]
    texts += texts[:10]  # copies must land where their originals did
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for out in ("a", "b"):
        prepare([tmp_path / "docs.jsonl"], tmp_path / out, tokenizer, val_fraction=0.25, progress=False)
        assert (tmp_path / out / "train.bin").read_bytes() == (tmp_path / "a" / "train.bin").read_bytes()
    val = set(tokenizer.decode(read_split(tmp_path / "a", "val")).split("<|endoftext|>"))
    train = set(tokenizer.decode(read_split(tmp_path / "a", "train")).split("<|endoftext|>"))
    assert val and train and not val & train


def test_a_split_the_draw_leaves_empty_gets_the_last_document(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("the first of two documents\n")
    (tmp_path / "b.txt").write_text("the second of two documents\n")
    meta = prepare(
        [tmp_path / "a.txt", tmp_path / "b.txt"],
        tmp_path / "out",
        tokenizer,
        val_fraction=0.001,
        progress=False,
    )
    assert (meta["train_documents"], meta["val_documents"]) == (1, 1)
    assert tokenizer.decode(read_split(tmp_path / "out", "train")) == "the first of two documents\n"
    assert tokenizer.decode(read_split(tmp_path / "out", "val")) == "the second of two documents\n"


def test_reading_in_pieces_tokenizes_exactly_like_the_whole_text(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(prepare_module, "PIECE_BYTES", 4096)  # ~50 pieces instead of one
    (tmp_path / "part.txt").write_text(SHAKESPEARE[:200_000])
    prepare([tmp_path / "part.txt"], tmp_path / "out", tokenizer, val_fraction=0.0, progress=False)
    assert read_split(tmp_path / "out", "train").tolist() == tokenizer.encode(SHAKESPEARE[:200_000])


def test_text_without_clean_seams_still_round_trips(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(prepare_module, "PIECE_BYTES", 1000)
    text = "".join(f"paragraph {i} of a double-spaced text, naïve café\n\n" for i in range(2000))
    (tmp_path / "spaced.txt").write_text(text)
    prepare([tmp_path / "spaced.txt"], tmp_path / "out", tokenizer, val_fraction=0.0, progress=False)
    assert tokenizer.decode(read_split(tmp_path / "out", "train")) == text


def test_several_workers_write_the_same_files_as_one(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(prepare_module, "PIECE_BYTES", 8192)  # enough work items to spread out
    (tmp_path / "play.txt").write_text(SHAKESPEARE[:100_000])
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCUMENTS * 20))
    inputs = [tmp_path / "play.txt", tmp_path / "docs.jsonl"]
    one = prepare(inputs, tmp_path / "one", tokenizer, workers=1, progress=False)
    two = prepare(inputs, tmp_path / "two", tokenizer, workers=2, progress=False)
    assert one == two
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_a_failed_prepare_leaves_the_previous_output_whole(tmp_path, tokenizer):
    (tmp_path / "good.txt").write_text(SHAKESPEARE[:5000])
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "a typo in the key"}\n')
    prepare([tmp_path / "good.txt"], tmp_path / "out", tokenizer, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(LabError, match=r"bad\.jsonl line 2 has no \"text\" string"):
        prepare([tmp_path / "good.txt", tmp_path / "bad.jsonl"], tmp_path / "out", tokenizer, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # no temp files either


# --- the command ----------------------------------------------------------------------------------


def test_lab_prepare_writes_the_folder_and_says_what_it_wrote(tmp_path, capsys, umask_027, file_modes):
    (tmp_path / "play.txt").write_text(SHAKESPEARE[:20_000])
    assert (
        main(["prepare", str(tmp_path / "play.txt"), "--out", str(tmp_path / "out"), "--tokenizer", "gpt2"])
        == 0
    )
    assert "train.bin" in capsys.readouterr().out
    # written under temporary names (mkstemp: owner only), then given the umask's mode
    assert file_modes(tmp_path / "out") == {
        "train.bin": umask_027,
        "val.bin": umask_027,
        "meta.json": umask_027,
    }


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.txt"], r"missing\.txt not found\. Give text files, \.jsonl files .*or folders of them"),
        (["empty.txt"], r"no text in .*empty\.txt: the inputs are empty"),
        (["emptydir"], r"folder .*emptydir holds no \.txt or \.jsonl files"),
        (["play.txt", "--val-fraction", "1"], r"--val-fraction 1\.0 is outside \[0, 1\)"),
        (["play.txt", "--val-fraction", "-0.1"], r"--val-fraction -0\.1 is outside \[0, 1\)"),
        (["broken.jsonl"], r"broken\.jsonl line 1 is not valid JSON"),
        (["latin1.txt"], r"latin1\.txt is not UTF-8 text.*iconv"),
        (
            ["play.txt", "--tokenizer", "gtp2"],
            r"unknown tokenizer 'gtp2' in --tokenizer.*Did you mean 'gpt2'",
        ),
    ],
)
def test_lab_prepare_refuses_bad_input_with_one_message(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "play.txt").write_text("some text\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "broken.jsonl").write_text('{"text": "unterminated\n')
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    if "--tokenizer" not in args:
        args = args + ["--tokenizer", "gpt2"]
    assert main(["prepare", *args, "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err


def test_without_tokenizer_the_only_installed_one_is_used(monkeypatch, tokenizer):
    only = lab.plugins.Registry()
    only.add(registry().get("tokenizer", "gpt2"))
    monkeypatch.setattr(lab.plugins, "_registry", only)
    assert build_tokenizer(None).name == "gpt2"
    other = lab.plugins.Component("tokenizer", "bytes", lambda config: None, BaseModel, "", "lab-bytes")
    only.add(other)
    with pytest.raises(LabError, match=r"--tokenizer NAME is needed.*bytes, gpt2"):
        build_tokenizer(None)
