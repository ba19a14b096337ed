"""`lab run`: a tiny recipe trains, leaves a run folder a user can read, and every mistake a user can
make stops with one message and exit status 2, losing nothing."""

import json
import math

import pytest
import torch
from tiny import tiny_recipe as tiny_recipe_text
from tiny import write_tiny_run

import lab.model
import lab.runs
from lab.commands.cli import main
from lab.engine.peak import device_peak
from lab.recipe import load_recipe
from lab.runs import checkpoint
from lab.runs.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = tiny_recipe_text(
    "tiny",
    """
[schedule]
name = "cosine"
warmup_steps = 2

[train]
batch_size = 4
precision = "fp32"  # these tests check the loop's arithmetic; bf16 has its own (test_precision.py)
max_steps = 8
eval_interval = 4
eval_batches = 2
log_interval = 2
checkpoint_interval = 4
out_dir = "{out}"
device = "cpu"     # the same numbers on every machine

[generate]
num_samples = 2
max_new_tokens = 6
""",
)


def tiny_recipe(tmp_path, out="run") -> str:
    """A two-layer model on token files that count up (next token = this one + 1): it learns fast."""
    return write_tiny_run(tmp_path, TINY, out=out)


def test_a_run_leaves_a_folder_a_user_can_read(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    assert main(["run", recipe]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"

    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(
        set(r)
        == {
            "step",
            "loss",
            "lr",
            "lr.decay",
            "lr.no_decay",
            "grad_norm",
            "tokens_per_s",
            "mfu",
            "tokens",
            "elapsed",
        }
        for r in steps
    )
    assert all(set(r) == {"step", "val_loss", "val_bpb", "tokens", "elapsed"} for r in evals)
    assert [r["tokens"] for r in steps] == [4 * 32 * k for k in range(1, 9)]
    seconds = [r["elapsed"] for r in records]
    assert seconds == sorted(seconds) and seconds[-1] > 0
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in steps)
    assert [r["step"] for r in evals] == [0, 4, 8]  # first, every eval_interval, last
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2
    # bits per byte: the val loss in bits times the val tokens over the UTF-8 bytes they decode to
    tokens, num_bytes = val_tokens_and_bytes(recipe, batches=2, rows=4)
    assert all(
        r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) * tokens / num_bytes, rel=1e-12)
        for r in evals
    )

    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_recipe(run / "recipe.toml").to_dict() == load_recipe(recipe).to_dict()
    samples = (run / "generated.txt").read_text()
    assert samples.count("Once upon a time,") == 2 and samples in out

    assert [d.name for d in checkpoint.checkpoint_dirs(run)] == ["step_0000004", "step_0000008"]
    state = checkpoint.load_state(run / "checkpoints" / "step_0000008")  # weights_only=True
    assert state["step"] == 8 and set(state["rng"]) >= {"python", "numpy", "torch"}
    _, model, _ = lab.runs.load(run)
    assert model.config.n_layer == 2

    assert "MFU is measured against the " in out and "fp32 peak measured with a 1024x1024 matmul" in out
    assert "step     2/8 | loss " in out and "tok/s | MFU " in out and "grad norm" in out
    assert "step     8/8 | val loss " in out and f"| val bpb {evals[-1]['val_bpb']:.4f}" in out


def val_tokens_and_bytes(recipe_path: str, batches: int, rows: int) -> tuple[int, int]:
    """The val batches' target tokens and the bytes of each row's text, counted here one row at a time."""
    from lab.interfaces import DataContext

    recipe = load_recipe(recipe_path)
    tokenizer = recipe.parts["tokenizer"].build()
    data = recipe.parts["data"].build(
        DataContext(recipe.model.block_size, recipe.model.vocab_size, tokenizer, recipe.train.seed)
    )
    targets = [data.batch("val", step, range(rows))[1] for step in range(batches)]
    rows_text = [tokenizer.decode(row.tolist()) for y in targets for row in y]
    return sum(y.numel() for y in targets), sum(len(text.encode("utf-8")) for text in rows_text)


