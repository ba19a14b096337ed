"""Real corpora: .parquet files (read by row group) and Hugging Face datasets in; token shards with a
manifest out, continued where an interrupted prepare stopped, on SLURM through submitit (its local
executor here), read by the memmap source as one stream. Every input it cannot use is one message.
Nothing downloads: the Parquet files are made here, in FineWeb's columns."""

import errno
import json
import os
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import tiny_recipe

import lab.data.prepare as prepare_module
from benchmarks.prepare_parquet import fineweb_table
from lab.commands.cli import main
from lab.data.prepare import build_tokenizer
from lab.data.shards import ShardStream
from lab.runs.lock import RunLock

WORDS = "the a lab model token stream shard parquet row group web page text of to and in".split()


def fineweb_rows(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 60))) for _ in range(count)]


def fineweb_parquet(path, texts: list, row_group_size: int = 50, **options) -> list[str]:
    """A .parquet file in FineWeb-Edu's columns; returns its texts."""
    table = fineweb_table(texts)
    pq.write_table(table, path, row_group_size=row_group_size, **options)
    return texts


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """Three Parquet files of 120 rows each, in tmp_path/fineweb; the test runs in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "fineweb").mkdir()
    texts = []
    for i in range(3):
        texts += fineweb_parquet(tmp_path / "fineweb" / f"{i:03d}_00000.parquet", fineweb_rows(120, seed=i))
    return texts


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("gpt2")


def lab(capsys, *args):
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def stream(folder, split):
    m = manifest(folder)
    return np.concatenate([np.fromfile(folder / s["name"], dtype=m["dtype"]) for s in m["shards"][split]])


def documents(ids, eot):
    """Token ids -> the documents between end-of-text tokens (each document starts with one)."""
    cuts = [i for i, t in enumerate(ids) if t == eot] + [len(ids)]
    assert cuts[0] == 0
    return [ids[a + 1 : b] for a, b in zip(cuts, cuts[1:])]


# --- reading ------------------------------------------------------------------------------------


def test_a_parquet_file_prepares_like_the_same_documents_in_jsonl(corpus, tmp_path, capsys, gpt2):
    path = tmp_path / "fineweb" / "000_00000.parquet"
    with open(tmp_path / "same.jsonl", "w") as f:
        for text in corpus[:120]:
            f.write(json.dumps({"text": text}) + "\n")
    assert lab(capsys, "prepare", path, "--out", "a", "--workers", "1")[0] == 0
    assert lab(capsys, "prepare", "same.jsonl", "--out", "b", "--workers", "1")[0] == 0
    for split in ("train", "val"):
        assert (tmp_path / "a" / f"{split}.bin").read_bytes() == (
            tmp_path / "b" / f"{split}.bin"
        ).read_bytes()


def test_shards_hold_every_document_after_an_end_of_text_in_input_order(corpus, tmp_path, capsys, gpt2):
    status, out, _ = lab(
        capsys, "prepare", "fineweb", "--out", "s", "--shard-tokens", "700", "--workers", "1"
    )
    assert status == 0 and "manifest.json lists them" in out
    m = manifest(tmp_path / "s")
    assert m["format"] == "lab-shards-1" and m["tokenizer_fingerprint"] == gpt2.fingerprint()
    assert m["input"]["files"] == [str(tmp_path / "fineweb" / f"{i:03d}_00000.parquet") for i in range(3)]
    assert m["settings"]["shard_tokens"] == 700 and m["settings"]["text_field"] == "text"
    for split in ("train", "val"):
        for shard in m["shards"][split]:
            data = (tmp_path / "s" / shard["name"]).read_bytes()
            assert len(data) == 2 * shard["tokens"] <= 2 * 700
            assert shard["sha256"] == __import__("hashlib").sha256(data).hexdigest()
    train = documents(stream(tmp_path / "s", "train").tolist(), gpt2.eot_id)
    val = documents(stream(tmp_path / "s", "val").tolist(), gpt2.eot_id)
    assert len(train) + len(val) == len(corpus) == m["train_documents"] + m["val_documents"]
    assert 0 < len(val) < len(corpus) / 4
    decoded = {gpt2.decode(d) for d in train + val}
    assert decoded == set(corpus)
    # train's documents come in input order
    order = [corpus.index(gpt2.decode(d)) for d in train]
    assert order == sorted(order)


def test_val_tokens_are_the_first_documents_and_max_tokens_stops_exactly(corpus, tmp_path, capsys, gpt2):
    status, out, _ = lab(
        capsys,
        "prepare",
        "fineweb",
        "--out",
        "s",
        "--val-tokens",
        "300",
        "--max-tokens",
        "2500",
        "--workers",
        "1",
    )
    assert status == 0
    m = manifest(tmp_path / "s")
    assert m["train_tokens"] + m["val_tokens"] == 2500
    val = documents(stream(tmp_path / "s", "val").tolist(), gpt2.eot_id)
    assert [gpt2.decode(d) for d in val] == corpus[: len(val)]
    assert 300 <= m["val_tokens"] < 300 + 62  # whole documents, the last one crossing 300
    assert len(m["shards"]["train"]) == 1  # the first file held enough: the others were not read


def test_min_chars_drops_and_counts_short_documents(corpus, tmp_path, capsys):
    status, out, _ = lab(
        capsys, "prepare", "fineweb", "--out", "s", "--min-chars", "100", "--shard-tokens", "1M"
    )
    short = sum(len(t) < 100 for t in corpus)
    assert status == 0 and f"{short} documents shorter than --min-chars dropped" in out
    m = manifest(tmp_path / "s")
    assert m["dropped_short"] == short and m["train_documents"] + m["val_documents"] == len(corpus) - short


def test_text_field_names_another_column(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"content": fineweb_rows(40)}), "c.parquet")
    assert lab(capsys, "prepare", "c.parquet", "--out", "o", "--text-field", "content")[0] == 0


# --- resuming, and the disk filling up ------------------------------------------------------------


def test_an_interrupted_prepare_continues_from_the_parts_written(corpus, tmp_path, capsys, monkeypatch):
    args = ["prepare", "fineweb", "--shard-tokens", "500", "--workers", "1"]
    assert lab(capsys, *args, "--out", "clean")[0] == 0
    real = prepare_module.tokenize_item
    calls = {"n": 0}

    def interrupted(item, tokenizer):
        calls["n"] += 1
        if calls["n"] == 2:  # one work item per part here: the second part
            raise KeyboardInterrupt
        return real(item, tokenizer)

    monkeypatch.setattr(prepare_module, "tokenize_item", interrupted)
    assert lab(capsys, *args, "--out", "s")[0] == 130
    assert sorted(p.name for p in (tmp_path / "s" / "parts").iterdir()) == ["00000.json", "settings.json"]
    assert not list((tmp_path / "s").glob(".*.tmp")) and not (tmp_path / "s" / "manifest.json").exists()
    monkeypatch.setattr(prepare_module, "tokenize_item", real)
    calls["n"] = 0
    assert lab(capsys, *args, "--out", "s")[0] == 0

    def shards(folder):
        return [(s["name"], s["sha256"]) for sp in ("train", "val") for s in manifest(folder)["shards"][sp]]  # noqa: E731

    assert shards(tmp_path / "s") == shards(tmp_path / "clean")


def test_a_full_disk_mid_shard_removes_that_part_and_the_same_command_continues(
    corpus, tmp_path, capsys, monkeypatch
):
    args = ["prepare", "fineweb", "--shard-tokens", "500", "--workers", "1", "--out", "s"]
    real_write = prepare_module.TokenWriter.write
    writes = {"n": 0}

    def write(self, ids):
        writes["n"] += 1
        if writes["n"] == 160:  # part way through the second part, inside a shard: half of it lands
            ids[: len(ids) // 2].tofile(self.file)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, ids)

    monkeypatch.setattr(prepare_module.TokenWriter, "write", write)
    status, out, err = lab(capsys, *args)
    assert status == 2 and "Traceback" not in err
    assert (
        "the disk is full" in err
        and "run the same command: it continues from the shards already written" in err
    )
    folder = tmp_path / "s"
    assert not list(folder.glob(".*.tmp"))  # no half-written shard
    assert sorted(p.name for p in (folder / "parts").iterdir()) == ["00000.json", "settings.json"]
    assert {p.name.split("-")[1] for p in folder.glob("*.bin")} == {"00000"}
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert lab(capsys, *args)[0] == 0
    assert (
        lab(capsys, "prepare", "fineweb", "--shard-tokens", "500", "--workers", "1", "--out", "clean")[0] == 0
    )
    assert manifest(folder)["shards"] == {
        split: [
            {**s, "mtime_ns": manifest(folder)["shards"][split][i]["mtime_ns"]} for i, s in enumerate(shards)
        ]
        for split, shards in manifest(tmp_path / "clean")["shards"].items()
    }


def test_a_rerun_with_other_settings_is_refused(corpus, tmp_path, capsys):
    assert lab(capsys, "prepare", "fineweb", "--out", "s", "--shard-tokens", "500")[0] == 0
    status, _, err = lab(capsys, "prepare", "fineweb", "--out", "s", "--shard-tokens", "600")
    assert status == 2 and "holds parts prepared with other settings (shard_tokens differ)" in err


def test_two_prepares_into_one_folder_at_once_the_second_refuses(corpus, tmp_path, capsys):
    for extra in ([], ["--shard-tokens", "500"]):
        with RunLock(tmp_path / "s", "lab prepare fineweb --out s"):  # as a prepare in progress holds it
            status, _, err = lab(capsys, "prepare", "fineweb", "--out", "s", *extra)
        assert status == 2 and "Traceback" not in err
        assert "s is in use by process" in err and "Two lab prepare writing one folder" in err
        assert "another --out folder" in err
        assert not (tmp_path / "s" / "manifest.json").exists() and not (tmp_path / "s" / "meta.json").exists()


# --- bad input ----------------------------------------------------------------------------------


def test_a_parquet_file_without_the_text_column_lists_its_columns(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), "a.parquet")
    status, _, err = lab(capsys, "prepare", "a.parquet", "--out", "o")
    assert status == 2 and "Traceback" not in err
    assert (
        "a.parquet has no column 'text' (its columns: body, id); name the text column with --text-field"
        in err
    )


def test_a_column_that_is_not_text_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"text": [1, 2, 3]}), "a.parquet")
    status, _, err = lab(capsys, "prepare", "a.parquet", "--out", "o", "--shard-tokens", "100")
    assert status == 2 and "column 'text' holds int64, not text" in err
    assert not list((tmp_path / "o").glob("*.bin")) if (tmp_path / "o").exists() else True


def damage_row_group(path, group: int) -> None:
    """Overwrite the middle of a row group's text column chunk with zeros."""
    meta = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 20 : start + meta.total_compressed_size - 20] = bytes(meta.total_compressed_size - 40)
    path.write_bytes(bytes(data))


