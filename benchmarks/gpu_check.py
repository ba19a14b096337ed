"""The GPU check: what a CPU cannot show, in one run of a few minutes on one CUDA GPU.

    python benchmarks/gpu_check.py [--nanogpt NANOGPT_DIR]

Runs, on the first CUDA device:
  conformance   every installed component's lab.testing checks on CUDA (their own bf16 checks included)
  bf16 <recipe> three training steps of every recipe under bf16 autocast against fp32
  compile       gpt_small's training step eager and torch.compile'd, bf16: same losses, both speeds
  sdpa/<kernel> the `sdpa` attention forced onto each SDPA backend (flash, memory-efficient, cuDNN,
                math) against `manual` with the same weights, forward and backward
  flex sliding  sliding-window attention as a FlexAttention block mask against the masked SDPA path
  generation    greedy cached decoding against uncached, equal tokens, both speeds
  gpt2 step     GPT-2 124M's training step (recipes/gpt2_124m.toml, one micro-batch of 16 x 1024,
                bf16, compiled): tokens/s and MFU against the datasheet peak; with --nanogpt DIR (a
                clone of karpathy/nanoGPT, kept outside this repo) nanoGPT's step interleaved beside it
  torchrun      `torchrun --nproc_per_node=1 -m lab run` end to end, then a resume

and prints one table. Exit status 0 when every row passed, 1 otherwise; without CUDA it says so and
exits 1 at once: it never passes on a machine that could not run it. `--device cpu` runs the same
code on the CPU with small shapes, to check the script itself (its figures mean nothing there).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import unittest
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"


@dataclass
class Row:
    check: str
    ok: bool
    detail: str
    seconds: float = 0.0


@dataclass(frozen=True)
class Shapes:
    """What each check runs at: GPT-2 small's shapes on a GPU, small ones for --device cpu."""

    attention: tuple[int, int, int, int]  # (batch, heads, T, head_dim)
    overrides: tuple[str, ...]  # applied to gpt2_124m for the step, to gpt_small for the rest
    gpt2_batch: int
    steps: int
    new_tokens: int


GPU = Shapes((4, 12, 1024, 64), (), 16, 20, 128)
CPU = Shapes(
    (2, 4, 128, 32),
    ("model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.block_size=128"),
    2,
    3,
    16,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nanogpt", metavar="DIR", help="a clone of nanoGPT, to time its training step beside lab's"
    )
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: exercise this script on the CPU at small shapes (figures meaningless)",
    )
    parser.add_argument(
        "--only", metavar="NAMES", help="comma-separated checks to run (default: all): " + ", ".join(CHECKS)
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is missing: torch sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}). "
            "Run it on a machine with an NVIDIA GPU and a CUDA build of torch "
            "(pip install torch; the CPU wheel has no CUDA). Nothing was checked.",
            file=sys.stderr,
        )
        return 1
    device = torch.device(args.device)
    shapes = GPU if device.type == "cuda" else CPU
    print(describe(device))
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; the checks are {', '.join(CHECKS)}")
    checks = [CHECKS[n] for n in names]
    rows: list[Row] = []
    for check in checks:
        started = time.perf_counter()
        try:
            found = check(device, shapes, args)
        except Exception as e:  # a check that crashes is a failed row; the others still run
            traceback.print_exc()
            found = [Row(check.__name__, False, f"crashed: {type(e).__name__}: {e}")]
        took = (time.perf_counter() - started) / max(1, len(found))
        for row in found:
            row.seconds = row.seconds or took
            print(f"  {'ok  ' if row.ok else 'FAIL'} {row.check}: {row.detail}", flush=True)
        rows += found
    print()
    print(table(rows))
    return 0 if all(r.ok for r in rows) else 1


