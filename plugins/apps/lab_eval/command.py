"""`lab eval RUN_DIR --text FILE... --tasks FILE... --harness TASKS`: print the scores and keep them
in RUN_DIR/eval.json (each file's or task's latest result, with the checkpoint it came from)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lab.runs
from lab.data.eval_sets import read_task, read_token_sequences
from lab.engine.device import pick_device
from lab.errors import LabError
from lab.files import write_text_atomically
from lab.inference.scoring import score_choices, score_text
from lab.runs import checkpoint
from lab.runs.layout import EVAL


def cli_eval(args) -> int:
    if not (args.text or args.tasks or args.harness):
        raise LabError(
            "lab eval needs something to score: --text FILE..., --tasks FILE... or --harness TASKS "
            "(e.g. lab eval runs/gpt_small --text plugins/components/lab_memmap/tinyshakespeare.txt)"
        )
    check_positive(args.batch_size, "--batch-size")
    if args.limit is not None:
        check_positive(args.limit, "--limit")
    if args.harness:  # a missing extra or an unknown task is said before the model is loaded
        from lab_eval.harness import find_tasks

        harness_tasks = find_tasks(args.harness, args.include_path)
    device = pick_device(args.device, f"--device {args.device}", "use --device auto or cpu")
    recipe, model, ckpt = lab.runs.load(args.run_dir, device)
    saved = read_results(Path(args.run_dir))
    tokenizer = recipe.parts["tokenizer"].build()
    stride = text_stride(args.stride, model.config.block_size)
    # Every file is read before anything is scored: a mistake in the last one costs no wait.
    texts = {path: read_token_sequences(path, tokenizer) for path in args.text}
    tasks = {path: read_task(path)[: args.limit] for path in args.tasks}
    print(f"{ckpt} on {device}", file=sys.stderr)
    results: dict = {"text": {}, "tasks": {}}
    for path, seqs in texts.items():
        score = score_text(model, tokenizer, seqs, stride, args.batch_size, desc=Path(path).name).to_dict()
        results["text"][path] = {**score, "stride": stride}
        print(
            f"{path}: loss {score['loss']:.4f} | perplexity {score['perplexity']:.2f} | bpb {score['bpb']:.4f} "
            f"({score['tokens']:,} tokens, {score['bytes']:,} bytes)"
        )
    for path, items in tasks.items():
        score = score_choices(model, tokenizer, items, args.batch_size, desc=Path(path).name)
        results["tasks"][path] = score
        print(f"{path}: acc {score['acc']:.4f} | acc_norm {score['acc_norm']:.4f} ({score['items']} items)")
    if args.harness:
        from lab_eval.harness import LabLM, run_harness

        lm = LabLM(batch_size=args.batch_size, model=(recipe, model))
        results["harness"] = run_harness(*harness_tasks, lm, args.limit)
    path = save_results(Path(args.run_dir), ckpt, saved, results)
    print(f"saved in {path}", file=sys.stderr)
    return 0


def check_positive(value: int, flag: str) -> None:
    if value < 1:
        raise LabError(f"{flag} must be at least 1, got {value}")


def text_stride(stride: int | None, block_size: int) -> int:
    """Tokens between window starts: at most block_size (the windows must meet), by default half of it."""
    if stride is None:
        return max(1, block_size // 2)
    if not 1 <= stride <= block_size:
        raise LabError(
            f"--stride {stride} must be between 1 and the model's block_size, {block_size}: windows "
            f"further apart than a block would leave tokens unscored (e.g. --stride {max(1, block_size // 2)})"
        )
    return stride


def read_results(run_dir: Path) -> dict:
    """What RUN_DIR/eval.json holds already (read before scoring: a damaged file is said at once)."""
    path = run_dir / EVAL
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested past json's limit
        saved = e
    except OSError as e:  # a folder named eval.json, a file it cannot read
        raise LabError(f"cannot read {path}: {e.strerror}; move it away and run lab eval again") from None
    if not isinstance(saved, dict):
        raise LabError(f"{path} is not the JSON object lab eval writes; move it away and run lab eval again")
    return saved


def save_results(run_dir: Path, ckpt: Path, saved: dict, results: dict) -> Path:
    """Merge into RUN_DIR/eval.json: each file's, task's or harness task's newest score, its checkpoint."""
    path = run_dir / EVAL
    step = checkpoint.step_of(ckpt)
    for kind, scores in results.items():
        for name, score in scores.items():
            saved.setdefault(kind, {})[name] = {**score, "checkpoint": str(ckpt), "step": step}
    write_text_atomically(path, json.dumps(saved, indent=2) + "\n")
    return path