def test_a_corrupt_row_group_is_named_and_refused_or_skipped(corpus, tmp_path, capsys):
    path = tmp_path / "fineweb" / "001_00000.parquet"
    fineweb_parquet(path, fineweb_rows(120, seed=1), compression="zstd")
    damage_row_group(path, 1)
    status, _, err = lab(
        capsys, "prepare", "fineweb", "--out", "s", "--shard-tokens", "500", "--workers", "1"
    )
    assert status == 2 and "Traceback" not in err
    assert f"{path} row group 1 cannot be read" in err and "--on-bad-input skip" in err
    assert not list((tmp_path / "s").glob(".*.tmp"))
    assert not list((tmp_path / "s").glob("*-00001-*.bin"))  # nothing of the damaged part's shards
    status, out, err = lab(
        capsys, "prepare", "fineweb", "--out", "skipped", "--shard-tokens", "500", "--on-bad-input", "skip"
    )
    assert status == 0 and f"warning: skipping {path} row group 1" in err
    assert "1 unreadable file(s) or row group(s) skipped" in out
    m = manifest(tmp_path / "skipped")
    assert len(m["skipped"]) == 1 and m["skipped"][0].startswith(f"{path} row group 1: ")
    assert m["train_documents"] + m["val_documents"] == len(corpus) - 50