def describe(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"gpu_check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda or '-'}"


def table(rows: list[Row]) -> str:
    lines = ["| check | result | detail | s |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {'ok' if r.ok else 'FAIL'} | {r.detail} | {r.seconds:.1f} |" for r in rows]
    return "\n".join(lines)


# The checks ---------------------------------------------------------------------------------------


def conformance(device: torch.device, shapes: Shapes, args=None) -> list[Row]:
    """Every component's lab.testing checks with the GPU as the default device. They include each
    component's own bf16 checks (attention and MLP outputs in bf16 against fp32). A check that does
    not apply (SkipTest) is counted apart, not failed."""
    from lab.testing import cases

    failed, skipped, passed = [], 0, 0
    for case in cases():
        try:
            with torch.device(device):
                case()
            passed += 1
        except unittest.SkipTest:
            skipped += 1
        except Exception as e:
            failed.append(f"{case} ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
    detail = f"{passed} passed, {skipped} not applicable, {len(failed)} failed"
    return [Row("conformance", not failed, detail + (": " + "; ".join(failed) if failed else ""))]


def recipes_in_bf16(device: torch.device, shapes: Shapes, args=None) -> list[Row]:
    """One training step of every recipe (every family's components together) under bf16 autocast,
    against the same step in fp32 from the same weights."""
    from lab.model import GPT

    rows = []
    for path in sorted(RECIPES.glob("*.toml")):
        recipe = recipe_at(path, shapes.overrides + ("model.n_layer=2",))
        x, y = batch(recipe, 2, device)
        losses = {}
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = GPT(recipe).to(device)
            step = train_step(model, recipe, device, compiled=False, dtype=dtype)
            losses[dtype] = [step(x, y) for _ in range(3)]
        a, b = losses[torch.float32], losses[torch.bfloat16]
        worst = max(abs(p - q) / abs(p) for p, q in zip(a, b))
        ok = all(math.isfinite(v) for v in b) and worst < 5e-2
        rows.append(
            Row(
                f"bf16 {path.stem}",
                ok,
                f"3 steps, loss {b[0]:.3f} -> {b[-1]:.3f}; worst rel diff from fp32 {worst:.1e}",
            )
        )
    return rows


def compile_on_and_off(device: torch.device, shapes: Shapes, args=None) -> list[Row]:
    """gpt_small's step, eager and compiled, from the same weights on the same batches."""
    from lab.model import GPT

    recipe = recipe_at(RECIPES / "gpt_small.toml", shapes.overrides)
    x, y = batch(recipe, 4, device)
    losses, speeds = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPT(recipe).to(device)
        step = train_step(model, recipe, device, compiled)
        losses[compiled], times = [], []
        for _ in range(shapes.steps):
            t = timer(device)
            losses[compiled].append(step(x, y))
            times.append(t())
        speeds[compiled] = x.numel() / statistics.median(times[2:] or times)
    a, b = losses[False], losses[True]
    worst = max(abs(p - q) / max(abs(p), 1e-6) for p, q in zip(a, b))
    ok = worst < 2e-2 and all(math.isfinite(v) for v in a + b) and b[-1] < b[0]
    return [
        Row(
            "compile on/off",
            ok,
            f"loss {a[0]:.3f} -> {a[-1]:.3f} eager, {b[0]:.3f} -> {b[-1]:.3f} compiled "
            f"(worst rel diff {worst:.1e}); {speeds[False]:,.0f} vs {speeds[True]:,.0f} tok/s "
            f"({speeds[True] / speeds[False]:.2f}x)",
        )
    ]


def sdpa_backends(device: torch.device, shapes: Shapes, args=None) -> list[Row]:
    """The sdpa attention forced onto each backend against manual attention with the same weights."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa, manual, x = attention_pair(device, shapes, "sdpa", "manual")
    reference, ref_grad = forward_backward(manual, x)
    backends = [
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("mem-efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("cudnn", getattr(SDPBackend, "CUDNN_ATTENTION", None)),
        ("math", SDPBackend.MATH),
    ]
    rows = []
    for name, backend in backends:
        if backend is None:
            rows.append(Row(f"sdpa/{name}", True, f"not in torch {torch.__version__}"))
            continue
        try:
            with sdpa_kernel([backend]):
                out, grad = forward_backward(sdpa, x)
                seconds = time_it(lambda: forward_backward(sdpa, x), device)
        except RuntimeError as e:  # "No available kernel": this GPU or dtype has none of that kind
            ok = device.type == "cpu" and name != "math"
            rows.append(Row(f"sdpa/{name}", ok, f"unavailable here ({str(e).splitlines()[0][:70]})"))
            continue
        err, gerr = rel_err(out, reference), rel_err(grad, ref_grad)
        rows.append(
            Row(
                f"sdpa/{name}",
                err < 2e-2 and gerr < 5e-2,
                f"vs manual: out {err:.1e}, grad {gerr:.1e} (rel, bf16); fwd+bwd {seconds * 1e3:.2f} ms",
                seconds,
            )
        )
    return rows


def flex_sliding(device: torch.device, shapes: Shapes, args=None) -> list[Row]:
    """Sliding-window attention: FlexAttention block mask (auto on CUDA) against masked SDPA."""
    window = shapes.attention[2] // 4
    flex, masked, x = attention_pair(
        device, shapes, "sliding", "sliding", {"window": window}, {"window": window, "backend": "sdpa"}
    )
    out, grad = forward_backward(flex, x)
    reference, ref_grad = forward_backward(masked, x)
    t_flex = time_it(lambda: forward_backward(flex, x), device)
    t_masked = time_it(lambda: forward_backward(masked, x), device)
    err, gerr = rel_err(out, reference), rel_err(grad, ref_grad)
    return [
        Row(
            "flex sliding",
            err < 2e-2 and gerr < 5e-2,
            f"window {window} of {shapes.attention[2]}: out {err:.1e}, grad {gerr:.1e} (rel); "
            f"flex {t_flex * 1e3:.2f} ms vs masked sdpa {t_masked * 1e3:.2f} ms fwd+bwd",
        )
    ]


def cached_generation(device: torch.device, shapes: Shapes, args=None) -> list[Row]:
    """gpt_small, greedy: the cached path gives the uncached path's tokens; both speeds."""
    from lab.inference.sampling import generate
    from lab.model import GPT

    recipe = recipe_at(RECIPES / "gpt_small.toml", shapes.overrides)
    torch.manual_seed(0)
    model = GPT(recipe).to(device).eval()
    prompt = torch.randint(0, recipe.model.vocab_size, (1, 16), device=device)
    out, speed = {}, {}
    for cached in (True, False):
        generate(model, prompt, 4, temperature=0, use_cache=cached)  # warm-up
        t = timer(device)
        out[cached] = generate(model, prompt, shapes.new_tokens, temperature=0, use_cache=cached)
        speed[cached] = shapes.new_tokens / t()
    same = torch.equal(out[True], out[False])
    return [
        Row(
            "generation",
            same,
            f"{shapes.new_tokens} greedy tokens {'equal' if same else 'DIFFER'}; "
            f"cached {speed[True]:,.0f} vs uncached {speed[False]:,.0f} tok/s "
            f"({speed[True] / speed[False]:.1f}x), fp32, batch 1",
        )
    ]


def gpt2_step(device: torch.device, shapes: Shapes, args=None) -> list[Row]:
    nanogpt = getattr(args, "nanogpt", None)
    """GPT-2 124M's training step as `lab run recipes/gpt2_124m.toml` takes it (one micro-batch), with
    nanoGPT's interleaved beside it when a clone is given."""
    from lab.engine.peak import device_peak
    from lab.model import GPT

    recipe = recipe_at(RECIPES / "gpt2_124m.toml", shapes.overrides + ("train.grad_accum=1",))
    B, T = shapes.gpt2_batch, recipe.model.block_size
    x, y = batch(recipe, B, device)
    torch.manual_seed(0)
    model = GPT(recipe).to(device)
    steps = {"lab": train_step(model, recipe, device, compiled=device.type == "cuda")}
    if nanogpt:
        steps["nanoGPT"] = nanogpt_step(nanogpt, recipe, device)
    times = {name: [] for name in steps}
    for i in range(shapes.steps + 3):  # interleaved: both see the same machine
        for name, step in steps.items():
            t = timer(device)
            step(x, y)
            if i >= 3:  # compile and warm-up
                times[name].append(t())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = device_peak(device, dtype)
    tok_s = {name: B * T / statistics.median(ts) for name, ts in times.items()}
    mfu = peak.mfu(model.flops_per_token(T), tok_s["lab"])
    detail = f"{B}x{T} tokens: lab {tok_s['lab']:,.0f} tok/s, MFU {mfu:.1%} of the {peak.source}"
    if "nanoGPT" in tok_s:
        detail += (
            f"; nanoGPT {tok_s['nanoGPT']:,.0f} tok/s (lab/nanoGPT {tok_s['lab'] / tok_s['nanoGPT']:.2f}x)"
        )
    return [Row("gpt2 124M step", math.isfinite(mfu) and mfu > 0, detail)]


def torchrun_end_to_end(device: torch.device, shapes: Shapes, args=None) -> list[Row]:
    """`torchrun --nproc_per_node=1 -m lab run`, 20 steps of gpt_small on the device, then a resume to 30."""
    with tempfile.TemporaryDirectory() as tmp:
        # torchrun through this interpreter: the same environment, whatever bin/ is first on PATH
        base = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=1",
            "-m",
            "lab",
            "run",
            str(RECIPES / "gpt_small.toml"),
            "--set",
            f"train.out_dir={tmp}/run",
            "--set",
            f"train.device={device.type}",
            "--set",
            "train.eval_interval=10",
            "--set",
            "train.checkpoint_interval=10",
            "--set",
            "generate.max_new_tokens=8",
        ] + [a for o in shapes.overrides for a in ("--set", o)]
        first = subprocess.run(base + ["--set", "train.max_steps=20"], capture_output=True, text=True)
        second = subprocess.run(base + ["--set", "train.max_steps=30"], capture_output=True, text=True)
    ok = first.returncode == 0 and second.returncode == 0 and "resuming from step 20" in second.stdout
    tail = (first.stderr or second.stderr).strip().splitlines()[-1:] if not ok else []
    return [
        Row(
            "torchrun 1 process",
            ok,
            f"exit {first.returncode}, then resumed: exit {second.returncode}"
            + (f" ({tail[0][:100]})" if tail else ""),
        )
    ]


CHECKS = {
    "conformance": conformance,
    "bf16": recipes_in_bf16,
    "compile": compile_on_and_off,
    "sdpa": sdpa_backends,
    "flex": flex_sliding,
    "generation": cached_generation,
    "gpt2": gpt2_step,
    "torchrun": torchrun_end_to_end,
}


# Helpers ----------------------------------------------------------------------------------------


def recipe_at(path: Path, overrides=()):
    from lab.recipe import load_recipe

    return load_recipe(str(path), list(overrides))


def bf16(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def batch(recipe, rows: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    shape = (rows, recipe.model.block_size)
    x = torch.randint(0, recipe.model.vocab_size, shape, generator=g)
    y = torch.randint(0, recipe.model.vocab_size, shape, generator=g)
    return x.to(device), y.to(device)


def train_step(model, recipe, device: torch.device, compiled: bool, dtype=None):
    """step(x, y) -> loss: forward (under bf16 autocast on CUDA, or as dtype says), backward, clip,
    optimizer step."""
    optimizer = build_optimizer(recipe, model)
    forward = torch.compile(model) if compiled else model
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    precision = (lambda: bf16(device)) if dtype == torch.bfloat16 else nullcontext

    def step(x, y):
        with precision():
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.train.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def build_optimizer(recipe, model):
    """The recipe's optimizer over the model, as the trainer builds it."""
    from lab.roles import build_optimizer as build

    return build(recipe.parts["optimizer"], model)


def nanogpt_step(path: str, recipe, device: torch.device):
    sys.path.insert(0, path)
    from model import GPT as NanoGPT  # nanoGPT's model.py
    from model import GPTConfig

    m = recipe.model
    torch.manual_seed(0)
    nano = NanoGPT(
        GPTConfig(
            block_size=m.block_size,
            vocab_size=m.vocab_size,
            n_layer=m.n_layer,
            n_head=m.n_head,
            n_embd=m.n_embd,
            dropout=0.0,
            bias=m.bias,
        )
    ).to(device)
    optimizer = nano.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
    forward = torch.compile(nano) if device.type == "cuda" else nano
    precision = (lambda: bf16(device)) if device.type == "cuda" else nullcontext

    def step(x, y):
        with precision():
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nano.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def attention_pair(
    device, shapes: Shapes, first: str, second: str, first_settings=None, second_settings=None
):
    """Two attentions with the same weights, in bf16 on CUDA, and an input that needs a gradient."""
    from lab.plugins import registry
    from lab.recipe import ModelConfig
    from lab.testing import build

    B, H, T, hs = shapes.attention
    model = ModelConfig(vocab_size=64, block_size=T, n_layer=1, n_head=H, n_embd=H * hs, bias=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    a = build(registry().get("attention", first), model, **(first_settings or {}))
    b = build(registry().get("attention", second), model, **(second_settings or {}))
    b.load_state_dict(a.state_dict())
    x = torch.randn(B, T, H * hs)
    return a.to(device, dtype), b.to(device, dtype), x.to(device, dtype)


def forward_backward(attn, x):
    """(output, the input's gradient) of one attention call at positions 0..T-1."""
    from lab.interfaces import Position

    x = x.detach().requires_grad_(True)
    out = attn(x, torch.arange(x.size(1), device=x.device), Position())
    out.float().square().mean().backward()
    return out.detach().float(), x.grad.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest value: bf16 error is relative to scale."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def timer(device: torch.device):
    """t() -> seconds since timer(), waiting for the GPU first."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()

    def elapsed():
        sync()
        return time.perf_counter() - started

    return elapsed


def time_it(fn, device, repeats: int = 10) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t = timer(device)
        fn()
        best = min(best, t())
    return best


if __name__ == "__main__":
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "lab-gpu-check-inductor")
    )
    raise SystemExit(main())
