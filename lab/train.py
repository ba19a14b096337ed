"""`lab run`: train a GPT from a recipe, and resume it exactly.

One optimizer step: every parameter group's lr is set to its base lr x schedule(step); for each
micro-batch, forward and backward with the loss scaled by 1 / grad_accum; the gradient norm is
clipped; the optimizer steps. Step k is the k-th update. Validation runs on a fixed set of val
batches at step 0, every eval_interval steps and at the end; a checkpoint is saved every
checkpoint_interval steps and at the end.

The run folder (train.out_dir, by default runs/<recipe name>) holds recipe.toml, metrics.jsonl,
loss.png, checkpoints/ and generated.txt. The same command run again continues from the newest
complete checkpoint and logs the same losses as a run that was never stopped.
"""
from __future__ import annotations

import math
import shlex
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from lab import checkpoint
from lab import device as devices
from lab.errors import LabError
from lab.generate import generate
from lab.interfaces import DataContext
from lab.metrics import device_peak
from lab.model import GPT
from lab.recipe import Recipe, load_recipe, read_toml
from lab.report import METRICS, MetricsLog

# One process for now; a later issue adds torchrun. Rows of the global batch are already laid out
# for many (see micro_rows), so that change touches only these two values.
RANK, WORLD_SIZE = 0, 1


