"""Every registered attention, built-in or installed later, timed against "manual" at each shape.

Each attention is built by its plugin's factory with its default Config, and again with each entry of
its Config's `extra_settings`, and called through the interface: attn(x, pos, position, cache=None),
with a plain Position (no positional effect). Every softmax attention (a lab.attention.SelfAttention)
is checked against "manual" given the same weights (its q/k/v and output projections, QK-norm gains);
any other is timed unchecked, and the note says so. An attention declares another reference with a
class attribute `reference_attention = "NAME"` (a registered attention checked the same way), or that
it computes another function on purpose with `different_function = "why"` (timed, noted, unchecked).
Forward runs under no_grad (inference); fwd+bwd is one training call. On CUDA, attentions that
call torch SDPA are also timed with each SDPA backend forced.

FLOPs per call come from the attention's own `flops(batch, seq_len, backward)` where it has one
(SelfAttention counts its grouped projections and the pairs its mask lets through); otherwise, as
useful work (a multiply-add is 2; the masked half is not work):
    projections  qkv (C -> 3C) and output (C -> C):  2*B*T*C*4C = 8*B*T*C^2,  backward 2x forward
    attention    q@k^T and weights@v, 2*B*H*T*T*D each, halved by causality: 2*B*H*T*T*D,
                 backward 2.5x forward (as FlashAttention counts it: 4 matmuls plus q@k^T recomputed)
"""

import contextlib
import warnings

import pytest
import torch
from pydantic import ValidationError

from benchmarks import machine
from lab.attention import SelfAttention
from lab.interfaces import Position
from lab.plugins import registry
from lab.recipe import ModelConfig
from lab.testing import with_settings

REFERENCE = "manual"
MODES = ("fwd", "fwd+bwd")
# The correctness check runs on the first 2 sequences' first CHECK_TOKENS tokens: causal outputs
# there do not depend on what follows, and an fp32 reference at full GPU size would not fit.
CHECK_TOKENS = 1024


def sdpa_backends() -> dict:
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }


def pytest_generate_tests(metafunc):
    # From the registry at collection time: a newly installed attention plugin is benchmarked as is.
    size = machine.SIZES[metafunc.config.getoption("lab_size")]
    backends = ["default"]
    if machine.device().type == "cuda":
        backends += list(sdpa_backends())
    metafunc.parametrize("mode", MODES)
    metafunc.parametrize("shape", size.attention, ids=lambda s: "B{}H{}T{}D{}".format(*s))
    metafunc.parametrize("name", variants())
    metafunc.parametrize("backend", backends)


def variants() -> list[str]:
    """Every attention's name, then name[key=value,...] for each entry of its Config's extra_settings."""
    out = []
    for name, component in sorted(registry().components["attention"].items()):
        out += [name] + [
            with_settings(component, s).name for s in getattr(component.Config, "extra_settings", [])
        ]
    return out


def component_of(variant: str):
    """The component a variant id names, with its settings."""
    name = variant.split("[")[0]
    component = registry().components["attention"][name]
    for settings in getattr(component.Config, "extra_settings", []):
        if with_settings(component, settings).name == variant:
            return with_settings(component, settings)
    return component


def test_attention(timed, benchmark, device, mode, shape, name, backend):
    B, H, T, D = shape
    dt = machine.dtype(device)
    attn, reference = build_pair(name, shape, device)
    attn.to(dt).train(mode == "fwd+bwd")
    position, pos = Position(), torch.arange(T, device=device)
    x = torch.randn(B, T, H * D, device=device, dtype=dt, requires_grad=mode == "fwd+bwd")
    call = one_call(attn, x, pos, position, mode)

    benchmark.group = f"attention {mode} B={B} H={H} T={T} D={D} {machine.label(device, dt)}"
    benchmark.extra_info.update(
        variant=name if backend == "default" else f"{name}[{backend}]", reference=reference_name(attn)
    )
    with sdpa_backend(backend):
        if backend != "default":
            skip_unless_backend_runs(call, backend)
        benchmark.extra_info["note"] = check(attn, reference, x, pos, position, mode)
        _, mean = timed(call)
        benchmark.extra_info["peak_mem_mib"] = machine.peak_memory_mib(call, device)
    flops = flops_of(attn, B, H, T, D, backward=mode == "fwd+bwd")
    benchmark.extra_info["gflop"] = flops / 1e9
    benchmark.extra_info["tflops"] = flops / mean / 1e12 if mean else None


def one_call(attn, x, pos, position, mode):
    """What is timed: an inference forward, or a training forward and backward."""
    grad = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            return attn(x, pos, position)

    def forward_backward():
        attn(x, pos, position).backward(grad)

    return forward if mode == "fwd" else forward_backward


def attention_flops(B, H, T, D, backward: bool) -> float:
    """Useful FLOPs of one call; see the module docstring."""
    C = H * D
    projections = 8 * B * T * C * C
    attention = 2 * B * H * T * T * D
    if backward:
        return 3 * projections + 3.5 * attention
    return projections + attention


