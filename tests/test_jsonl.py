"""The jsonl data source: documents streamed from .jsonl and .txt files, tokenized as they are read,
shared out between processes, resuming exactly where it stopped; and bad input is one message.
The end-to-end resumes (Ctrl-C, SIGTERM, SIGKILL; one and two processes) are in test_jsonl_resume.py."""

import copy
import json
from pathlib import Path

import pytest
import torch

from lab.commands.cli import main
from lab.errors import LabError
from lab.interfaces import DataContext, Tokenizer
from lab.plugins import registry
from lab.testing import build, cases
from lab_jsonl import stream

BLOCK = 8
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "jsonl_small.toml"


class Bytes(Tokenizer):
    """One id per byte and 256 for end-of-text: every token of a window can be read back."""

    name, vocab_size, eot_id = "bytes", 257, 256

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode()


def source(rank=0, world=1, tokenizer=Bytes(), **settings):
    context = DataContext(
        block_size=BLOCK,
        vocab_size=tokenizer.vocab_size,
        tokenizer=tokenizer,
        seed=0,
        rank=rank,
        world_size=world,
        rows_per_step=2 * world,
    )
    return build(registry().get("data", "jsonl"), context, **settings)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def text_of(ids) -> str:
    return "".join("|" if i == 256 else chr(i) for i in ids)


def stream_text(data, rows=40):
    """The text of `rows` train rows as the stream hands them out (a row's last token is the next one's first)."""
    x, y = data.batch("train", 0, range(rows))
    return text_of(torch.cat([x[0, :1], *y]).tolist())


def val_text(data):
    """The whole val split's text, read to its end."""
    ids = []
    while (window := data.val.window()) is not None:
        ids += window[:BLOCK].tolist()
    return text_of(ids + data.val.buffer.tolist())


DOCS = [f"doc{i:02d} " + "abc" * (i % 3) for i in range(30)]


def test_the_stream_is_the_documents_in_order_with_eot_before_each(tmp_path):
    data = source(
        path=write_jsonl(tmp_path / "a.jsonl", DOCS), val_path=write_jsonl(tmp_path / "v.jsonl", ["v"])
    )
    assert stream_text(data) == ("".join(f"|{d}" for d in DOCS) * 2)[: 40 * BLOCK + 1]  # then over again


def test_blank_lines_are_skipped_and_text_files_are_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n   \n{"text": "two"}\n')
    (tmp_path / "b.txt").write_text("a text file\nof two lines\n")
    data = source(
        path=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], val_path=str(tmp_path / "a.jsonl")
    )
    assert stream_text(data, rows=6).startswith("|one|two|a text file\nof two lines\n|one|two|")


def test_a_folder_is_searched_for_jsonl_and_txt_files_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "2.txt").write_text("second")
    write_jsonl(tmp_path / "1.jsonl", ["first"])
    (tmp_path / "notes.md").write_text("not read")
    data = source(path=str(tmp_path), val_path=str(tmp_path / "1.jsonl"))
    assert stream_text(data, rows=3).startswith("|first|second|first")


def test_a_big_text_file_is_read_in_pieces_tokenized_as_the_whole(tmp_path, monkeypatch):
    """Pieces are cut where GPT-2's BPE splits anyway, and a piece that continues the one before
    gets no end-of-text: the ids are those of the whole file."""
    monkeypatch.setattr(stream, "PIECE_BYTES", 64)
    pieces = []
    read_piece = stream.Reader.next_piece
    monkeypatch.setattr(
        stream.Reader, "next_piece", lambda self: pieces.append(read_piece(self)) or pieces[-1]
    )
    text = "".join(f"Line {i}: some words, naïve café\n" for i in range(200))
    (tmp_path / "big.txt").write_text(text)
    gpt2 = build(registry().get("tokenizer", "gpt2"))
    data = source(tokenizer=gpt2, path=str(tmp_path / "big.txt"), val_path=str(tmp_path / "big.txt"))
    whole = [gpt2.eot_id] + gpt2.encode(text)
    rows = (len(whole) - 1) // BLOCK
    x, y = data.batch("train", 0, range(rows))
    assert len([p for p in pieces if p]) > 10  # read in pieces
    assert torch.cat([x[0, :1], *y]).tolist() == whole[: 1 + rows * BLOCK]


