"""Equal budgets and an exact seconds axis: train.max_tokens instead of max_steps, and the elapsed
seconds every metrics.jsonl record carries, continued across a resume."""

import pytest
from test_train import tiny_recipe

from lab.commands.cli import main
from lab.recipe import load_recipe
from lab.runs.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS_PER_STEP = 4 * 32  # the tiny recipe's batch_size x block_size


def test_max_tokens_decides_the_steps_and_the_schedule_follows(tmp_path):
    recipe = tiny_recipe(tmp_path)
    # 5 steps and a bit: the run takes ceil(max_tokens / tokens per step) = 6 steps
    budget = ["--set", "train.max_steps=0", "--set", f"train.max_tokens={5 * TOKENS_PER_STEP + 1}"]
    assert main(["run", recipe, *budget]) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 4, 6]
    schedule = load_recipe(recipe).parts["schedule"].build(6)  # the cosine reaches its floor at step 6
    assert [r["lr"] for r in steps] == pytest.approx([3e-3 * schedule(s) for s in range(6)])


def test_a_bigger_batch_takes_fewer_steps_for_the_same_tokens(tmp_path):
    recipe = tiny_recipe(tmp_path)
    budget = ["--set", "train.max_steps=0", "--set", f"train.max_tokens={4 * TOKENS_PER_STEP}"]
    assert (
        main(
            [
                "run",
                recipe,
                *budget,
                "--set",
                "train.grad_accum=2",
                "--set",
                f"train.out_dir={tmp_path / 'big'}",
            ]
        )
        == 0
    )
    records = [r for r in read_metrics(tmp_path / "big" / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["tokens"]) for r in records] == [(1, 256), (2, 512)]


def test_a_finished_max_tokens_run_says_which_budget_to_raise(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    budget = ["--set", "train.max_steps=0", "--set", f"train.max_tokens={2 * TOKENS_PER_STEP}"]
    assert main(["run", recipe, *budget]) == 0
    capsys.readouterr()
    assert main(["run", recipe, *budget]) == 0
    out = capsys.readouterr().out
    assert f"already reached step 2 (train.max_tokens = {2 * TOKENS_PER_STEP}, 2 steps)" in out
    assert f"--set train.max_tokens={4 * TOKENS_PER_STEP}" in out


def test_max_steps_and_max_tokens_together_is_an_error(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    assert main(["run", recipe, "--set", "train.max_tokens=1000"]) == 2
    err = capsys.readouterr().err
    assert "[train]: max_steps = 8 and max_tokens = 1000 both set the run's length" in err
    assert "--set it to 0" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_seconds_axis_continues_across_a_resume(tmp_path):
    recipe = tiny_recipe(tmp_path)
    assert main(["run", recipe]) == 0
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert main(["run", recipe, "--set", "train.max_steps=10"]) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[: len(first)] == first
    seconds = [r["elapsed"] for r in records]
    assert seconds == sorted(seconds) and seconds[len(first)] >= first[-1]["elapsed"]
