"""A lab run as an lm-evaluation-harness model. Importing this module registers it as "lab":

    import lab_eval.harness, lm_eval
    lm_eval.simple_evaluate(model="lab", model_args="run_dir=runs/gpt_small", tasks=["hellaswag"])

and `lab eval RUN_DIR --harness TASKS [--include-path DIR]` does the same from the command line
(lm-eval's own CLI cannot load models from other packages). Scoring is lab's own (lab/inference/scoring.py),
so a task scored here and by `lab eval --tasks` gives the same numbers.
"""

from __future__ import annotations

import os

import torch

from lab.errors import LabError

MISSING = "lab eval --harness needs lm-evaluation-harness: pip install 'lab[eval]'"
# Nothing downloads at run time: datasets and the hub read only their local cache, unless the user
# has set these otherwise. Tasks over local files (dataset_path: json) need nothing more.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def require_lm_eval() -> None:
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LabError(MISSING) from None


require_lm_eval()

from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402


@register_model("lab")
class LabLM(LM):
    """model_args: run_dir (required), device (auto), batch_size (8), stride (block_size: windows of
    loglikelihood_rolling, as lm-eval's own models score long text), max_gen_toks (256)."""

    def __init__(
        self,
        run_dir: str | None = None,
        device: str | None = "auto",
        batch_size=8,
        stride=None,
        max_gen_toks=256,
        max_batch_size=None,
        model=None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise LabError(
                f"unknown model_args for lab: {', '.join(unknown)}; lab takes run_dir, device, "
                "batch_size, stride and max_gen_toks"
            )
        import lab.runs
        from lab.engine.device import pick_device

        if model is None:
            if not run_dir:
                raise LabError('the lab model needs run_dir, e.g. model_args="run_dir=runs/gpt_small"')
            where = f"model_args device={device}"
            recipe, model = lab.runs.load(run_dir, pick_device(device or "auto", where, "use device=cpu"))[:2]
        else:
            recipe, model = model  # `lab eval` hands over the run it has loaded
        self.model, self.tokenizer = model, recipe.parts["tokenizer"].build()
        self._device = next(model.parameters()).device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # lm-eval's "auto": 8
        self.block_size = model.config.block_size
        self.stride = int(stride) if stride else self.block_size
        self.max_gen_toks = int(max_gen_toks)

    # Log-likelihoods -------------------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from lab.inference.scoring import encode_pair, loglikelihoods

        pairs = [
            encode_pair(self.tokenizer, context, continuation)
            for context, continuation in (request.args for request in requests)
        ]
        return loglikelihoods(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """The whole text's log-likelihood, every token scored once, after an end-of-text token."""
        from lab.data.eval_sets import document_ids
        from lab.inference.scoring import score_text

        return [
            -score_text(
                self.model,
                self.tokenizer,
                [document_ids(self.tokenizer, request.args[0])],
                self.stride,
                self.batch_size,
            ).nll
            if request.args[0]
            else 0.0
            for request in requests
        ]

    # Generation ------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        return [
            self.generate_one(context, dict(kwargs or {}))
            for context, kwargs in (request.args for request in requests)
        ]

    @torch.inference_mode()
    def generate_one(self, context: str, kwargs: dict) -> str:
        """Greedy (or sampled, with do_sample and temperature) decoding with the KV cache, stopped at
        the first of the `until` strings, which is cut off, or at max_gen_toks."""
        from lab.inference.sampling import stream

        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
        eot = self.tokenizer.eot_id
        ids = self.tokenizer.encode(context) or [eot]
        limit = self.model.position.max_len
        if limit is not None:
            max_new = min(max_new, limit - 1)
            ids = ids[-(limit - max_new) :]  # the newest context that leaves room for the answer
        new: list[int] = []
        idx = torch.tensor([ids], device=self._device)
        for token in stream(self.model, idx, max_new, temperature=temperature, eos_id=eot):
            if token.item() == eot:
                break
            new.append(token.item())
            text = self.tokenizer.decode(new)
            if any(stop in text for stop in until):
                break
        return cut_at_stops(self.tokenizer.decode(new), until)


def cut_at_stops(text: str, until: list[str]) -> str:
    """The text before the first stop string in it."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def find_tasks(tasks: str, include_path: str | None):
    """(task names, lm-eval's TaskManager that knows them): checked before any model is loaded."""
    from lm_eval.tasks import TaskManager

    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if include_path is not None and not os.path.isdir(include_path):
        raise LabError(
            f"--include-path {include_path} is not a folder; give the folder of your task YAML files"
        )
    manager = None
    if include_path is not None:  # the user's own tasks alone: indexing lm-eval's 10,000+ takes seconds
        manager = TaskManager(include_path=include_path, include_defaults=False)
    if manager is None or any(name not in manager.all_tasks for name in names):
        manager = TaskManager(include_path=include_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if not names or unknown:
        where = f" (nor in {include_path})" if include_path else " (add yours with --include-path DIR)"
        raise LabError(
            f"unknown lm-eval task(s): {', '.join(unknown) or repr(tasks)}{where}; "
            "`python -m lm_eval ls tasks` lists them"
        )
    return names, manager


def run_harness(names: list[str], manager, lm: LabLM, limit: int | None) -> dict:
    """Run lm-eval tasks; {task: {metric: value}}, printed as lm-eval's table too."""
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines drown the results
    out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=False)
    print(make_table(out))
    return {
        task: {
            metric.split(",")[0]: value
            for metric, value in scores.items()
            if isinstance(value, (int, float)) and "stderr" not in metric
        }
        for task, scores in out["results"].items()
    }
