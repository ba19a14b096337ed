"""What users and clients actually send (issue 30): a damaged metrics.jsonl, a vocabulary too large, a
`lab/` folder beside you, a busy port, folders where files belong, an imported model with few
positions, a huge --max-new-tokens, a plugin's own bug, shipped recipes run from anywhere, a number
where a string belongs. Each ends in one message or a warning, exit status 0 or 2, never a traceback.
(The API's part, the key checked first and numbers range-checked, is in test_api_fuzz.py.)"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from serving import make_run

import lab.plugins
from lab import hookimpl
from lab.commands.cli import main
from lab.errors import LabError
from lab.plugins import build_registry, registry
from lab.recipe import load_recipe
from lab.runs.metrics import MetricsLog, read_metrics

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def lab_(capsys, *args) -> tuple[int, str]:
    status = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return status, err


def one_error(status, err, *parts):
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for part in parts:
        assert part in err, err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("robust") / "run")


# 1. A damaged metrics.jsonl


STEP_7 = json.dumps(
    {"step": 7, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0, "mfu": 0.0}
).encode()


def damaged_copy(run, tmp_path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(run, copy)
    with open(copy / "metrics.jsonl", "ab") as f:
        f.write(
            STEP_7 + b"\n\xff\xfe\x00 not UTF-8\n" + STEP_7[:20]
        )  # and a torn last line  # and a torn last line
    return copy


def test_damaged_metrics_lines_are_skipped_with_one_warning(run, tmp_path, capsys):
    copy = damaged_copy(run, tmp_path)
    records = read_metrics(copy / "metrics.jsonl")
    assert records[-1] == json.loads(STEP_7)
    err = capsys.readouterr().err
    lines = len((run / "metrics.jsonl").read_bytes().splitlines())
    assert err.count("warning:") == 1 and str(copy / "metrics.jsonl") in err and f"line {lines + 2}" in err, (
        err
    )


def test_a_resume_keeps_the_damaged_file_beside_the_new_one(run, tmp_path, capsys):
    copy = damaged_copy(run, tmp_path)
    before = (copy / "metrics.jsonl").read_bytes()
    log = MetricsLog(copy, keep_through=7)
    log.close()
    assert (copy / "metrics.jsonl.damaged").read_bytes() == before  # nothing the run wrote is lost
    assert b"\xff" not in (copy / "metrics.jsonl").read_bytes()
    assert "metrics.jsonl.damaged" in capsys.readouterr().err


def test_compare_reads_a_damaged_run(run, tmp_path, capsys):
    status, err = lab_(capsys, "compare", damaged_copy(run, tmp_path), "-o", tmp_path / "c.png")
    assert status == 0 and "warning:" in err


# 4. A vocabulary the text cannot fill


def test_a_huge_vocabulary_is_refused_before_training_and_leaves_no_folder(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    (tmp_path / "t.txt").write_text("hello world " * 50)
    status, err = lab_(
        capsys, "tokenizer", "train", tmp_path / "t.txt", "--vocab-size", 10**9, "--out", tmp_path / "tk"
    )
    one_error(status, err, "--vocab-size 1000000000", "at most")
    assert not (tmp_path / "tk").exists()


# 5. A folder named lab where lab runs


def test_sweep_children_run_the_installed_lab_beside_a_clone(tmp_path):
    from lab_compare.child import lab_argv

    (tmp_path / "lab" / "plugins").mkdir(parents=True)  # a clone of lab, seen from its parent folder
    shadowed = subprocess.run([sys.executable, "-m", "lab", "plugins"], cwd=tmp_path, capture_output=True)
    assert shadowed.returncode != 0  # what `python -m lab` did
    child = subprocess.run(lab_argv("plugins"), cwd=tmp_path, capture_output=True, text=True)
    assert child.returncode == 0 and "attention:" in child.stdout, child.stderr


def test_lab_imported_from_another_folder_says_so(tmp_path):
    shutil.copytree(ROOT / "lab", tmp_path / "lab", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "lab", "plugins"], cwd=tmp_path, capture_output=True, text=True
    )
    assert "warning: lab is imported from" in done.stderr and str(tmp_path / "lab") in done.stderr


# 6. lab serve's port


def test_serve_port_out_of_range(run, capsys):
    one_error(*lab_(capsys, "serve", run, "--port", 99999), "--port must be between 1 and 65535")


def test_serve_on_a_busy_port_is_one_line_and_announces_nothing(run, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        status, err = lab_(capsys, "serve", run, "--port", busy.getsockname()[1])
    one_error(status, err, "cannot listen on 127.0.0.1", "choose another --port")
    assert "open http" not in err


# 7. Folders where files belong


def test_compare_output_that_is_a_folder(run, capsys):
    one_error(*lab_(capsys, "compare", run, "-o", run), "is a folder")


def test_eval_json_that_is_a_folder(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "eval.json").mkdir()
    (tmp_path / "t.txt").write_text("hello world " * 20)
    one_error(*lab_(capsys, "eval", copy, "--text", tmp_path / "t.txt"), "eval.json")


# 8. import-hf writes a recipe lab run accepts


def test_import_hf_fits_generate_to_few_positions(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    assert lab_(capsys, "import-hf", tmp_path / "hf", "--out", tmp_path / "run")[0] == 0
    recipe = load_recipe(tmp_path / "run" / "recipe.toml")
    prompt = len(recipe.parts["tokenizer"].build().encode(recipe.generate.prompt))
    assert prompt + recipe.generate.max_new_tokens <= 64


# 9. generate's bound


def test_generate_bounds_max_new_tokens(run, capsys):
    status, err = lab_(capsys, "generate", run, "--no-cache", "--max-new-tokens", 10**8)
    one_error(status, err, "--max-new-tokens must be between 1 and")


# 11. Errors from plugin code


class Broken:
    """A plugin whose norm's check_recipe has a bug."""

    @staticmethod
    @hookimpl
    def lab_components(register):
        from pydantic import BaseModel

        class Config(BaseModel):
            def check_recipe(self, recipe):
                return {}["oops"]

        register("norm", "broken", lambda config, model: None, Config, "a norm with a bug")


