"""Schedules for more than the learning rate: [schedule.batch_size], [schedule.seq_len] and
[schedule.window] tables, each driven by a schedule component. Each is checked against the run it
amounts to (a smaller batch, a smaller window) or the loss computed by hand (shorter sequences); all
three together resume bit for bit and log the same losses on two DDP processes as on one."""

import pytest
import torch
from test_distributed import RECIPE, assert_same_losses, lab_run, records, torchrun
from tiny import counting_tokens

from lab.commands.cli import main
from lab.engine.scheduled import Scheduled, split_sequences
from lab.engine.trainer import Trainer
from lab.errors import LabError
from lab.recipe import load_recipe
from lab.runs.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

# test_distributed's tiny run (block 32, global batch 8: 2 x 4 in one process), its layers as
# local_global's: a sliding window on the first, full attention on the last.
LOCAL_GLOBAL = RECIPE.replace(
    '[model.attention]\nname = "sdpa"',
    '[model.attention]\nname = "sliding"\nwindow = 16\n[model.layers.1.attention]\nname = "sdpa"',
)
HOLD = "stages = 1\nsteps = 1000"  # one stage: the share stays `start` for the whole 6-step run
RAMPS = """
[schedule.batch_size]
name = "ramp"
start = 0.5
steps = 4

[schedule.seq_len]
name = "ramp"
start = 0.25
steps = 4

[schedule.window]
name = "ramp"
start = 0.25
steps = 4
"""


@pytest.fixture
def folder(tmp_path):
    counting_tokens(tmp_path / "data")
    assert 'name = "sliding"' in LOCAL_GLOBAL
    return tmp_path


def write(folder, extra: str, name: str = "tiny.toml") -> None:
    (folder / name).write_text(LOCAL_GLOBAL.format(data=folder / "data") + extra)