def test_a_file_that_is_not_parquet_is_named(corpus, tmp_path, capsys):
    (tmp_path / "fineweb" / "002_00000.parquet").write_bytes(b"PAR1 not really")
    status, _, err = lab(capsys, "prepare", "fineweb", "--out", "s")
    assert status == 2 and "fineweb/002_00000.parquet cannot be read (not a readable Parquet file: " in err
    status, _, err = lab(capsys, "prepare", "fineweb", "--out", "s2", "--on-bad-input", "skip")
    assert status == 0 and "warning: skipping" in err


def test_without_pyarrow_one_line_says_what_to_install(corpus, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    status, _, err = lab(capsys, "prepare", "fineweb", "--out", "s")
    assert status == 2 and err == "error: reading .parquet files needs pyarrow: pip install 'lab[corpora]'\n"


# --- Hugging Face datasets ------------------------------------------------------------------------


def test_a_saved_dataset_prepares_into_one_part_per_arrow_file(corpus, tmp_path, capsys, gpt2):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": corpus, "id": list(range(len(corpus)))}).save_to_disk(
        tmp_path / "saved", num_shards=3
    )
    assert lab(capsys, "prepare", "fineweb", "--out", "from-files", "--shard-tokens", "500")[0] == 0
    assert (
        lab(capsys, "prepare", "--dataset", "saved", "--out", "from-dataset", "--shard-tokens", "500")[0] == 0
    )
    m = manifest(tmp_path / "from-dataset")
    assert len(list((tmp_path / "from-dataset" / "parts").glob("0*.json"))) == 3
    assert m["input"] == {"dataset": {"name": str(tmp_path / "saved"), "subset": None, "split": "train"}}
    for split in ("train", "val"):  # the same rows in the same order: the same tokens
        assert np.array_equal(
            stream(tmp_path / "from-dataset", split), stream(tmp_path / "from-files", split)
        )