@pytest.fixture
def broken_plugin(monkeypatch):
    monkeypatch.setattr(lab.plugins, "_registry", build_registry({"lab-broken": Broken}))


def test_a_plugin_bug_is_named_by_package_and_its_traceback_kept(broken_plugin, capsys, monkeypatch):
    sets = ["--set", "model.norm.name=broken"]
    status, err = lab_(capsys, "recipe", ROOT / "recipes" / "tiny.toml", *sets)
    one_error(status, err, "plugin package 'lab-broken'", "KeyError: 'oops'", "--debug")
    assert main(["--debug", "recipe", str(ROOT / "recipes" / "tiny.toml"), *sets]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("LAB_DEBUG", "1")
    assert main(["recipe", str(ROOT / "recipes" / "tiny.toml"), *sets]) == 2
    assert 'return {}["oops"]' in capsys.readouterr().err


def test_an_unknown_slot_is_a_lab_error():
    with pytest.raises(LabError, match="unknown slot ''"):
        registry().get("", "sdpa")


# 12. Shipped recipes from anywhere; paths relative to the recipe


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes").glob("*.toml")))
def test_every_shipped_recipe_reads_from_a_folder_outside_the_clone(name, tmp_path, monkeypatch):
    copied = tmp_path / "mine" / name
    copied.parent.mkdir()
    shutil.copy(ROOT / "recipes" / name, copied)  # as a user copies one next to their data
    monkeypatch.chdir(tmp_path)
    for path in (ROOT / "recipes" / name, copied):
        recipe = load_recipe(path)
        recipe.parts["tokenizer"].build()


def test_relative_paths_resolve_against_the_recipe_file(tmp_path, monkeypatch):
    (tmp_path / "project" / "tok").mkdir(parents=True)
    shutil.copy(
        ROOT / "plugins/components/lab_tokenizers/shakespeare/char/vocab.json", tmp_path / "project/tok"
    )
    text = (ROOT / "recipes" / "shakespeare_char.toml").read_text()
    raw = tomllib.loads(text)
    assert raw["tokenizer"]["vocab"].startswith("pkg:lab_tokenizers/")
    (tmp_path / "project" / "r.toml").write_text(text.replace(raw["tokenizer"]["vocab"], "tok/vocab.json"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    recipe = load_recipe(tmp_path / "project" / "r.toml")
    assert recipe.parts["tokenizer"].config.vocab == str(tmp_path / "project" / "tok" / "vocab.json")
    # given on the command line, a path is the current folder's, as a shell user expects
    (tmp_path / "elsewhere" / "v.json").write_text((tmp_path / "project/tok/vocab.json").read_text())
    recipe = load_recipe(tmp_path / "project" / "r.toml", ["tokenizer.vocab=v.json"])
    assert recipe.parts["tokenizer"].config.vocab == "v.json"


def test_an_unknown_package_in_a_pkg_path_is_one_message(tmp_path, capsys):
    one_error(
        *lab_(
            capsys,
            "recipe",
            ROOT / "recipes" / "shakespeare_char.toml",
            "--set",
            "tokenizer.vocab=pkg:nope/v.json",
        ),
        "no installed package 'nope'",
    )


# 13. A number where a string belongs


@pytest.mark.parametrize("value", ["inf", "2024", "-0.5", "nan"])
def test_a_number_for_out_dir_names_the_key(value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, err = lab_(capsys, "run", ROOT / "recipes" / "tiny.toml", "--set", f"train.out_dir={value}")
    one_error(status, err, "out_dir")
    assert not any(tmp_path.iterdir())
