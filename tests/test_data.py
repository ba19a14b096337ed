"""The memmap data source: a batch is a pure function of (seed, split, step, row), y is x one token
later, token files are checked before they are trusted, and the shipped corpus is tokenized once
into the user's cache."""

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

from lab.data.prepare import prepare
from lab.errors import LabError
from lab.interfaces import DataContext, Tokenizer
from lab.plugins import registry
from lab_memmap import MemmapConfig, MemmapData
from lab_memmap.embedded import CORPUS


class NumberTokenizer(Tokenizer):
    """Stands in for a real tokenizer where only the name and the vocabulary size matter."""

    def __init__(self, name="numbers", vocab_size=1000):
        self.name, self.vocab_size, self.eot_id = name, vocab_size, vocab_size - 1


def gpt2():
    component = registry().get("tokenizer", "gpt2")
    return component.factory(component.Config())


def write_data(folder, train, val, dtype="uint16", meta=True, tokenizer=NumberTokenizer(), **meta_changes):
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype=dtype).tofile(folder / "train.bin")
    np.asarray(val, dtype=dtype).tofile(folder / "val.bin")
    if meta:
        fields = {
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype,
            "train_tokens": len(train),
            "val_tokens": len(val),
            "max_token_id": int(max(np.max(train), np.max(val))),
        }
        (folder / "meta.json").write_text(json.dumps({**fields, **meta_changes}))
    return folder


def source(folder, block_size=8, vocab_size=1000, seed=0, tokenizer=NumberTokenizer(), dtype="uint16"):
    context = DataContext(block_size=block_size, vocab_size=vocab_size, tokenizer=tokenizer, seed=seed)
    return MemmapData(MemmapConfig(path=str(folder), dtype=dtype), context)


@pytest.fixture
def counting(tmp_path):
    """Token i is i % 1000: every window can be traced back to where it was cut."""
    return write_data(tmp_path / "counting", np.arange(5000) % 1000, np.arange(500) % 1000)


# --- batches ------------------------------------------------------------------------------------


def test_rows_are_windows_of_the_file_and_y_is_x_one_token_later(counting):
    x, y = source(counting, block_size=8).batch("train", step=3, rows=range(6))
    assert x.shape == y.shape == (6, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], (x[:, -1] + 1) % 1000)  # the token after x's last one
    assert torch.equal(x, (x[:, :1] + torch.arange(8)) % 1000)  # contiguous slices of the file
    assert len(set(x[:, 0].tolist())) == 6  # each row draws its own window


def test_a_batch_is_a_pure_function_of_seed_split_step_and_row(counting):
    a, b = source(counting, seed=7), source(counting, seed=7)
    assert torch.equal(a.batch("train", 5, range(4))[0], b.batch("train", 5, range(4))[0])
    assert not torch.equal(a.batch("train", 5, range(4))[0], a.batch("train", 6, range(4))[0])
    assert not torch.equal(
        a.batch("train", 5, range(4))[0], source(counting, seed=8).batch("train", 5, range(4))[0]
    )
    assert a.batch("val", 5, range(4))[0].max() < 500  # val rows come from val.bin


def test_processes_taking_their_rows_rebuild_the_global_batch(counting):
    data = source(counting)
    whole_x, whole_y = data.batch("train", 11, range(0, 4))
    halves = [data.batch("train", 11, rows) for rows in (range(0, 2), range(2, 4))]
    assert torch.equal(whole_x, torch.cat([h[0] for h in halves]))
    assert torch.equal(whole_y, torch.cat([h[1] for h in halves]))


@pytest.mark.parametrize("with_meta", [True, False])
def test_uint32_token_files(tmp_path, with_meta):
    wide = NumberTokenizer(vocab_size=100_000)
    ids = 70_000 + np.arange(3000)  # beyond what uint16 holds
    folder = write_data(tmp_path / "wide", ids, ids[:300], dtype="uint32", meta=with_meta, tokenizer=wide)
    x, _ = source(folder, vocab_size=100_000, tokenizer=wide, dtype="uint32").batch("train", 0, range(2))
    assert x.min() >= 70_000 and torch.equal(x[:, 1:] - x[:, :-1], torch.ones(2, 7, dtype=torch.int64))


def test_without_meta_json_the_config_dtype_is_used(tmp_path):
    folder = write_data(tmp_path / "plain", np.arange(900), np.arange(100), meta=False)
    x, _ = source(folder, dtype="uint16").batch("train", 0, range(3))
    assert torch.equal(x, x[:, :1] + torch.arange(8))


# --- what the source refuses --------------------------------------------------------------------


def test_a_missing_data_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(LabError, match=r"data folder .*nowhere.* not found.*lab prepare .*--out"):
        source(tmp_path / "nowhere")


def test_a_missing_val_file_is_named(counting):
    os.remove(counting / "val.bin")
    with pytest.raises(LabError, match=r"val\.bin not found.*lab prepare"):
        source(counting)


def test_a_file_that_is_not_whole_tokens_is_refused(tmp_path):
    folder = write_data(tmp_path / "odd", np.arange(900), np.arange(100), meta=False)
    with open(folder / "train.bin", "ab") as f:
        f.write(b"\x01")  # 1801 bytes: not a whole number of uint16
    with pytest.raises(
        LabError, match=r"train\.bin is 1801 bytes, not a whole number of uint16 .*\[data\] dtype"
    ):
        source(folder)