def test_a_dataset_not_in_the_offline_cache_says_how_to_download_it(tmp_path):
    pytest.importorskip("datasets")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lab", "prepare", "--dataset", "HuggingFaceFW/fineweb-edu"]
    done = subprocess.run(
        [*command, "--subset", "sample-10BT", "--out", "o"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in done.stderr
    assert (
        "HF_HUB_OFFLINE=0 lab prepare --dataset HuggingFaceFW/fineweb-edu --subset sample-10BT" in done.stderr
    )


# --- SLURM ------------------------------------------------------------------------------------------


def test_dry_run_prints_one_command_per_task_and_the_last_step(corpus, tmp_path, capsys):
    status, out, _ = lab(
        capsys, "prepare", "fineweb", "--out", "s", "--shard-tokens", "500", "--tasks", "2", "--dry-run"
    )
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("# task 0/2: 2 part(s): ") and "000_00000.parquet" in lines[0]
    assert lines[1].endswith("--task 0/2") and lines[1].startswith("lab prepare ")
    assert (
        lines[3].endswith("--task 1/2") and lines[-2] == "# then, when every task has finished, the manifest:"
    )
    assert not (tmp_path / "s").exists()  # nothing tokenized
    for line in (lines[1], lines[3]):  # what a queue would run
        assert main(__import__("shlex").split(line)[1:]) == 0
    assert main(__import__("shlex").split(lines[-1])[1:]) == 0
    assert manifest(tmp_path / "s")["train_tokens"] > 0


def test_slurm_through_submitits_local_executor_writes_the_same_shards(corpus, tmp_path, capsys):
    pytest.importorskip("submitit")
    args = ["prepare", "fineweb", "--shard-tokens", "500", "--workers", "1"]
    assert lab(capsys, *args, "--out", "local")[0] == 0
    status, out, err = lab(capsys, *args, "--out", "slurm", "--slurm", "--slurm-cluster", "local")
    assert status == 0, err
    assert "submitted 3 task(s) tokenizing slurm as job array" in out and "manifest.json lists them" in out
    strip = lambda m: {s: [(x["name"], x["sha256"]) for x in m["shards"][s]] for s in m["shards"]}  # noqa: E731
    assert strip(manifest(tmp_path / "slurm")) == strip(manifest(tmp_path / "local"))


# --- reading shards ---------------------------------------------------------------------------------


def test_a_shard_stream_reads_across_shard_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 1000, size=n).astype(np.uint16) for n in (7, 1, 13, 5)]
    for i, piece in enumerate(pieces):
        piece.tofile(tmp_path / f"{i}.bin")
    stream_ = ShardStream(
        [(tmp_path / f"{i}.bin", len(p)) for i, p in enumerate(pieces)], np.dtype(np.uint16)
    )
    whole = np.concatenate(pieces)
    assert len(stream_) == len(whole)
    for a in range(len(whole)):
        for b in range(a + 1, len(whole) + 1):
            assert np.array_equal(stream_[a:b], whole[a:b])


