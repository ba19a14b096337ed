"""Tokenizers a user makes: `lab tokenizer train` (byte-level BPE with Hugging Face tokenizers, or a
character list), the `bpe` and `char` components, vocab_size = "auto", and runs that carry their
tokenizer so they generate, export and resume after the original file has moved."""

import json
import shutil

import pytest
import torch
from tiny import tiny_recipe

import lab.runs
from lab.commands.cli import main
from lab.errors import LabError
from lab.interfaces import DataContext
from lab.recipe import load_recipe
from lab_memmap.embedded import CORPUS
from lab_tokenizers.bpe import BPEConfig, BPETokenizer
from lab_tokenizers.char import CharConfig, CharTokenizer

tokenizers = pytest.importorskip("tokenizers")
TEXT = CORPUS.read_text()[:200_000]  # enough for a 512-token vocabulary, quick to train on


def run_lab(capsys, *args):
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *parts):
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def trained(corpus):
    """A 512-token BPE trained on the corpus: its tokenizer.json."""
    assert (
        main(["tokenizer", "train", str(corpus), "--vocab-size", "512", "--out", str(corpus.parent / "bpe")])
        == 0
    )
    return corpus.parent / "bpe" / "tokenizer.json"


def test_trained_bpe_loads_in_tokenizers_and_transformers_with_the_same_ids(trained):
    transformers = pytest.importorskip("transformers")
    ours = BPETokenizer(BPEConfig(path=str(trained)))
    text = "ROMEO: Wherefore art thou, naïve café 日本語?\n\n  It's 2024."
    ids = ours.encode(text)
    assert ours.vocab_size == 512 and ours.decode(ids) == text  # bytes underneath: any text round-trips
    assert tokenizers.Tokenizer.from_file(str(trained)).encode(text).ids == ids
    assert transformers.PreTrainedTokenizerFast(tokenizer_file=str(trained)).encode(text) == ids
    assert ours.decode([ours.eot_id]) == "<|endoftext|>"
    assert ours.eot_id not in ours.encode("a <|endoftext|> in the text is text")  # data cannot forge it


def test_training_is_deterministic_and_reads_folders_and_jsonl(tmp_path, corpus, trained, capsys):
    again = run_lab(capsys, "tokenizer", "train", corpus, "--vocab-size", 512, "--out", tmp_path / "again")
    assert again[0] == 0 and 'name = "bpe"' in again[2]
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == trained.read_bytes()

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("to be or not to be\n" * 50)
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "that is the question\n" * 50}) + "\n")
    status, _, _ = run_lab(
        capsys,
        "tokenizer",
        "train",
        tmp_path / "docs",
        tmp_path / "more.jsonl",
        "--vocab-size",
        300,
        "--out",
        tmp_path / "mixed",
    )
    tok = BPETokenizer(BPEConfig(path=str(tmp_path / "mixed")))  # a folder holding tokenizer.json will do
    assert status == 0 and len(tok.encode(" question")) == 1 and len(tok.encode(" not")) == 1


def test_char_vocabulary_is_the_characters_of_the_text(tmp_path, corpus, capsys):
    assert run_lab(capsys, "tokenizer", "train", corpus, "--char", "--out", tmp_path)[0] == 0
    tok = CharTokenizer(CharConfig(vocab=str(tmp_path / "vocab.json")))
    assert tok.chars == sorted(set(TEXT)) and tok.eot_id is None
    assert tok.decode(tok.encode("First Citizen:\n")) == "First Citizen:\n"


def bpe_recipe(tmp_path, path, vocab='vocab_size = "auto"\nvocab_multiple = 64\n', out="run", data="data"):
    """The tiny training recipe with the bpe tokenizer at `path`, 2 steps, writing into tmp_path/run."""
    text = tiny_recipe(
        "t",
        """
[schedule]
name = "cosine"
warmup_steps = 2
[train]
batch_size = 2
max_steps = {steps}
eval_interval = 2
eval_batches = 1
log_interval = 1
checkpoint_interval = 2
device = "cpu"
out_dir = "{out}"
[generate]
prompt = "ROMEO:"
num_samples = 1
max_new_tokens = 8
""",
        data=str(tmp_path / data),
        model_extra=vocab,
    ).replace('name = "gpt2"', f'name = "bpe"\npath = "{path}"')
    file = tmp_path / "recipe.toml"
    file.write_text(text.replace("{out}", str(tmp_path / out)).replace("{steps}", "2"))
    return file


def test_vocab_size_auto_follows_the_tokenizer_rounded_up(tmp_path, trained, capsys):
    recipe = bpe_recipe(tmp_path, trained, vocab='vocab_size = "auto"\nvocab_multiple = 100\n')
    assert load_recipe(recipe).model.vocab_size == 600  # 512 tokens, up to a multiple of 100
    status, out, _ = run_lab(capsys, "recipe", recipe, "--set", "model.vocab_multiple=1")
    assert status == 0 and "vocab_size = 512\n" in out


