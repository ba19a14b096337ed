"""`lab run`: train a GPT from a recipe, and resume it exactly.

One optimizer step: every parameter group's lr is set to its base lr x schedule(step); for each
micro-batch, forward and backward with the loss scaled by 1 / grad_accum; the gradient norm is
clipped; the optimizer steps. Step k is the k-th update. Validation runs on a fixed set of val
batches at step 0, every eval_interval steps and at the end; a checkpoint is saved every
checkpoint_interval steps and at the end.

With torchrun (`torchrun --nproc_per_node=N -m lab run RECIPE`) N processes train together: the
global batch is batch_size x grad_accum x N sequences, each process computes its rows of it
(micro_rows), DDP or FSDP2 averages the gradients (lab/engine/distributed.py), the logged losses and grad
norm are those of the whole global batch, and rank 0 alone prints and writes the run folder. The
same recipe logs the same losses on any layout with the same global batch (up to float rounding).

The run folder (train.out_dir, by default runs/<recipe name>) holds recipe.toml, metrics.jsonl,
loss.png, checkpoints/ and generated.txt. The same command run again continues from the newest
complete checkpoint and logs the same losses as a run that was never stopped.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from lab.engine import device as devices
from lab.engine import distributed
from lab.engine.peak import device_peak
from lab.engine.precision import pick_dtype
from lab.engine.scheduled import Scheduled, split_sequences
from lab.errors import LabError
from lab.extras import micro_backward
from lab.files import writing
from lab.inference.sampling import check_sampling, generate
from lab.inference.scoring import Evaluator, bits_per_byte, describe, utf8_bytes
from lab.interfaces import DataContext
from lab.model import GPT
from lab.recipe import Recipe, read_toml
from lab.roles import build_optimizer
from lab.runs import checkpoint, is_run, tokenizer_files
from lab.runs.layout import LOCK, RECIPE, SAMPLES, TOKENIZER
from lab.runs.lock import RunLock
from lab.runs.metrics import MetricsLog, is_lab_field


def train(recipe: Recipe, command: str = "") -> int:
    """Train (or continue) the recipe's run; the exit status: 0 done, 130 stopped by Ctrl-C, 143 by
    SIGTERM. Under torchrun every process calls this, and they train the run together."""
    command = command or f"lab run {recipe.source}"
    layout = distributed.layout()
    device = distributed.process_device(
        pick_device(recipe), layout, f"{recipe.source} [train] device = '{recipe.train.device}'"
    )
    with distributed.process_group(layout, device), ExitStack() as held:
        # Rank 0 alone looks in the run folder (processes on other nodes may not see it), holding its
        # lock until the run ends, and tells the others.
        run_dir, ckpt = distributed.share(distributed.on_main(find_checkpoint, recipe, command, held))
        step = checkpoint.step_of(ckpt) if ckpt is not None else 0
        max_steps = total_steps(recipe, layout.world_size)
        if step >= max_steps:
            if layout.main:
                cfg = recipe.train
                budget = (
                    f"train.max_tokens = {cfg.max_tokens}, {max_steps} steps"
                    if cfg.max_tokens
                    else f"train.max_steps = {max_steps}"
                )
                more = f"max_tokens={2 * cfg.max_tokens}" if cfg.max_tokens else f"max_steps={2 * step}"
                print(
                    f"{run_dir} already reached step {step} ({budget}); "
                    f"nothing to do. To train further, raise it:\n  {command} --set train.{more}"
                )
            return 0
        trainer = Trainer(recipe, run_dir, command, layout, device)
        if ckpt is not None:
            trainer.resume(ckpt)
        return trainer.run()


def find_checkpoint(recipe: Recipe, command: str, held: ExitStack) -> tuple[Path, Path | None]:
    """(run folder, its newest complete checkpoint or None), the checkpoint checked against the recipe.
    The folder's lock is taken first and added to `held`: no other run writes there until it closes."""
    run_dir = run_folder(recipe)
    held.enter_context(RunLock(run_dir, command))
    checkpoint.clear_debris(run_dir)  # before anything is written: on a full disk it frees the space
    ckpt, _ = checkpoint.newest_intact(
        run_dir, lambda ckpt: checkpoint.check_same_shape(ckpt, recipe, run_dir)
    )
    return run_dir, ckpt