RECIPE = tiny_recipe(
    "shards",
    """
[schedule]
name = "cosine"
warmup_steps = 2

[train]
batch_size = 2
max_steps = 6
eval_interval = 3
eval_batches = 1
log_interval = 1
checkpoint_interval = 3
out_dir = "{out}"
device = "cpu"

[generate]
num_samples = 1
max_new_tokens = 4
""",
)


def test_training_on_shards_resumes_exactly_and_a_changed_shard_is_named(corpus, tmp_path, capsys):
    assert (
        lab(capsys, "prepare", "fineweb", "--out", "data", "--shard-tokens", "300", "--workers", "1")[0] == 0
    )
    (tmp_path / "r.toml").write_text(RECIPE.format(data="data", out="straight"))
    status, out, err = lab(capsys, "run", "r.toml")
    assert status == 0, err
    (tmp_path / "r.toml").write_text(RECIPE.format(data="data", out="resumed"))
    assert lab(capsys, "run", "r.toml", "--set", "train.max_steps=3")[0] == 0
    assert lab(capsys, "run", "r.toml")[0] == 0

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    assert losses("straight") == losses("resumed") and len(losses("straight")) == 6
    name = "data/" + manifest(tmp_path / "data")["shards"]["train"][1]["name"]
    shard = tmp_path / name
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    status, _, err = lab(capsys, "run", "r.toml", "--set", "train.out_dir=again")
    # The recipe's data path resolves against the recipe's folder: the message names the shard in full.
    assert status == 2 and f"shard {shard} was changed after lab prepare wrote it" in err
    shard.unlink()
    status, _, err = lab(capsys, "run", "r.toml", "--set", "train.out_dir=again")
    assert status == 2 and f"shard {shard} is missing" in err and "Traceback" not in err


def test_the_jsonl_source_streams_parquet_and_resumes_exactly(corpus, tmp_path, capsys):
    recipe = RECIPE.replace(
        'name = "memmap"\npath = "{data}"', 'name = "jsonl"\npath = "fineweb"\nval_fraction = 0.1'
    )
    (tmp_path / "r.toml").write_text(recipe.format(out="straight"))
    assert lab(capsys, "run", "r.toml")[0] == 0
    (tmp_path / "r.toml").write_text(recipe.format(out="resumed"))
    assert lab(capsys, "run", "r.toml", "--set", "train.max_steps=3")[0] == 0
    assert lab(capsys, "run", "r.toml")[0] == 0
    read = lambda run: (tmp_path / run / "metrics.jsonl").read_text().count('"loss"')  # noqa: E731
    assert read("straight") == read("resumed") == 6
    rows = lambda run: [  # noqa: E731
        (r["step"], r["loss"])
        for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert rows("straight") == rows("resumed")


def test_eval_text_and_tokenizer_train_read_parquet_and_shards(corpus, tmp_path, capsys, gpt2):
    from lab.data.eval_sets import read_token_sequences

    seqs = read_token_sequences(tmp_path / "fineweb" / "000_00000.parquet", gpt2)
    assert [gpt2.decode(s[1:]) for s in seqs] == corpus[:120]
    assert lab(capsys, "prepare", "fineweb", "--out", "s", "--val-tokens", "300")[0] == 0
    assert read_token_sequences(tmp_path / "s", gpt2) == [
        stream(tmp_path / "s", "val").astype(np.int64).tolist()
    ]
    pytest.importorskip("tokenizers")
    assert lab(capsys, "tokenizer", "train", "fineweb", "--char", "--out", "tok", "--min-chars", "50")[0] == 0
    chars = json.loads((tmp_path / "tok" / "vocab.json").read_text())["chars"]
    assert set(chars) == set("".join(t for t in corpus if len(t) >= 50))


# --- the FineWeb recipes ------------------------------------------------------------------------------

SMALL = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "train.batch_size=2",
    "train.grad_accum=1",
    "train.max_steps=2",
    "train.eval_interval=2",
    "train.eval_batches=1",
    "train.checkpoint_interval=2",
    "train.compile=false",
    "train.precision=fp32",
    "train.device=cpu",
    "schedule.warmup_steps=1",
    "generate.max_new_tokens=4",
    "generate.num_samples=1",
]