def test_a_run_carries_its_tokenizer(tmp_path, trained, corpus, capsys, monkeypatch):
    """Prepare with the recipe's tokenizer, train, move the tokenizer away: generate, export and resume
    still work from the copy the run folder keeps."""
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine" / "tokenizer.json"
    mine.parent.mkdir()
    shutil.copy(trained, mine)
    recipe = bpe_recipe(tmp_path, mine)

    assert run_lab(capsys, "prepare", corpus, "--out", tmp_path / "data", "--recipe", recipe)[0] == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    tok = BPETokenizer(BPEConfig(path=str(mine)))
    assert (meta["tokenizer"], meta["tokenizer_fingerprint"]) == ("bpe", tok.fingerprint())
    assert meta["tokenizer_files"] == {"path": str(mine)}
    assert (tmp_path / "data" / "tokenizer" / "tokenizer.json").read_bytes() == mine.read_bytes()

    assert run_lab(capsys, "run", recipe)[0] == 0
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_bytes() == mine.read_bytes()
    before = run_lab(capsys, "generate", tmp_path / "run", "--seed", 1)
    shutil.move(mine.parent, tmp_path / "moved")

    after = run_lab(capsys, "generate", tmp_path / "run", "--seed", 1)
    assert after[0] == 0 and after[1] == before[1] and after[1].count("ROMEO:") == 1

    recipe.write_text(recipe.read_text().replace("max_steps = 2", "max_steps = 4"))
    assert run_lab(capsys, "run", recipe)[0] == 0  # resumes from step 2 with the kept copy
    assert lab.runs.load(tmp_path / "run")[2].name == "step_0000004"

    transformers = pytest.importorskip("transformers")
    assert run_lab(capsys, "export-hf", tmp_path / "run", "--out", tmp_path / "hf")[0] == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _, model, _ = lab.runs.load(tmp_path / "run")
    ids = hf_tok("ROMEO: What say you?", return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode("ROMEO: What say you?") and hf_tok.eos_token == "<|endoftext|>"
    with torch.no_grad():
        logits = model(ids)[0]
        assert (hf(ids).logits - logits).abs().max().item() <= 1e-4 * logits.abs().max().item()


def test_resume_refuses_a_changed_tokenizer_file(tmp_path, trained, corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "tokenizer.json"
    shutil.copy(trained, mine)
    recipe = bpe_recipe(tmp_path, mine)
    assert run_lab(capsys, "prepare", corpus, "--out", tmp_path / "data", "--recipe", recipe)[0] == 0
    assert run_lab(capsys, "run", recipe)[0] == 0
    assert (
        run_lab(capsys, "tokenizer", "train", corpus, "--vocab-size", 400, "--out", tmp_path / "other")[0]
        == 0
    )
    shutil.copy(tmp_path / "other" / "tokenizer.json", mine)
    recipe.write_text(recipe.read_text().replace("max_steps = 2", "max_steps = 4"))
    status, _, err = run_lab(capsys, "run", recipe)
    assert_one_line_error(status, err, f"path = '{mine}' is not the tokenizer", "start a new run")


def test_char_recipe_prepares_trains_and_generates(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_lab(capsys, "tokenizer", "train", corpus, "--char", "--out", tmp_path / "chars")[0] == 0
    recipe = bpe_recipe(tmp_path, "", vocab='vocab_size = "auto"\n')
    recipe.write_text(
        recipe.read_text().replace(
            'name = "bpe"\npath = ""', f'name = "char"\nvocab = "{tmp_path / "chars" / "vocab.json"}"'
        )
    )
    assert load_recipe(recipe).model.vocab_size == len(set(TEXT))
    assert run_lab(capsys, "prepare", corpus, "--out", tmp_path / "data", "--recipe", recipe)[0] == 0
    assert run_lab(capsys, "run", recipe)[0] == 0
    status, out, _ = run_lab(capsys, "generate", tmp_path / "run", "--max-new-tokens", 20)
    assert status == 0 and out.count("ROMEO:") == 1


# Bad input: one message naming the file and the fix, exit status 2, no traceback ------------------


def test_vocab_size_below_the_byte_alphabet_is_refused(tmp_path, corpus, capsys):
    status, _, err = run_lab(
        capsys, "tokenizer", "train", corpus, "--vocab-size", 200, "--out", tmp_path / "t"
    )
    assert_one_line_error(status, err, "--vocab-size 200 is smaller than the 257 tokens", "give at least 257")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("flag", [["--vocab-size", "300"], ["--char"]])
def test_empty_corpus_is_refused(tmp_path, capsys, flag):
    (tmp_path / "empty.txt").write_text("")
    status, _, err = run_lab(
        capsys, "tokenizer", "train", tmp_path / "empty.txt", *flag, "--out", tmp_path / "t"
    )
    assert_one_line_error(status, err, f"no text in {tmp_path / 'empty.txt'}")
    assert not list((tmp_path / "t").glob("*.json"))


def test_training_never_overwrites_a_tokenizer(tmp_path, corpus, trained, capsys):
    status, _, err = run_lab(
        capsys, "tokenizer", "train", corpus, "--vocab-size", 300, "--out", trained.parent
    )
    assert_one_line_error(status, err, f"{trained} exists; choose another --out")


def test_tokenizer_json_that_does_not_parse_is_refused(tmp_path, corpus, capsys):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    recipe = bpe_recipe(tmp_path, tmp_path / "tokenizer.json")
    status, _, err = run_lab(capsys, "prepare", corpus, "--out", tmp_path / "data", "--recipe", recipe)
    assert_one_line_error(
        status, err, f"{tmp_path / 'tokenizer.json'} is not a tokenizer.json", "lab tokenizer train"
    )


def test_recipe_naming_a_missing_tokenizer_file_is_refused(tmp_path, capsys):
    recipe = bpe_recipe(tmp_path, tmp_path / "nowhere" / "tokenizer.json")
    status, _, err = run_lab(capsys, "recipe", recipe)
    assert_one_line_error(
        status,
        err,
        f"path = '{tmp_path / 'nowhere' / 'tokenizer.json'}': no such file",
        "lab tokenizer train",
    )


def test_data_prepared_with_another_tokenizer_is_refused(tmp_path, corpus, trained, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        run_lab(capsys, "tokenizer", "train", corpus, "--vocab-size", 400, "--out", tmp_path / "other")[0]
        == 0
    )
    recipe = bpe_recipe(tmp_path, tmp_path / "other" / "tokenizer.json")
    assert run_lab(capsys, "prepare", corpus, "--out", tmp_path / "data", "--recipe", recipe)[0] == 0
    recipe.write_text(recipe.read_text().replace(str(tmp_path / "other"), str(trained.parent)))
    status, _, err = run_lab(capsys, "run", recipe)
    assert_one_line_error(
        status,
        err,
        "made by another tokenizer",
        str(tmp_path / "other" / "tokenizer.json"),
        str(trained),
        "--recipe RECIPE",
    )
    assert not (tmp_path / "run").exists()


def test_char_tokenizer_meeting_an_unseen_character_is_refused(tmp_path, corpus, capsys):
    assert run_lab(capsys, "tokenizer", "train", corpus, "--char", "--out", tmp_path / "chars")[0] == 0
    (tmp_path / "new.txt").write_text("Hello, wörld\n")
    recipe = bpe_recipe(tmp_path, "", vocab='vocab_size = "auto"\n')
    recipe.write_text(
        recipe.read_text().replace(
            'name = "bpe"\npath = ""', f'name = "char"\nvocab = "{tmp_path / "chars" / "vocab.json"}"'
        )
    )
    status, _, err = run_lab(
        capsys, "prepare", tmp_path / "new.txt", "--out", tmp_path / "data", "--recipe", recipe
    )
    assert_one_line_error(
        status,
        err,
        "'ö' (U+00F6) is not in the char vocabulary",
        str(tmp_path / "chars" / "vocab.json"),
        "lab tokenizer train YOUR_TEXT --char",
    )


def test_a_tokenizer_with_settings_needs_a_recipe(tmp_path, corpus, capsys):
    status, _, err = run_lab(capsys, "prepare", corpus, "--out", tmp_path / "d", "--tokenizer", "bpe")
    assert_one_line_error(status, err, "tokenizer 'bpe' needs settings (path)", "--recipe RECIPE")
    assert run_lab(capsys, "prepare", corpus, "--out", tmp_path / "d")[0] == 0  # GPT-2's: needs none
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["tokenizer"] == "gpt2"


def test_shipped_tokenizers_are_the_documented_commands_output(tmp_path, capsys):
    """The tokenizers the shakespeare recipes use are what `lab tokenizer train` makes of the shipped
    corpus."""
    from lab_tokenizers import bpe, char

    assert run_lab(capsys, "tokenizer", "train", CORPUS, "--char", "--out", tmp_path / "c")[0] == 0
    assert (tmp_path / "c" / "vocab.json").read_bytes() == char.SHAKESPEARE.read_bytes()
    shipped = BPETokenizer(BPEConfig(path=str(bpe.SHAKESPEARE)))
    assert shipped.vocab_size == 4096 and shipped.decode(shipped.encode(TEXT[:5000])) == TEXT[:5000]


def test_data_source_refuses_tokens_of_another_vocabulary_directly(tmp_path, corpus, trained):
    """The same check without the CLI: the memmap source compares meta.json's fingerprint."""
    from lab.data.prepare import prepare
    from lab.plugins import registry

    other_dir = tmp_path / "other"
    from lab_tokenizer_train.train import train_bpe

    train_bpe([corpus], other_dir, 400, progress=False)
    prepare([corpus], tmp_path / "data", BPETokenizer(BPEConfig(path=str(other_dir))), progress=False)
    memmap = registry().get("data", "memmap")
    context = DataContext(
        block_size=8, vocab_size=512, tokenizer=BPETokenizer(BPEConfig(path=str(trained))), seed=0
    )
    with pytest.raises(LabError, match="made by another tokenizer"):
        memmap.factory(memmap.Config(path=str(tmp_path / "data")), context)