def test_all_three_resume_bit_for_bit(folder):
    write(folder, RAMPS)
    lab_run(folder, "one")
    lab_run(folder, "resumed", "train.max_steps=3")
    lab_run(folder, "resumed")
    assert_same_losses(folder / "resumed", folder / "one", grad_norm_rel=0)
    steps = {r["step"]: r for r in read_metrics(folder / "one" / "metrics.jsonl") if "loss" in r}
    resumed = {r["step"]: r for r in read_metrics(folder / "resumed" / "metrics.jsonl") if "loss" in r}
    # ceil(4 x share) rows per micro-batch; the longest divisor of 32 within 32 x share; ceil(16 x share)
    assert [steps[s]["schedule.batch_size"] for s in range(1, 7)] == [0.5, 0.75, 0.75, 1.0, 1.0, 1.0]
    assert [steps[s]["schedule.seq_len"] for s in range(1, 7)] == [0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    assert [steps[s]["schedule.window"] for s in range(1, 7)] == [0.25, 0.4375, 0.625, 0.8125, 1, 1]
    tokens = [steps[s]["tokens"] for s in range(1, 7)]
    assert tokens == [128, 320, 512, 768, 1024, 1280]  # 2 micro-batches x rows x 32 tokens, summed
    assert [resumed[s]["tokens"] for s in range(1, 7)] == tokens


@pytest.mark.slow  # torchrun, two processes; the batch test shows the rows are a smaller batch's
def test_all_three_on_two_ddp_processes_log_one_process_losses(folder):
    write(folder, RAMPS)
    lab_run(folder, "one")
    done = torchrun(folder, "ddp")
    assert done.returncode == 0, done.stderr
    assert "scheduled: batch_size (ramp), seq_len (ramp), window (ramp)" in done.stdout
    assert_same_losses(folder / "ddp", folder / "one")


def test_a_window_held_at_a_quarter_is_a_run_with_a_quarter_of_the_window(folder):
    write(folder, f'[schedule.window]\nname = "ramp"\nstart = 0.25\n{HOLD}\n')
    lab_run(folder, "scheduled")
    write(folder, "")  # no schedule
    lab_run(folder, "small", "model.attention.window=4")
    assert records(folder / "scheduled") == records(folder / "small")  # bit for bit, every step and val
    lab_run(folder, "full", "train.max_steps=1")
    assert records(folder / "full")[1, "loss"] != records(folder / "scheduled")[1, "loss"]


def test_a_batch_held_at_half_is_a_run_with_half_the_batch(folder):
    write(folder, f'[schedule.batch_size]\nname = "ramp"\nstart = 0.5\n{HOLD}\n')
    lab_run(folder, "scheduled")
    write(folder, "")  # no schedule
    lab_run(folder, "small", "train.batch_size=2", "train.global_batch_size=4")
    got, expected = records(folder / "scheduled"), records(folder / "small")
    # The train steps are the smaller batch's; validation stays on train.batch_size rows.
    assert {k: v for k, v in got.items() if k[1] != "val_loss"} == {
        k: v for k, v in expected.items() if k[1] != "val_loss"
    }


def test_shorter_sequences_train_on_the_loss_computed_by_hand(folder, tmp_path):
    write(folder, f'[schedule.seq_len]\nname = "ramp"\nstart = 0.5\n{HOLD}\n')
    recipe = load_recipe(folder / "tiny.toml")
    trainer = Trainer(recipe, tmp_path / "run", "lab run tiny.toml")
    expected = 0.0
    with torch.no_grad():
        for micro in range(2):  # grad_accum 2: rows 0-3, then 4-7
            x, y = trainer.batch("train", 0, range(4 * micro, 4 * micro + 4))
            expected += trainer.model(x.reshape(8, 16), y.reshape(8, 16))[1].item() / 2
    loss, *_, extras = trainer.train_step()
    assert loss == pytest.approx(expected, rel=1e-6) and extras["schedule.seq_len"] == 0.5
    windows = torch.arange(64).reshape(2, 32)  # counting tokens: each target is its input + 1
    x, y = split_sequences(windows, 8), split_sequences(windows + 1, 8)
    assert x.shape == (8, 8) and torch.equal(y, x + 1)


def test_the_schedules_are_pure_functions_of_the_step_within_the_recipe_values(folder):
    write(folder, RAMPS)
    recipe = load_recipe(
        folder / "tiny.toml", ["schedule.seq_len.start=0.3", "schedule.batch_size.start=0.01"]
    )
    scheduled = Scheduled(recipe, 6)
    assert scheduled.seq_len(0) == 8  # 32 x 0.3 = 9.6: the longest divisor of 32 within it
    assert scheduled.rows(0) == 1  # at least one sequence
    assert [scheduled.rows(s) for s in (9, 3, 100)] == [4, 4, 4]  # never more than batch_size
    assert [scheduled.seq_len(s) for s in (100, 0)] == [32, 8]


def test_a_mistake_in_a_schedule_table_is_one_message(folder, capsys):
    write(folder, '[schedule.windwo]\nname = "ramp"\n')
    assert main(["recipe", str(folder / "tiny.toml")]) == 2
    err = capsys.readouterr().err
    assert "[schedule.windwo]: nothing in this recipe takes a scheduled 'windwo'" in err
    assert "window (attention 'sliding')" in err and "Traceback" not in err
    write(folder, "[schedule.window]\nstart = 0.5\n")
    with pytest.raises(LabError, match=r"\[schedule.window\] needs a name"):
        load_recipe(folder / "tiny.toml")
    write(folder, '[schedule.window]\nname = "ramp"\nstart = 0\n')
    with pytest.raises(LabError, match=r"\[schedule.window\] start = 0"):
        load_recipe(folder / "tiny.toml")
    (folder / "full.toml").write_text(
        RECIPE.format(data=folder / "data") + '[schedule.window]\nname = "ramp"\n'
    )
    with pytest.raises(LabError, match="nothing in this recipe takes a scheduled 'window'"):
        load_recipe(folder / "full.toml")  # sdpa everywhere: no window to schedule


def test_schedule_tables_survive_a_new_lr_schedule_and_the_resolved_recipe(folder):
    write(folder, RAMPS)
    recipe = load_recipe(folder / "tiny.toml", ["schedule.name=wsd"])
    assert recipe.parts["schedule"].name == "wsd" and set(recipe.schedules) == {
        "batch_size",
        "seq_len",
        "window",
    }
    resolved = recipe.to_dict()["schedule"]
    assert resolved["name"] == "wsd" and resolved["window"] == {
        "name": "ramp",
        "start": 0.25,
        "steps": 4,
        "stages": 0,
        "shape": "linear",
    }
    (folder / "again.toml").write_text(recipe.to_toml())
    assert load_recipe(folder / "again.toml").to_dict() == recipe.to_dict()


def test_lab_plugins_marks_the_schedule_components_a_recipe_uses(folder, capsys):
    write(folder, RAMPS)
    assert main(["plugins", str(folder / "tiny.toml")]) == 0
    assert "  * ramp " in capsys.readouterr().out