def flops_of(attn, B, H, T, D, backward: bool) -> float:
    """The attention's own count where it reports one, else the formula of the module docstring."""
    if hasattr(attn, "flops"):
        return attn.flops(B, T, backward=backward)
    return attention_flops(B, H, T, D, backward)


def build_pair(name: str, shape, device, model_settings: dict | None = None):
    """(the attention to time, fp32 "manual" with the same weights to check it against, or None
    when it is not a softmax attention (not a SelfAttention) or manual is not installed)."""
    B, H, T, D = shape
    model = ModelConfig(n_embd=H * D, n_head=H, block_size=T, dropout=0.0, **(model_settings or {}))
    components = registry().components["attention"]
    torch.manual_seed(0)
    attn = build(component_of(name), model).to(device)
    wanted = reference_name(attn)
    if wanted not in components or not isinstance(attn, SelfAttention):
        return attn, None
    reference = build(components[wanted], model).to(device).eval()
    # The reference takes the attention's own weights: the softmax attention's projections and gains.
    shared = {k: v for k, v in attn.state_dict().items() if k in reference.state_dict()}
    reference.load_state_dict(shared)
    return attn, reference


def reference_name(attn) -> str:
    """The attention this one is checked against: its own `reference_attention`, or manual."""
    return getattr(attn, "reference_attention", None) or REFERENCE


def build(component, model):
    try:
        config = component.Config()
    except ValidationError as e:
        pytest.skip(f"attention '{component.name}' has settings without defaults: {e}")
    return component.factory(config, model)


def check(attn, reference, x, pos, position, mode) -> str:
    """Compare with fp32 manual on the same weights; returns a note for the summary.

    Output and input gradient must match manual's. An attention that computes a different function
    on purpose (a sliding window, a linear approximation) matches only on its first tokens: that is
    noted, not failed; one that differs from the very first token has a bug, unless it declares
    `different_function` (or another `reference_attention`)."""
    declared = getattr(attn, "different_function", None)
    if declared:
        return f"unchecked: computes another function than {REFERENCE} on purpose ({declared})"
    if reference is None:
        return f"unchecked: not a softmax attention (lab.attention.SelfAttention) like {REFERENCE}"
    ref = reference_name(attn)
    T = min(x.size(1), CHECK_TOKENS)
    x, pos = x[:2, :T].detach(), pos[:T]
    grad = torch.randn_like(x)
    got = [t.float() for t in outputs(attn, x, pos, position, grad, mode)]
    want = outputs(reference, x.float(), pos, position, grad.float(), mode)
    # Relative to the reference's scale (float rounding grows with the values, and differs by CPU),
    # so the absolute part is a fraction of the largest value, not a fixed number.
    tol, rtol = (1e-4, 1e-3) if x.dtype == torch.float32 else (3e-2, 3e-2)
    atol = tol * want[0].abs().max().item()
    assert all(t.isfinite().all() for t in got), "output or gradient is not finite"
    agree = leading_agreement(got[0], want[0], atol, rtol)
    assert agree > 0, f"output differs from {ref}'s from the first token on"
    if agree < T:
        return f"matches {ref} on the first {agree} of {T} tokens only"
    for g, w, what in zip(got, want, ("output", "input gradient")):
        torch.testing.assert_close(
            g, w, atol=tol * w.abs().max().item(), rtol=rtol, msg=lambda m: f"{what} vs {ref}: {m}"
        )
    error = max((g - w).abs().max().item() for g, w in zip(got, want))
    return f"matches {ref}, max |err| {error:.1e}"


def leading_agreement(got, want, atol, rtol) -> int:
    """How many leading tokens of got (B, T, C) are within tolerance of want."""
    wrong = ((got - want).abs() > atol + rtol * want.abs()).any(dim=2).any(dim=0)  # (T,)
    return int(wrong.int().argmax()) if wrong.any() else got.size(1)


def outputs(attn, x, pos, position, grad, mode) -> list[torch.Tensor]:
    if mode == "fwd":
        with torch.no_grad():
            return [attn(x, pos, position)]
    x = x.clone().requires_grad_()
    y = attn(x, pos, position)
    y.backward(grad)
    attn.zero_grad(set_to_none=True)
    return [y.detach(), x.grad]


def sdpa_backend(backend: str):
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(sdpa_backends()[backend])


def calls_sdpa(call) -> bool:
    """Whether call runs torch SDPA: forcing a backend only means something for those that do.
    The profiler sees the aten op, also from inside compiled code."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    return any("scaled_dot_product" in event.key for event in prof.key_averages())


def skip_unless_backend_runs(call, backend):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            uses_sdpa = calls_sdpa(call)
        except RuntimeError as e:  # "No available kernel": the warnings say why
            why = "; ".join(str(w.message) for w in caught) or str(e)
            pytest.skip(f"SDPA backend '{backend}' cannot run this shape/dtype here: {why}")
    if not uses_sdpa:
        pytest.skip("this attention does not call torch SDPA; its time is the 'default' one")
