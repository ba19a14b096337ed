"""benchmarks/race.py's reading of run folders: training time from the logged tokens (so a batch-size
schedule, which changes the tokens per step, is timed right), a finished run recognised without
train.max_steps, and an ablation's variants raced as the challenger with their overrides."""

import json

from benchmarks import race


def write_run(folder, steps, tokens_per_step, tokens_per_s, val_every=2, done=True):
    folder.mkdir(parents=True)
    records, tokens = [{"step": 0, "val_loss": 10.0, "tokens": 0}], 0
    for step in range(1, steps + 1):
        tokens += tokens_per_step(step)
        records.append({"step": step, "loss": 5.0, "tokens": tokens, "tokens_per_s": tokens_per_s})
        if step % val_every == 0 or step == steps:
            records.append({"step": step, "val_loss": 10.0 - step, "tokens": tokens})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        (folder / "generated.txt").write_text("--- sample 1 ---\n")


def test_training_time_follows_the_tokens_each_step_trained_on(tmp_path):
    write_run(tmp_path / "ramp", 4, lambda step: 100 * step, tokens_per_s=100.0)  # 1, 2, 3, 4 s
    assert race.curve(tmp_path / "ramp") == [(0, 0.0, 10.0), (2, 3.0, 8.0), (4, 10.0, 6.0)]
    assert race.finished(tmp_path / "ramp")
    write_run(tmp_path / "stopped", 4, lambda step: 100, tokens_per_s=100.0, done=False)
    assert not race.finished(tmp_path / "stopped") and not race.finished(tmp_path / "missing")


def test_an_ablation_races_each_variant_with_its_overrides(tmp_path, monkeypatch, capsys):
    ran = []

    def fake_run(recipe, seed, args, name="", sets=()):
        ran.append((recipe, seed, name, sets))
        out = tmp_path / f"{recipe}-{name}-{seed}"
        if not out.exists():
            slower = {"": 1.0, "no_b": 2.0}.get(name, 1.0) if recipe == "new" else 4.0
            write_run(out, 4, lambda step: 100, tokens_per_s=100.0 / slower)
        return out

    monkeypatch.setattr(race, "run", fake_run)
    assert race.main(["ref", "new", "--seeds", "1", "--ablate", "no_b", "b.x=1", "b.y=2"]) == 0
    assert ("new", 1, "no_b", ("b.x=1", "b.y=2")) in ran
    out = capsys.readouterr().out
    assert "seed 1 | (all) | 6.0000 (+0.0000), 4 s | 0.25x" in out
    assert "seed 1 | no_b | 6.0000 (+0.0000), 8 s | 0.50x" in out