@pytest.mark.parametrize("recipe", ["gpt2_124m_fineweb", "modern_124m_fineweb"])
def test_the_fineweb_recipes_resolve_and_train_on_a_fineweb_shaped_fixture(corpus, tmp_path, capsys, recipe):
    """The recipe's own preparation command, with the fixture in place of the download."""
    path = os.path.join(os.path.dirname(__file__), "..", "recipes", f"{recipe}.toml")
    header = open(path).read()
    assert (
        "lab prepare --dataset HuggingFaceFW/fineweb-edu --subset sample-10BT --out data/fineweb-edu10B"
        in header
    )
    assert "--shard-tokens 100M --val-tokens 10485760" in header
    status, out, err = lab(capsys, "recipe", path)
    assert status == 0, err
    # Relative to the recipe file: the folder `lab prepare --out data/fineweb-edu10B` writes from the clone.
    repo = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
    assert f'path = "{os.path.join(repo, "data", "fineweb-edu10B")}"' in out
    assert (
        lab(
            capsys,
            "prepare",
            "fineweb",
            "--out",
            "data/fineweb-edu10B",
            "--shard-tokens",
            "100M",
            "--val-tokens",
            "1000",
        )[0]
        == 0
    )
    sets = [a for s in [*SMALL, f"train.out_dir={tmp_path / 'run'}"] for a in ("--set", s)]
    # As in a clone: recipes/ beside data/, the recipe's ../data/fineweb-edu10B is what prepare wrote.
    (tmp_path / "recipes").mkdir(exist_ok=True)
    local = tmp_path / "recipes" / f"{recipe}.toml"
    local.write_text(header)
    status, out, err = lab(capsys, "run", str(local), *sets)
    assert status == 0, err
    assert '"val_loss"' in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_slurm_submits_one_array_and_a_last_job_that_waits_for_it(corpus, tmp_path, capsys, monkeypatch):
    """No cluster here: a stand-in sbatch keeps what submitit submits and answers as SLURM does."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\ncat "$1" >> {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    status, out, err = lab(
        capsys,
        "prepare",
        "fineweb",
        "--out",
        "s",
        "--slurm",
        "--tasks",
        "2",
        "--slurm-opt",
        "slurm_partition=cpu",
    )
    assert status == 0, err
    assert "submitted 2 task(s) tokenizing s as job array 4242 (slurm)" in out
    assert "writes s/manifest.json when they have all succeeded" in out
    script = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --partition=cpu" in script
    assert "#SBATCH --dependency=afterok:4242" in script  # the last step runs after every task
    status, _, err = lab(capsys, "prepare", "fineweb", "--out", "s2", "--slurm", "--max-tokens", "1000")
    assert status == 2 and "--max-tokens stops a prepare after N tokens in input order" in err


def test_slurm_tasks_tokenizing_on_two_processes_each(corpus, tmp_path, capsys):
    """A task's worker processes end normally under submitit, whose signal handlers they inherit."""
    pytest.importorskip("submitit")
    status, out, err = lab(
        capsys,
        "prepare",
        "fineweb",
        "--shard-tokens",
        "500",
        "--workers",
        "2",
        "--out",
        "s",
        "--slurm-cluster",
        "local",
    )
    assert status == 0, err
    assert manifest(tmp_path / "s")["train_documents"] + manifest(tmp_path / "s")["val_documents"] == len(
        corpus
    )
