"""Loggers: metrics.jsonl's numbers also in TensorBoard event files (read back with TensorBoard's own
reader) and a Weights & Biases offline run, several at once, chosen in the recipe; a logger whose
package is missing stops the run before it starts, naming the pip command."""

import sys

import pytest
from test_train import tiny_recipe

from lab.commands.cli import main
from lab.recipe import load_recipe
from lab.runs.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

TENSORBOARD = ["--set", "logger.tensorboard={}"]


def scalars(folder) -> dict:
    """{tag: [(step, value)]} of the event files in folder, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_metric_and_a_resume_replaces_the_steps_it_repeats(tmp_path):
    pytest.importorskip("tensorboard")
    recipe = tiny_recipe(tmp_path)
    assert main(["run", recipe, *TENSORBOARD, "--set", "train.max_steps=6"]) == 0  # checkpoint at 4, end at 6
    assert main(["run", recipe, *TENSORBOARD, "--set", "train.max_steps=10"]) == 0  # resumes from 6
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    expected = {}
    for r in records:
        for key, value in r.items():
            if key != "step":
                expected.setdefault(key, []).append((r["step"], value))
    found = scalars(run / "tensorboard")
    assert (
        set(found)
        == set(expected)
        >= {"loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens", "elapsed"}
    )
    for key, points in expected.items():  # each step once, the values of metrics.jsonl (as float32)
        assert [s for s, _ in found[key]] == [s for s, _ in points]
        assert [v for _, v in found[key]] == pytest.approx([v for _, v in points], rel=1e-6)
    assert (run / "loss.png").exists()  # the defaults stay


def test_wandb_offline_writes_a_run_beside_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account
    monkeypatch.setenv("WANDB_SILENT", "true")
    for where in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # not the user's home
        monkeypatch.setenv(where, str(tmp_path / where.lower()))
    recipe = tiny_recipe(tmp_path)
    assert (
        main(
            [
                "run",
                recipe,
                *TENSORBOARD,
                "--set",
                "logger.wandb.project=lab-test",
                "--set",
                "logger.wandb.mode=offline",
                "--set",
                "train.max_steps=4",
            ]
        )
        == 0
    )
    run = tmp_path / "run"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    run_id = (run / "wandb-id").read_text().strip()
    data = offline[0] / f"run-{run_id}.wandb"
    assert data.stat().st_size > 0
    assert scalars(run / "tensorboard")["loss"][-1][0] == 4


@pytest.mark.parametrize(
    "logger, module, extra",
    [("tensorboard", "torch.utils.tensorboard", "tensorboard"), ("wandb", "wandb", "wandb")],
)
def test_a_logger_whose_package_is_missing_stops_before_training(
    tmp_path, capsys, monkeypatch, logger, module, extra
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    recipe = tiny_recipe(tmp_path)
    assert main(["run", recipe, "--set", f"logger.{logger}={{}}"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: logger '{logger}' from package 'lab': needs the {extra} package: "
        f"pip install 'lab[{extra}]'\n"
    )
    assert not (tmp_path / "run").exists()


def test_loggers_are_chosen_by_name_with_their_settings_checked(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    assert main(["run", recipe, "--set", "logger.tensorbord={}"]) == 2
    err = capsys.readouterr().err
    assert "unknown logger 'tensorbord'" in err and "Did you mean 'tensorboard'?" in err
    assert main(["recipe", recipe, "--set", "logger.wandb.projekt=x"]) == 2
    assert "unknown key 'projekt' in" in capsys.readouterr().err
    assert main(["recipe", recipe, "--set", "logger=3"]) == 2
    assert "[logger] holds one table per logger" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

    resolved = load_recipe(recipe, ["logger.tensorboard={}", "logger.wandb.project='p'"])
    assert [p.name for p in resolved.loggers] == ["tensorboard", "wandb"]
    (tmp_path / "again.toml").write_text(resolved.to_toml())  # what a run folder's recipe.toml holds
    assert load_recipe(tmp_path / "again.toml").to_dict() == resolved.to_dict()