@pytest.mark.parametrize("world", [2, 3])
def test_processes_share_out_the_documents(tmp_path, world):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)  # 30: every process gets the same share each pass
    seen = []
    for rank in range(world):  # 40 rows: more than a process's share of the documents
        text = stream_text(source(rank, world, path=path, val_path=path))
        seen.append(set(text.split("|")[1:-1]))
    assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    assert set.union(*seen) == set(DOCS) and all(len(docs) == 30 // world for docs in seen)


def test_val_fraction_holds_out_documents_by_a_hash(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    train = set(stream_text(source(path=path, val_fraction=0.3)).split("|")[1:-1])
    val = set(val_text(source(path=path, val_fraction=0.3)).split("|")[1:])
    assert 0 < len(val) < 20 and val.isdisjoint(train) and val | train == set(DOCS)
    assert val == set(val_text(source(path=path, val_fraction=0.3)).split("|")[1:])  # the same every time


def test_val_batches_are_the_same_whenever_and_whoever_asks(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    a, b = source(0, 2, path=path), source(1, 2, path=path)
    first = a.batch("val", 1, range(2))
    a.batch("train", 0, range(5))
    for again in (a.batch("val", 1, range(2)), b.batch("val", 1, range(2))):
        assert all(torch.equal(u, v) for u, v in zip(first, again))
    many = a.batch("val", 50, range(2))  # past the end of the val split: its windows repeat
    assert many[0].shape == (2, BLOCK)


@pytest.mark.parametrize("world", [1, 2])
def test_a_source_loaded_from_its_state_gives_the_next_batches_across_epochs(tmp_path, monkeypatch, world):
    monkeypatch.setattr(stream, "PIECE_BYTES", 64)
    path = [write_jsonl(tmp_path / "a.jsonl", DOCS), str(tmp_path / "b.txt")]
    (tmp_path / "b.txt").write_text("".join(f"line {i} of a text file\n" for i in range(10)))
    for rank in range(world):
        data = source(rank, world, path=path)
        states, batches = [], []
        for step in range(40):  # several passes over the files
            states.append(copy.deepcopy(data.state_dict()))
            batches.append(data.batch("train", step, range(3)))
        assert data.train.epoch >= 1
        for step in (0, 7, 23, 39):
            resumed = source(rank, world, path=path)
            resumed.load_state_dict(states[step])
            for later in range(step, min(step + 3, 40)):
                assert all(
                    torch.equal(u, v) for u, v in zip(resumed.batch("train", later, range(3)), batches[later])
                )


def test_the_jsonl_source_passes_lab_testing():
    """With its defaults it streams the sample that ships with it."""
    found = cases("data", "jsonl")
    assert {str(c).rsplit("-", 1)[-1] for c in found} >= {
        "data_batches",
        "data_resume",
        "data_processes_share",
    }
    for case in found:
        case()


def test_a_source_refuses_files_that_changed_since_the_checkpoint(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", DOCS)
    data = source(path=path)
    data.batch("train", 0, range(3))
    state = data.state_dict()
    write_jsonl(tmp_path / "a.jsonl", DOCS[:3])
    with pytest.raises(
        LabError, match="a.jsonl is .* bytes, .* when the checkpoint was saved: the data changed"
    ):
        source(path=path).load_state_dict(state)


# --- bad input: one message naming the file and the line ---------------------------------------


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"text": "fine"}', "{not json"],
            r"a.jsonl line 2 is not valid JSON \(.*\); each line of a .jsonl file",
        ),
        (['{"text": "fine"}', '{"body": "x"}'], r"a.jsonl line 2 has no \"text\" string"),
        (['["text"]'], r"a.jsonl line 1 has no \"text\" string"),
    ],
)
def test_a_bad_line_is_named_by_file_and_line(tmp_path, lines, message):
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    data = source(path=str(tmp_path / "a.jsonl"), val_path=write_jsonl(tmp_path / "v.jsonl", ["v"]))
    with pytest.raises(LabError, match=message):
        data.batch("train", 0, range(4))


def test_text_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9\n")
    data = source(path=str(tmp_path / "a.txt"), val_path=str(tmp_path / "a.txt"))
    with pytest.raises(LabError, match="a.txt is not UTF-8 text"):
        data.batch("train", 0, range(1))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"path": "nowhere.jsonl"}, r"\[data\] path: nowhere.jsonl not found"),
        ({"path": "."}, r"\[data\] path: folder . holds no .txt or .jsonl files"),
        ({"val_fraction": 0.0}, r"val_fraction = 0 and no val_path"),
    ],
)
def test_settings_that_cannot_work_are_refused_when_built(tmp_path, monkeypatch, settings, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LabError, match=message):
        source(**settings)


def test_no_text_for_a_process_or_for_val_says_what_to_do(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["only one document"])
    with pytest.raises(LabError, match="no training text in .*a.jsonl for process 1 of 2"):
        source(1, 2, path=path, val_path=path).batch("train", 0, range(1))
    with pytest.raises(LabError, match=r"no validation text: \[data\] val_fraction 0.01 of .*a.jsonl"):
        source(path=path, val_fraction=0.01).batch("val", 0, range(1))


def test_a_bad_line_stops_lab_run_with_one_message(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    args = [
        "run",
        str(RECIPE),
        "--set",
        f"data.path={tmp_path / 'a.jsonl'}",
        "--set",
        f"data.val_path={tmp_path / 'a.jsonl'}",
        "--set",
        f"train.out_dir={tmp_path / 'run'}",
        "--set",
        "train.device=cpu",
        "--set",
        "model.n_layer=1",
        "--set",
        "model.block_size=16",
        "--set",
        "generate.max_new_tokens=4",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert 'a.jsonl line 2 has no "text" string' in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