def run_folder(recipe: Recipe) -> Path:
    """train.out_dir, checked (the run creates it once everything is built). An existing folder must
    be empty or a run folder: the run writes recipe.toml, loss.png... there, and must not overwrite
    a user's files of those names."""
    where = f"{recipe.source} [train] out_dir"
    run_dir = Path(recipe.train.out_dir or f"runs/{recipe.name}")
    if run_dir.exists() and not run_dir.is_dir():
        raise LabError(
            f"{where}: '{run_dir}' is a file, not a folder. Set train.out_dir to a folder "
            f"(e.g. --set train.out_dir=runs/{recipe.name}), or move the file away"
        )
    if run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir()) and not is_run(run_dir):
        raise LabError(
            f"{where}: '{run_dir}' is a folder of other files, not a run folder; the run "
            f"would write into it. Set train.out_dir to a new or empty folder "
            f"(e.g. --set train.out_dir=runs/{recipe.name})"
        )
    return run_dir


def make_folder(run_dir: Path, recipe: Recipe) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabError(
            f"{recipe.source} [train] out_dir: cannot create '{run_dir}' ({e.strerror}). "
            "Set train.out_dir to a folder you can write"
        ) from None


def pick_device(recipe: Recipe) -> torch.device:
    return devices.pick_device(
        recipe.train.device,
        f"{recipe.source} [train] device = '{recipe.train.device}'",
        'set train.device = "auto" or "cpu"',
    )


def micro_rows(micro: int, batch_size: int, rank: int = 0, world_size: int = 1) -> range:
    """This process's rows of a step's global batch (batch_size x grad_accum x world_size rows):
    micro-step m of rank r takes rows (m * world + r) * B ... + B, so any world size sees the same
    global batch."""
    start = (micro * world_size + rank) * batch_size
    return range(start, start + batch_size)


def total_steps(recipe: Recipe, world_size: int) -> int:
    """train.max_steps, or the steps that train.max_tokens takes at this layout's tokens per step."""
    sequences = recipe.train.batch_size * accumulation(recipe, world_size) * world_size
    return recipe.train.steps(sequences * recipe.model.block_size)