def test_ids_beyond_the_vocabulary_are_found_by_a_scan(tmp_path):
    folder = write_data(tmp_path / "big-ids", np.arange(900), np.arange(100) + 1200, meta=False)
    with pytest.raises(LabError, match=r"ids up to 1299.*vocabulary has 1000.*vocab_size to at least 1300"):
        source(folder, vocab_size=1000)


def test_ids_beyond_the_vocabulary_are_found_from_meta_json(counting):
    with pytest.raises(LabError, match=r"ids up to 999.*vocabulary has 500 tokens.*at least 1000"):
        source(counting, vocab_size=500)


def test_meta_json_from_another_tokenizer_is_refused(counting):
    with pytest.raises(
        LabError, match=r"tokenizer 'numbers'.*\[tokenizer\] is 'letters'.*--tokenizer letters"
    ):
        source(counting, tokenizer=NumberTokenizer(name="letters"))


def test_token_counts_that_disagree_with_meta_json_are_refused(tmp_path):
    folder = write_data(tmp_path / "changed", np.arange(900), np.arange(100), val_tokens=150)
    with pytest.raises(
        LabError, match=r"val\.bin holds 100 tokens but .*meta\.json says 150.*lab prepare again"
    ):
        source(folder)


def test_a_block_longer_than_a_split_is_refused(counting):
    with pytest.raises(
        LabError, match=r"val\.bin holds 500 tokens, too few for .*\[model\] block_size = 600"
    ):
        source(counting, block_size=600)


def test_an_empty_val_split_says_how_to_fill_it(tmp_path):
    folder = write_data(tmp_path / "no-val", np.arange(900), [], meta=False)
    with pytest.raises(LabError, match=r"val\.bin holds 0 tokens \(lab prepare --val-fraction above 0"):
        source(folder)


# --- the shipped corpus ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The default data built once for this module, in a cache of its own: (source, folder, output)."""
    cache = tmp_path_factory.mktemp("lab-cache")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("LAB_CACHE", str(cache))
        data = source("", block_size=64, vocab_size=50304, tokenizer=gpt2())
    return data, cache / "tinyshakespeare-gpt2", printed.getvalue()


def test_the_shipped_corpus_is_tokenized_into_the_cache(shipped):
    data, folder, printed = shipped
    assert printed.count("\n") == 1 and "tokenizing" in printed and str(folder) in printed
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["tokenizer"], meta["dtype"]) == ("gpt2", "uint16")
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(data.tokens["train"]), len(data.tokens["val"]))
    # nanoGPT's split: the first 90% of the text trains, cut here at a line boundary.
    tokenizer, text = gpt2(), CORPUS.read_text()
    train, val = tokenizer.decode(data.tokens["train"]), tokenizer.decode(data.tokens["val"])
    assert train + val == text and train.endswith("\n")
    assert 0.9 <= len(train) / len(text) < 0.901
    assert train.startswith("First Citizen:")


def test_a_later_run_reuses_the_cache(shipped, monkeypatch, capsys):
    _, folder, _ = shipped
    monkeypatch.setenv("LAB_CACHE", str(folder.parent))
    before = {f: (folder / f).stat().st_mtime_ns for f in ("train.bin", "val.bin", "meta.json")}
    x, y = source("", block_size=64, vocab_size=50304, tokenizer=gpt2()).batch("train", 0, range(2))
    assert capsys.readouterr().out == ""
    assert before == {f: (folder / f).stat().st_mtime_ns for f in before}
    assert x.max() < 50257 and torch.equal(x[:, 1:], y[:, :-1])


def test_a_damaged_cache_is_tokenized_again(shipped, tmp_path, monkeypatch, capsys):
    _, folder, _ = shipped
    shutil.copytree(folder, tmp_path / folder.name)
    with open(tmp_path / folder.name / "val.bin", "r+b") as f:
        f.truncate(1000)  # as if a copy was cut short
    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    data = source("", block_size=64, vocab_size=50304, tokenizer=gpt2())
    assert "tokenizing" in capsys.readouterr().out
    assert (tmp_path / folder.name / "val.bin").read_bytes() == (folder / "val.bin").read_bytes()
    assert len(data.tokens["val"]) == len(shipped[0].tokens["val"])


def test_the_cache_folder_follows_xdg_cache_home_without_lab_cache(tmp_path, monkeypatch):
    from lab.files import cache_folder as cache_root

    monkeypatch.delenv("LAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "lab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "lab"


def test_prepared_uint32_data_reads_back(tmp_path):
    """lab prepare picks uint32 for a vocabulary past 65536, and the source reads what it wrote."""

    class Wide(Tokenizer):
        name, vocab_size, eot_id = "wide", 70_000, 69_999

        def encode(self, text):
            return [65_536 + ord(c) for c in text]

    prepare([CORPUS], tmp_path / "wide", Wide(), val_fraction=0.1, progress=False)
    assert json.loads((tmp_path / "wide" / "meta.json").read_text())["dtype"] == "uint32"
    x, _ = source(tmp_path / "wide", vocab_size=70_000, tokenizer=Wide()).batch("train", 0, range(4))
    assert x.min() >= 65_536 + ord("\n")