def test_each_step_sets_lr_to_base_lr_times_the_schedule(tmp_path):
    recipe = tiny_recipe(tmp_path)
    assert main(["run", recipe, "--set", "optimizer.lr=1e-2"]) == 0
    schedule = load_recipe(recipe).parts["schedule"].build(8)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r]
    assert lrs == pytest.approx([1e-2 * schedule(step) for step in range(8)])  # step k uses schedule(k - 1)


def test_grad_accum_gives_the_step_of_one_bigger_batch(tmp_path):
    """batch 2 x accum 2 takes the same rows as batch 4 and scales each micro-loss by 1/2."""
    recipe = tiny_recipe(tmp_path)
    common = ["--set", "train.max_steps=2", "--set", "train.checkpoint_interval=100"]
    assert main(["run", recipe, *common, "--set", f"train.out_dir={tmp_path / 'big'}"]) == 0
    assert (
        main(
            [
                "run",
                recipe,
                *common,
                "--set",
                "train.batch_size=2",
                "--set",
                "train.grad_accum=2",
                "--set",
                f"train.out_dir={tmp_path / 'accum'}",
            ]
        )
        == 0
    )
    big, accum = (
        [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
        for name in ("big", "accum")
    )
    assert [r["step"] for r in big] == [r["step"] for r in accum] == [1, 2]
    for a, b in zip(big, accum):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_a_finished_run_says_so_and_more_steps_continue_it(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    assert main(["run", recipe]) == 0
    capsys.readouterr()
    assert main(["run", recipe]) == 0
    out = capsys.readouterr().out
    assert "already reached step 8 (train.max_steps = 8); nothing to do" in out
    assert f"lab run {recipe} --set train.max_steps=16" in out

    assert main(["run", recipe, "--set", "train.max_steps=10"]) == 0
    out = capsys.readouterr().out
    assert "resuming from step 8" in out
    assert "the recipe differs from the checkpoint's: train.max_steps 8 -> 10" in out
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 11))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real_forward = lab.model.GPT.forward
    calls = {"train": 0}

    def nan_at_step_6(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 6:
                loss = loss * math.nan
        return logits, loss

    monkeypatch.setattr(lab.model.GPT, "forward", nan_at_step_6)
    recipe = tiny_recipe(tmp_path)
    assert main(["run", recipe]) == 2
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert "the training loss is nan at step 6: the run stopped without updating" in err
    assert f"The last good checkpoint, {run / 'checkpoints' / 'step_0000004'}, is kept" in err
    assert f"then run `lab run {recipe}` to continue from it" in err and "Traceback" not in err
    assert [d.name for d in checkpoint.checkpoint_dirs(run)] == ["step_0000004"]
    assert checkpoint.load_state(run / "checkpoints" / "step_0000004")["step"] == 4
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == 5


# ---------------------------------------------------------------------------------------- bad input


def run_fails(args, capsys) -> str:
    """`lab run ...` exits with status 2 and one message; the message."""
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_missing_data_file(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    (tmp_path / "data" / "val.bin").unlink()
    err = run_fails([recipe], capsys)
    assert "val.bin not found" in err and "lab prepare" in err
    assert not (tmp_path / "run").exists()  # nothing is written before everything is built


def test_a_vocabulary_smaller_than_the_tokenizers(tmp_path, capsys):
    err = run_fails([tiny_recipe(tmp_path), "--set", "model.vocab_size=1000"], capsys)
    assert "[model] vocab_size = 1000 is smaller than the 50257 tokens of tokenizer" in err
    assert "set model.vocab_size to at least 50257" in err


def test_checkpoint_of_another_shape_is_refused_and_kept(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    assert main(["run", recipe, "--set", "train.max_steps=4"]) == 0
    capsys.readouterr()
    err = run_fails([recipe, "--set", "model.n_layer=3"], capsys)
    run = tmp_path / "run"
    assert f"{run} holds a checkpoint of another model shape than {recipe} builds" in err
    assert "n_layer 2 there, 3 in the recipe" in err
    assert f"move or delete {run}, or set another train.out_dir" in err
    assert checkpoint.load_state(checkpoint.latest(run))["step"] == 4


def test_zero_batch_names_the_field_and_the_fix(tmp_path, capsys):
    err = run_fails([tiny_recipe(tmp_path), "--set", "train.batch_size=0"], capsys)
    assert "[train] batch_size = 0: Input should be greater than 0" in err
    assert "--set train.batch_size=..." in err
    assert not (tmp_path / "run").exists()


def test_out_dir_that_is_a_file(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    (tmp_path / "run").write_text("my notes")
    err = run_fails([recipe], capsys)
    assert f"[train] out_dir: '{tmp_path / 'run'}' is a file, not a folder" in err
    assert (tmp_path / "run").read_text() == "my notes"


def test_out_dir_that_holds_other_files(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.toml").write_text("mine")
    err = run_fails([recipe], capsys)
    assert "is a folder of other files, not a run folder" in err and "Set train.out_dir" in err
    assert (tmp_path / "run" / "recipe.toml").read_text() == "mine"


def test_sampling_settings_that_cannot_fit_fail_before_training(tmp_path, capsys):
    err = run_fails([tiny_recipe(tmp_path), "--set", "generate.max_new_tokens=40"], capsys)
    assert "[generate]" in err and "set max_new_tokens to at most 27" in err
    assert not checkpoint.checkpoint_dirs(tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_a_gpu(tmp_path, capsys):
    err = run_fails([tiny_recipe(tmp_path), "--set", "train.device=cuda"], capsys)
    assert "[train] device = 'cuda'" in err and "no CUDA GPU" in err


# --------------------------------------------------------------------------------------------- MFU


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
        ("NVIDIA A100-SXM4-40GB", torch.float32, 19.5e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
    ],
)
def test_mfu_uses_the_datasheet_peak_of_known_gpus(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    found = device_peak(torch.device("cuda"), dtype)
    assert found.flops == peak and name in found.source and "datasheet" in found.source


def test_mfu_on_cpu_is_against_a_timed_matmul_that_leaves_the_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    peak = device_peak(torch.device("cpu"), torch.float32)
    assert torch.equal(torch.rand(3), expected)
    assert 1e8 < peak.flops < 1e14 and "measured" in peak.source
    assert peak.mfu(flops_per_token=1e6, tokens_per_s=100) == pytest.approx(1e8 / peak.flops)


def test_mfu_peak_on_a_busy_machine_is_the_best_timed_here(monkeypatch, tmp_path):
    """A matmul timed while other work runs is slow, which would inflate MFU: the best rate seen on
    this machine is kept in the cache folder and used while it is higher."""
    from lab.engine import peak as metrics

    monkeypatch.setenv("LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(metrics, "timed_matmul", lambda device, dtype: (50e9, 1024))
    quiet = device_peak(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(metrics, "timed_matmul", lambda device, dtype: (20e9, 1024))  # busy now
    busy = device_peak(torch.device("cpu"), torch.float32)
    assert quiet.flops == busy.flops == 50e9
    assert "best timed on this machine; now 20" in busy.source and metrics.processor_name() in busy.source
    monkeypatch.setattr(metrics, "timed_matmul", lambda device, dtype: (80e9, 1024))  # a faster moment
    assert device_peak(torch.device("cpu"), torch.float32).flops == 80e9
    monkeypatch.setattr(metrics, "timed_matmul", lambda device, dtype: (10e9, 1024))
    assert device_peak(torch.device("cpu"), torch.bfloat16).flops == 10e9  # bf16 has a best of its own


def test_metrics_reader_skips_a_line_torn_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