def accumulation(recipe: Recipe, world_size: int) -> int:
    """Micro-batches per optimizer step on each process: train.grad_accum, or what keeps
    train.global_batch_size on this many processes."""
    cfg = recipe.train
    if not cfg.global_batch_size:
        return cfg.grad_accum
    global_batch, per_pass = cfg.global_batch_size, cfg.batch_size * world_size
    if global_batch % per_pass:
        nearest = max(1, round(global_batch / per_pass)) * per_pass
        fix = f"set global_batch_size to a multiple of {per_pass} (e.g. {nearest})"
        if global_batch % world_size == 0:
            per_process = global_batch // world_size
            divisor = max(d for d in range(1, cfg.batch_size + 1) if per_process % d == 0)
            fix += f", or batch_size to a divisor of {per_process} (e.g. {divisor})"
        else:
            fix += f", or start a number of processes that divides {global_batch}"
        raise LabError(
            f"{recipe.source} [train] global batch {global_batch} cannot be split into micro-batches "
            f"of {cfg.batch_size} over {world_size} process(es); {fix}"
        )
    return global_batch // per_pass


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        command: str,
        layout=distributed.Layout(),
        device: torch.device | None = None,
    ):
        self.recipe, self.cfg, self.run_dir, self.command = recipe, recipe.train, run_dir, command
        self.layout, self.main = layout, layout.main  # main: rank 0, the one process that prints and writes
        self.device = device or pick_device(recipe)
        self.dtype = pick_dtype(recipe, self.device)
        self.grad_accum = accumulation(recipe, layout.world_size)
        self.max_steps = total_steps(recipe, layout.world_size)  # the schedule and the loop follow it
        self.step = 0
        self.tokenizer = recipe.parts["tokenizer"].build()
        if self.tokenizer.vocab_size > recipe.model.vocab_size:
            raise LabError(
                f"{recipe.source} [model] vocab_size = {recipe.model.vocab_size} is smaller than the "
                f"{self.tokenizer.vocab_size} tokens of tokenizer '{recipe.parts['tokenizer'].name}'; "
                f"set model.vocab_size to at least {self.tokenizer.vocab_size}"
            )
        context = DataContext(
            block_size=recipe.model.block_size,
            vocab_size=recipe.model.vocab_size,
            tokenizer=self.tokenizer,
            seed=self.cfg.seed,
            rank=layout.rank,
            world_size=layout.world_size,
            rows_per_step=self.cfg.batch_size * self.grad_accum * layout.world_size,
        )
        self.data = distributed.main_first(recipe.parts["data"].build, context)
        self.evaluator = Evaluator(recipe, self.tokenizer)  # the [eval] table: its files read now
        if self.evaluator and layout.world_size > 1 and self.cfg.parallel == "fsdp":
            raise LabError(
                f"{recipe.source} [eval]: evaluation during training runs on rank 0's whole model, "
                'which FSDP2 shards; use train.parallel = "ddp", or evaluate the run afterwards '
                "with lab eval"
            )
        torch.manual_seed(self.cfg.seed)  # the initial weights, the same in every process
        self.model = GPT(recipe).to(self.device)
        self.num_params = self.model.num_params()  # counted before FSDP2 turns parameters into shards
        self.active_params = self.model.active_params()
        self.flops_per_token = self.model.flops_per_token(recipe.model.block_size)
        self.parallel = "ddp" if self.cfg.parallel == "auto" else self.cfg.parallel
        # What the steps run: DDP around the model, or the model itself sharded by FSDP2. self.model
        # stays the model (for FSDP2, the sharded one), for the optimizer, checkpoints and sampling.
        self.wrapped = self.model
        if layout.world_size > 1:
            self.wrapped = distributed.parallelize(self.model, self.parallel, self.device, self.dtype)
        self.prompt = self.prompt_ids()  # a sampling setting that cannot work fails now, not after training
        self.optimizer = build_optimizer(
            recipe.parts["optimizer"], self.model
        )  # after sharding: over the shards
        # The schedule scales each group's own base lr, so groups may start from different lrs.
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.group_names = [str(g.get("name", i)) for i, g in enumerate(self.optimizer.param_groups)]
        self.schedule = recipe.parts["schedule"].build(self.max_steps)
        self.scheduled = Scheduled(recipe, self.max_steps)  # [schedule.QUANTITY]: batch, seq_len, window...
        use_compile = self.device.type == "cuda" if self.cfg.compile == "auto" else self.cfg.compile
        self.forward = torch.compile(self.wrapped) if use_compile else self.wrapped
        self.tokens_per_step = (
            self.cfg.batch_size * recipe.model.block_size * self.grad_accum * layout.world_size
        )  # at the full batch; a batch_size schedule trains on fewer at first
        self.step_tokens, self.tokens_seen = self.tokens_per_step, 0
        self.peak = device_peak(self.device, self.dtype) if self.main else None
        self.resumed_rng = None
        self.val_bytes = None  # UTF-8 bytes the val batches' targets spell, per process (see evaluate)
        self.saved_step = None  # the step of the checkpoint this process last saved or resumed from
        self.log = None  # metrics.jsonl, rank 0's
        # The recipe's loggers, built now: one whose package is missing stops the run before it starts.
        self.loggers = [part.build() for part in recipe.loggers] if self.main else []
        if self.main:
            self.describe(use_compile)

    def describe(self, use_compile: bool) -> None:
        r, c, world = self.recipe, self.cfg, self.layout.world_size
        processes = f"{world} processes ({self.parallel})" if world > 1 else "1 process"
        print(f"run {r.name} ({r.source}) -> {self.run_dir}")
        active = (
            f", {self.active_params / 1e6:.2f}M active per token"
            if self.active_params != self.num_params
            else ""
        )
        print(
            f"model: {self.num_params / 1e6:.2f}M parameters (non-embedding){active}, "
            f"{self.flops_per_token / 1e6:.1f} MFLOP per token"
        )
        print(
            f"device {self.device}, {'bf16 autocast' if self.dtype == torch.bfloat16 else 'fp32'}, "
            f"compile {'on' if use_compile else 'off'}; batch {c.batch_size} x {r.model.block_size} tokens "
            f"x {self.grad_accum} accum x {processes} = {self.tokens_per_step:,} tokens per step"
        )
        if self.scheduled:
            print(
                "scheduled: "
                + ", ".join(f"{q} ({p.name})" for q, p in r.schedules.items())
                + f"; at step {self.step}: "
                + ", ".join(f"{q} x{v:.3g}" for q, v in self.scheduled.shares(self.step).items())
            )
        print(f"MFU is measured against the {self.peak.source}" + (" (per process)" if world > 1 else ""))

    def resume(self, ckpt: Path) -> None:
        """Continue from a checkpoint, whatever layout wrote it. Rank 0 reads it and hands every process
        its part; all of them then restore rank 0's RNG states. Every process draws the same random
        numbers from the start (same seed, same draws), so that is where each of them was. It also
        means the processes' dropout masks repeat each other's on their own rows; and another layout
        draws other masks, so with dropout > 0 only a resume on the same layout is exact."""
        weights, state = distributed.on_main(self.read_checkpoint, ckpt) or ({}, {})
        if not distributed.share("optimizer" in state if self.main else None):
            return self.start_from_weights(ckpt, weights)
        # The optimizer's moments come from the checkpoint; its settings (betas, weight decay, fused
        # or not on this device...) from the recipe as it is now, which the user may have changed.
        settings = [
            {k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups
        ]
        checkpoint.restore(self.model, self.optimizer, weights, state.get("optimizer", {}))
        for group, recipe_settings in zip(self.optimizer.param_groups, settings):
            group.update(recipe_settings)
        # Each process continues from its own data position, the one the process of its rank saved.
        self.data.load_state_dict(distributed.scatter(state.get("data") if self.main else None))
        state = distributed.share({key: state[key] for key in ("step", "rng")} if self.main else None)
        self.step = self.saved_step = state["step"]
        self.tokens_seen = self.scheduled.tokens_before(self.step, self.grad_accum * self.layout.world_size)
        self.resumed_rng = state["rng"]  # restored just before the first step, after everything that draws
        if self.main:
            print(f"resuming from step {self.step} ({ckpt})")
            changed = changed_settings(read_toml(str(ckpt / RECIPE)), self.recipe.to_dict())
            if changed:  # allowed (a longer run, a lower lr...), but never silently
                print(f"the recipe differs from the checkpoint's: {', '.join(changed)}")

    def start_from_weights(self, ckpt: Path, weights: dict) -> None:
        """A checkpoint of weights alone, as `lab import-hf` writes: fine-tune them from step 0 with a
        fresh optimizer, on the recipe's data."""
        checkpoint.restore(self.model, None, weights, None)
        if self.main:
            print(f"fine-tuning the weights in {ckpt}: a fresh optimizer, from step 0, on the recipe's data")

    def read_checkpoint(self, ckpt: Path) -> tuple[dict, dict]:
        try:
            state = checkpoint.load_state(ckpt)
            # First, as it may refuse: a data source that cannot continue on this number of processes.
            part, world = self.recipe.parts["data"], self.layout.world_size
            state["data"] = checkpoint.data_states(
                state.get("data", {}),
                world,
                self.data.any_layout,
                ckpt,
                f"data source '{part.name}' (package '{part.component.package}')",
                lambda n: distributed.torchrun_command(self.command.removeprefix(distributed.launcher()), n),
            )
            return checkpoint.read_weights(ckpt, self.model), state
        except checkpoint.Damaged as e:  # found only by reading it: a checkpoint saved before checksums
            raise LabError(
                f"{e}. Move it out of {ckpt.parent} (e.g. to {self.run_dir / ('damaged_' + ckpt.name)}) "
                f"and run `{self.command}` again to resume from the checkpoint before it"
            ) from None

    # The run --------------------------------------------------------------------------------

    def run(self) -> int:
        cfg, started = self.cfg, time.perf_counter()
        resumed = self.resumed_rng is not None
        distributed.on_main(self.open_run_folder, resumed)
        if resumed:
            checkpoint.set_rng_state(self.resumed_rng, self.device)
        self.bar = tqdm(
            total=self.max_steps,
            initial=self.step,
            unit="step",
            disable=None if self.main else True,
            dynamic_ncols=True,
        )
        try:
            with StopOnSignal(say=self.main) as stop_signal:
                if self.step == 0:
                    self.evaluate()  # the loss before training: what the curve falls from
                while self.step < self.max_steps:
                    self.record(*self.train_step())
                    done = self.step == self.max_steps
                    if done or self.step % cfg.eval_interval == 0:
                        self.evaluate()
                    # torchrun hands a signal to every process, not always within the same step: they agree
                    # on it, or one would save (a collective) while the others wait in the next step.
                    stop = distributed.any_process(stop_signal.requested, self.device)
                    if done or self.step % cfg.checkpoint_interval == 0 or stop:
                        self.save()
                    if stop and not done:  # at the end, the samples are seconds away
                        self.bar.close()
                        if self.main:
                            print(
                                f"stopped at step {self.step}; checkpoint saved in "
                                f"{checkpoint.latest(self.run_dir)}. Continue with:\n  {self.command}"
                            )
                        # a process that saw no signal itself stops because another did: Ctrl-C's status
                        return stop_signal.exit_status if stop_signal.requested else 130
        finally:
            self.bar.close()
            if self.log is not None:
                self.log.close()
        self.sample()
        if self.main:
            self.summarize(time.perf_counter() - started)
        return 0

    def open_run_folder(self, resumed: bool) -> None:
        make_folder(self.run_dir, self.recipe)
        self.log = MetricsLog(
            self.run_dir,
            keep_through=self.step if resumed else -1,
            loggers=self.loggers,
            recipe=self.recipe.to_dict(),
        )
        with writing(self.run_dir / RECIPE):
            (self.run_dir / RECIPE).write_text(self.recipe.to_toml())
        with writing(self.run_dir / TOKENIZER):
            tokenizer_files.keep(self.tokenizer, self.run_dir / TOKENIZER)

    def train_step(self) -> tuple[float, float, dict, float, dict]:
        """One optimizer update: (loss, grad norm, {group: lr}, seconds, extras), the loss (the
        cross-entropy), grad norm and extras (the components' loss terms and scalars, lab/extras.py)
        those of the whole global batch."""
        started, accum = time.perf_counter(), self.grad_accum
        lr_scale = self.schedule(self.step)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * lr_scale
        shares = self.scheduled.apply(self.model, self.step)  # the step's window... (schedule.NAME)
        batch_size, seq_len = self.scheduled.rows(self.step), self.scheduled.seq_len(self.step)
        self.step_tokens = self.scheduled.tokens(self.step, accum * self.layout.world_size)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            rows = micro_rows(micro, batch_size, self.layout.rank, self.layout.world_size)
            x, y, meta = self.batch("train", self.step, rows)
            x, y = split_sequences(x, seq_len), split_sequences(y, seq_len)
            if meta:  # per-row metadata (doc_ids, (B, T)) is cut as the rows are
                meta = {k: split_sequences(v, seq_len) if torch.is_tensor(v) and v.dim() == 2 else v
                        for k, v in meta.items()}  # fmt: skip
            with distributed.gradient_sync(self.wrapped, sync=micro == accum - 1):
                values = micro_backward(self.forward, self.model, x, y, accum, self.autocast(), meta)
            for name, value in values.items():
                sums[name] = sums[name] + value if name in sums else value
        # The norm of the whole gradient, the same on every process: DDP's gradients are already
        # averaged; FSDP2's are DTensor shards, whose norm clip_grad_norm_ reduces over the processes.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip or math.inf)
        means = dict(zip(sums, distributed.mean(torch.stack(list(sums.values())) / accum).tolist()))
        loss, grad_norm = means.pop("loss"), grad_norm.item()
        self.check_extras(means)  # a component's own term first: its message names the component
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.stop_on_nonfinite(loss, grad_norm)  # before the update: the weights stay good
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.step_tokens
        lrs = {name: base_lr * lr_scale for name, base_lr in zip(self.group_names, self.base_lrs)}
        return loss, grad_norm, lrs, time.perf_counter() - started, {**means, **shares}

    def check_extras(self, means: dict) -> None:
        for name, value in means.items():
            if not name.startswith("loss.") and is_lab_field(name):
                raise LabError(
                    f"{self.model.extras.owners.get(name, 'a component')} logs a scalar called '{name}', a "
                    "name metrics.jsonl keeps for lab's own numbers (lab.runs.metrics.FIELDS); give it a "
                    "name of its own (e.g. 'router_entropy')"
                )
            if not math.isfinite(value):
                owner = self.model.extras.owners.get(name.removeprefix("loss."), "a component")
                kept = checkpoint.latest(self.run_dir)
                raise LabError(
                    f"{owner} gave the extra {'loss term' if name.startswith('loss.') else 'scalar'} "
                    f"'{name.removeprefix('loss.')}' = {value} at step {self.step + 1}: the run stopped without "
                    f"updating the weights or saving ({f'{kept} is kept' if kept else 'no checkpoint yet'}). "
                    "Fix the component so it gives a finite number (e.g. add an eps before a log or a division)"
                )

    def record(
        self, loss: float, grad_norm: float, lrs: dict, seconds: float, extras: dict | None = None
    ) -> None:
        """The step's line in metrics.jsonl, the progress bar, and every log_interval a log line."""
        if not self.main:
            return
        tokens_per_s = self.step_tokens / seconds
        # MFU against one device's peak, so per process: every process runs its share of the tokens.
        mfu = self.peak.mfu(self.flops_per_token, tokens_per_s / self.layout.world_size)
        lr = next(iter(lrs.values()))
        groups = {f"lr.{name}": value for name, value in lrs.items()} if len(lrs) > 1 else {}
        extras = extras or {}
        self.log.write(
            {
                "step": self.step,
                "loss": loss,
                "lr": lr,
                **groups,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "mfu": mfu,
                "tokens": self.tokens_seen,
                **extras,
            }
        )
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.update(1)
        if self.step % self.cfg.log_interval == 0 or self.step == self.max_steps:
            lr_text = " ".join(f"{v:.2e}" for v in lrs.values())
            extra_text = "".join(f" | {name} {value:.4g}" for name, value in extras.items())
            tqdm.write(
                f"step {self.step:>5}/{self.max_steps} | loss {loss:.4f}{extra_text} | lr {lr_text} | "
                f"grad norm {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | MFU {mfu:.1%}"
            )

    def batch(self, split: str, step: int, rows: range):
        """(x, y, meta) on the device: meta the source's per-row metadata ({} when it gives none)."""
        x, y, *rest = self.data.batch(split, step, rows)
        meta = {k: v.to(self.device, non_blocking=True) for k, v in (rest[0] if rest else {}).items()}
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), meta

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def evaluate(self) -> None:
        """Mean loss over val steps 0 .. eval_batches - 1: the same batches every time, so the
        curve compares like with like, and whatever the layout: process r takes steps r, r + world...
        Every process runs as many (FSDP2 needs them all in every forward), so eval_batches is rounded
        up to a multiple of the processes."""
        self.model.eval()
        self.scheduled.apply(self.model, self.step)  # the model as it trains now (its window...)
        losses, targets = [], []
        world = self.layout.world_size
        for step in range(self.layout.rank, math.ceil(self.cfg.eval_batches / world) * world, world):
            x, y, meta = self.batch("val", step, range(self.cfg.batch_size))
            with self.autocast():
                loss = (self.forward(x, y, meta=meta) if meta else self.forward(x, y))[1]
            terms = {n: v for n, v in self.model.extras.values().items() if n.startswith("loss.")}
            losses.append(torch.stack([loss.float(), *terms.values()]))
            targets.append(y)
        scores = {}
        if self.evaluator and self.main:  # rank 0 alone: the others wait for it in the next step
            with self.autocast():
                scores = self.evaluator(self.model)
        self.model.train()
        # The val loss is the cross-entropy; the components' loss terms are reported beside it.
        means = distributed.mean(torch.stack(losses).mean(0)).tolist()
        val_loss, terms = means[0], {f"val_{n}": v for n, v in zip(terms, means[1:])}
        if self.val_bytes is None:  # the val batches never change: their bytes are counted once
            self.val_bytes = distributed.mean(
                torch.tensor(float(utf8_bytes(self.tokenizer, torch.cat(targets))), device=self.device)
            ).item()
        val_bpb = bits_per_byte(val_loss, sum(y.numel() for y in targets), self.val_bytes)
        if self.main:
            self.log.write(
                {
                    "step": self.step,
                    "val_loss": val_loss,
                    "val_bpb": val_bpb,
                    **terms,
                    **scores,
                    "tokens": self.tokens_seen,
                }
            )
            self.log.plot()
            tqdm.write(
                f"step {self.step:>5}/{self.max_steps} | val loss {val_loss:.4f} | val bpb {val_bpb:.4f}"
            )
            for line in describe(scores):
                tqdm.write(f"step {self.step:>5}/{self.max_steps} | {line}")

    def save(self) -> None:
        if self.saved_step == self.step:
            return  # saved at this step already (Ctrl-C right after a periodic save)
        weights, optimizer = checkpoint.gather(self.model, self.optimizer)  # every process takes part
        data = distributed.gather(self.data.state_dict())  # every process's own position, by rank
        if self.main:
            state = {
                "step": self.step,
                "optimizer": optimizer,
                "data": data,
                "rng": checkpoint.rng_state(self.device),
            }
            try:
                path = checkpoint.save(self.run_dir, self.step, weights, self.recipe.to_toml(), state)
            except LabError as e:
                raise LabError(f"{e}; then run `{self.command}` to continue. {self.last_good()}") from None
            tqdm.write(f"step {self.step:>5}/{self.max_steps} | saved {path}")
        self.saved_step = self.step

    def last_good(self) -> str:
        last = checkpoint.latest(self.run_dir)
        return f"The last good checkpoint, {last}, is kept" if last else "No checkpoint was saved yet"

    def stop_on_nonfinite(self, loss: float, grad_norm: float):
        kept = self.last_good()
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        raise LabError(
            f"the training {what} at step {self.step + 1}: the run stopped without updating the "
            f"weights or saving. {kept}. Lower [optimizer] lr, lengthen [schedule] warmup_steps or set "
            f"[train] grad_clip in {self.recipe.source}, then run `{self.command}` to continue from it"
        )

    # After training ---------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self) -> None:
        """Continue the [generate] prompt; write the samples to generated.txt and print them. Every
        process samples, the same tokens from the same seed: an FSDP2 model's forward needs them all."""
        g = self.recipe.generate
        idx = torch.tensor([self.prompt] * g.num_samples, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(g.seed)
        with self.autocast():
            out = generate(
                self.model,
                idx,
                g.max_new_tokens,
                temperature=g.temperature,
                top_k=g.top_k or None,
                top_p=g.top_p,
                generator=generator,
            )
        if not self.main:
            return
        texts = [self.tokenizer.decode(row.tolist()) for row in out]
        report = "".join(f"--- sample {i + 1} ---\n{text}\n\n" for i, text in enumerate(texts))
        with writing(self.run_dir / SAMPLES):
            (self.run_dir / SAMPLES).write_text(report)
        print(report, end="")

    def prompt_ids(self) -> list[int]:
        g, where = self.recipe.generate, f"{self.recipe.source} [generate]"
        try:
            check_sampling(g.temperature, g.top_k, g.top_p)
        except LabError as e:
            raise LabError(f"{where}: {e}") from None
        ids = self.tokenizer.encode(g.prompt)
        if not ids and self.tokenizer.eot_id is not None:
            ids = [self.tokenizer.eot_id]  # no prompt: start where a new document would
        if not ids:
            raise LabError(
                f"{where} prompt is empty and tokenizer '{self.recipe.parts['tokenizer'].name}' "
                "has no end-of-text token to start from; give a prompt"
            )
        limit = self.model.position.max_len
        if limit is not None and len(ids) + g.max_new_tokens > limit:
            raise LabError(
                f"{where}: the prompt ({len(ids)} tokens) + max_new_tokens ({g.max_new_tokens}) "
                f"is more than the {limit} positions the model knows; set max_new_tokens to at "
                f"most {limit - len(ids)}"
            )
        return ids

    def summarize(self, seconds: float) -> None:
        vals = [r["val_loss"] for r in self.log.records if "val_loss" in r]
        print(
            f"done: step {self.step}, val loss {vals[0]:.4f} -> {vals[-1]:.4f}, "
            f"{seconds / 60:.1f} min. Run folder: {self.run_dir} (loss.png, metrics.jsonl, generated.txt); "
            f"sample more with `lab generate {self.run_dir}`"
        )


def changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'section.key old -> new' for every setting that differs between two nested recipe dicts."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key} {a!r} -> {b!r}")
    return changed


class StopOnSignal:
    """The first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step and save; a
    second one stops at once, losing only the work since the last checkpoint. SIGTERM is what cluster
    schedulers (SLURM, Kubernetes) send before they kill a job at its time limit or on preemption, a
    grace period ahead. Under torchrun, Ctrl-C or SIGTERM reaches torchrun, which hands it on to every
    process; only rank 0's (say=True) prints the notice."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    NOTICE = {
        signal.SIGINT: "Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again to quit "
        "without saving)",
        signal.SIGTERM: "SIGTERM: finishing this step and saving a checkpoint",
    }
    received = None  # the first signal caught

    def __init__(self, say: bool = True):
        self.say = say
        self.previous = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended: 130, 143."""
        return 128 + int(self.received)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only there can signals be caught
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.received is not None:  # the second: stop now, as if nothing had been caught
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.received = signal.Signals(signum)
        if self.say:
            print(f"\n{self.NOTICE[self.received]}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