def cli_run(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    command = shlex.join(["lab", "run", args.recipe] + [a for o in args.overrides for a in ("--set", o)])
    return train(recipe, command)


def train(recipe: Recipe, command: str = "") -> int:
    """Train (or continue) the recipe's run; the exit status: 0 done, 130 stopped by Ctrl-C."""
    command = command or f"lab run {recipe.source}"
    run_dir = run_folder(recipe)
    ckpt = checkpoint.latest(run_dir)
    state = None
    if ckpt is not None:
        checkpoint.check_same_shape(ckpt, recipe, run_dir)
        state = checkpoint.load_state(ckpt)
        if state["step"] >= recipe.train.max_steps:
            print(f"{run_dir} already reached step {state['step']} (train.max_steps = "
                  f"{recipe.train.max_steps}); nothing to do. To train further, raise it:\n"
                  f"  {command} --set train.max_steps={2 * state['step']}")
            return 0
    trainer = Trainer(recipe, run_dir, command)
    if state is not None:
        trainer.resume(ckpt, state)
    return trainer.run()


def run_folder(recipe: Recipe) -> Path:
    """train.out_dir, checked (the run creates it once everything is built). An existing folder must
    be empty or a run folder: the run writes recipe.toml, loss.png... there, and must not overwrite
    a user's files of those names."""
    where = f"{recipe.source} [train] out_dir"
    run_dir = Path(recipe.train.out_dir or f"runs/{recipe.name}")
    if run_dir.exists() and not run_dir.is_dir():
        raise LabError(f"{where}: '{run_dir}' is a file, not a folder. Set train.out_dir to a folder "
                       f"(e.g. --set train.out_dir=runs/{recipe.name}), or move the file away")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (
        (run_dir / METRICS).exists() or (run_dir / "checkpoints").exists()
    ):
        raise LabError(f"{where}: '{run_dir}' is a folder of other files, not a run folder; the run "
                       f"would write into it. Set train.out_dir to a new or empty folder "
                       f"(e.g. --set train.out_dir=runs/{recipe.name})")
    return run_dir


def make_folder(run_dir: Path, recipe: Recipe) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabError(f"{recipe.source} [train] out_dir: cannot create '{run_dir}' ({e.strerror}). "
                       "Set train.out_dir to a folder you can write") from None


def pick_device(recipe: Recipe) -> torch.device:
    return devices.pick_device(recipe.train.device, f"{recipe.source} [train] device = '{recipe.train.device}'",
                               'set train.device = "auto" or "cpu"')


def pick_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """The autocast dtype (float32: no autocast). auto: bf16 on a CUDA GPU that has it; fp32 on
    CPU for now (a later speed issue weighs bf16 there)."""
    precision = recipe.train.precision
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise LabError(f"{recipe.source} [train] precision = \"bf16\", but {torch.cuda.get_device_name(device)} "
                       "has no bf16 support; set precision = \"fp32\" or \"auto\"")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def micro_rows(micro: int, batch_size: int) -> range:
    """This process's rows of a step's global batch (batch_size x grad_accum x WORLD_SIZE rows):
    micro-step m of rank r takes rows (m * world + r) * B ... + B, so any world size sees the same
    global batch."""
    start = (micro * WORLD_SIZE + RANK) * batch_size
    return range(start, start + batch_size)


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Path, command: str):
        self.recipe, self.cfg, self.run_dir, self.command = recipe, recipe.train, run_dir, command
        self.device = pick_device(recipe)
        self.dtype = pick_dtype(recipe, self.device)
        self.step = 0
        self.tokenizer = recipe.parts["tokenizer"].build()
        if self.tokenizer.vocab_size > recipe.model.vocab_size:
            raise LabError(f"{recipe.source} [model] vocab_size = {recipe.model.vocab_size} is smaller than the "
                           f"{self.tokenizer.vocab_size} tokens of tokenizer '{recipe.parts['tokenizer'].name}'; "
                           f"set model.vocab_size to at least {self.tokenizer.vocab_size}")
        self.data = recipe.parts["data"].build(DataContext(
            block_size=recipe.model.block_size, vocab_size=recipe.model.vocab_size,
            tokenizer=self.tokenizer, seed=self.cfg.seed,
        ))
        torch.manual_seed(self.cfg.seed)  # the initial weights
        self.model = GPT(recipe).to(self.device)
        self.prompt = self.prompt_ids()  # a sampling setting that cannot work fails now, not after training
        self.optimizer = recipe.parts["optimizer"].build(self.model)
        # The schedule scales each group's own base lr, so groups may start from different lrs.
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.schedule = recipe.parts["schedule"].build(self.cfg.max_steps)
        use_compile = self.device.type == "cuda" if self.cfg.compile == "auto" else self.cfg.compile
        self.forward = torch.compile(self.model) if use_compile else self.model
        self.tokens_per_step = self.cfg.batch_size * recipe.model.block_size * self.cfg.grad_accum * WORLD_SIZE
        self.flops_per_token = self.model.flops_per_token(recipe.model.block_size)
        self.peak = device_peak(self.device, self.dtype)
        self.resumed_rng = None
        self.describe(use_compile)

    def describe(self, use_compile: bool) -> None:
        r, c = self.recipe, self.cfg
        print(f"run {r.name} ({r.source}) -> {self.run_dir}")
        print(f"model: {self.model.num_params() / 1e6:.2f}M parameters (non-embedding), "
              f"{self.flops_per_token / 1e6:.1f} MFLOP per token")
        print(f"device {self.device}, {'bf16 autocast' if self.dtype == torch.bfloat16 else 'fp32'}, "
              f"compile {'on' if use_compile else 'off'}; batch {c.batch_size} x {r.model.block_size} tokens "
              f"x {c.grad_accum} accum x {WORLD_SIZE} process = {self.tokens_per_step:,} tokens per step")
        print(f"MFU is measured against the {self.peak.source}")

    def resume(self, ckpt: Path, state: dict) -> None:
        checkpoint.load_weights(ckpt, self.model)
        # The optimizer's moments come from the checkpoint; its settings (betas, weight decay, fused
        # or not on this device...) from the recipe as it is now, which the user may have changed.
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, recipe_settings in zip(self.optimizer.param_groups, settings):
            group.update(recipe_settings)
        self.data.load_state_dict(state["data"])
        self.step = state["step"]
        self.resumed_rng = state["rng"]  # restored just before the first step, after everything that draws
        print(f"resuming from step {self.step} ({ckpt})")
        changed = changed_settings(read_toml(str(ckpt / "recipe.toml")), self.recipe.to_dict())
        if changed:  # allowed (a longer run, a lower lr...), but never silently
            print(f"the recipe differs from the checkpoint's: {', '.join(changed)}")

    # The run --------------------------------------------------------------------------------

    def run(self) -> int:
        cfg, started = self.cfg, time.perf_counter()
        resumed = self.resumed_rng is not None
        make_folder(self.run_dir, self.recipe)
        self.log = MetricsLog(self.run_dir, keep_through=self.step if resumed else -1)
        (self.run_dir / "recipe.toml").write_text(self.recipe.to_toml())
        if resumed:
            checkpoint.set_rng_state(self.resumed_rng)
        self.bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", disable=None, dynamic_ncols=True)
        try:
            with StopOnCtrlC() as ctrl_c:
                if self.step == 0:
                    self.evaluate()  # the loss before training: what the curve falls from
                while self.step < cfg.max_steps:
                    self.record(*self.train_step())
                    done = self.step == cfg.max_steps
                    if done or self.step % cfg.eval_interval == 0:
                        self.evaluate()
                    if done or self.step % cfg.checkpoint_interval == 0 or ctrl_c.requested:
                        self.save()
                    if ctrl_c.requested and not done:  # at the end, the samples are seconds away
                        self.bar.close()
                        print(f"stopped at step {self.step}; checkpoint saved in "
                              f"{checkpoint.latest(self.run_dir)}. Continue with:\n  {self.command}")
                        return 130
        finally:
            self.bar.close()
            self.log.close()
        self.sample()
        self.summarize(time.perf_counter() - started)
        return 0

    def train_step(self) -> tuple[float, float, float, float]:
        """One optimizer update: (loss, grad norm, lr, seconds)."""
        cfg, started = self.cfg, time.perf_counter()
        lr_scale = self.schedule(self.step)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * lr_scale
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.batch("train", self.step, micro_rows(micro, cfg.batch_size))
            with self.autocast():
                _, loss = self.forward(x, y)
            (loss / cfg.grad_accum).backward()  # gradients of the mean loss, as one big batch gives
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
        loss, grad_norm = (total / cfg.grad_accum).item(), grad_norm.item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.stop_on_nonfinite(loss, grad_norm)  # before the update: the weights stay good
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, grad_norm, self.base_lrs[0] * lr_scale, time.perf_counter() - started

    def record(self, loss: float, grad_norm: float, lr: float, seconds: float) -> None:
        """The step's line in metrics.jsonl, the progress bar, and every log_interval a log line."""
        tokens_per_s = self.tokens_per_step / seconds
        mfu = self.peak.mfu(self.flops_per_token, tokens_per_s)
        self.log.write({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_s, "mfu": mfu})
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.update(1)
        if self.step % self.cfg.log_interval == 0 or self.step == self.cfg.max_steps:
            tqdm.write(f"step {self.step:>5}/{self.cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                       f"grad norm {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | MFU {mfu:.1%}")

    def batch(self, split: str, step: int, rows: range):
        x, y = self.data.batch(split, step, rows)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def evaluate(self) -> None:
        """Mean loss over val steps 0 .. eval_batches - 1: the same batches every time, so the
        curve compares like with like."""
        self.model.eval()
        losses = []
        for step in range(self.cfg.eval_batches):
            x, y = self.batch("val", step, micro_rows(0, self.cfg.batch_size))
            with self.autocast():
                losses.append(self.forward(x, y)[1])
        self.model.train()
        val_loss = torch.stack(losses).mean().item()
        self.log.write({"step": self.step, "val_loss": val_loss})
        self.log.plot()
        tqdm.write(f"step {self.step:>5}/{self.cfg.max_steps} | val loss {val_loss:.4f}")

    def save(self) -> None:
        if (self.run_dir / "checkpoints" / f"step_{self.step:07d}" / checkpoint.MARKER).exists():
            return  # saved at this step already (Ctrl-C right after a periodic save)
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "data": self.data.state_dict(), "rng": checkpoint.rng_state()}
        path = checkpoint.save(self.run_dir, self.step, self.model, self.recipe.to_toml(), state)
        tqdm.write(f"step {self.step:>5}/{self.cfg.max_steps} | saved {path}")

    def stop_on_nonfinite(self, loss: float, grad_norm: float):
        last = checkpoint.latest(self.run_dir)
        kept = f"The last good checkpoint, {last}, is kept" if last else "No checkpoint was saved yet"
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        raise LabError(
            f"the training {what} at step {self.step + 1}: the run stopped without updating the "
            f"weights or saving. {kept}. Lower [optimizer] lr, lengthen [schedule] warmup_steps or set "
            f"[train] grad_clip in {self.recipe.source}, then run `{self.command}` to continue from it"
        )

    # After training ---------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self) -> None:
        """Continue the [generate] prompt; write the samples to generated.txt and print them."""
        g = self.recipe.generate
        idx = torch.tensor([self.prompt] * g.num_samples, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(g.seed)
        with self.autocast():
            out = generate(self.model, idx, g.max_new_tokens, temperature=g.temperature,
                           top_k=g.top_k or None, generator=generator)
        texts = [self.tokenizer.decode(row.tolist()) for row in out]
        report = "".join(f"--- sample {i + 1} ---\n{text}\n\n" for i, text in enumerate(texts))
        (self.run_dir / "generated.txt").write_text(report)
        print(report, end="")

    def prompt_ids(self) -> list[int]:
        g, where = self.recipe.generate, f"{self.recipe.source} [generate]"
        ids = self.tokenizer.encode(g.prompt)
        if not ids and self.tokenizer.eot_id is not None:
            ids = [self.tokenizer.eot_id]  # no prompt: start where a new document would
        if not ids:
            raise LabError(f"{where} prompt is empty and tokenizer '{self.recipe.parts['tokenizer'].name}' "
                           "has no end-of-text token to start from; give a prompt")
        limit = self.model.position.max_len
        if limit is not None and len(ids) + g.max_new_tokens > limit:
            raise LabError(f"{where}: the prompt ({len(ids)} tokens) + max_new_tokens ({g.max_new_tokens}) "
                           f"is more than the {limit} positions the model knows; set max_new_tokens to at "
                           f"most {limit - len(ids)}")
        return ids

    def summarize(self, seconds: float) -> None:
        vals = [r["val_loss"] for r in self.log.records if "val_loss" in r]
        print(f"done: step {self.step}, val loss {vals[0]:.4f} -> {vals[-1]:.4f}, "
              f"{seconds / 60:.1f} min. Run folder: {self.run_dir} (loss.png, metrics.jsonl, generated.txt); "
              f"sample more with `lab generate {self.run_dir}`")


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


class StopOnCtrlC:
    """The first Ctrl-C (SIGINT) asks the loop to stop after the current step and save; a second one
    stops at once, losing only the work since the last checkpoint."""

    requested = False

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():  # only there can signals be caught
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to quit without saving)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
