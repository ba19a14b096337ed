"""The mixture of experts beside the dense MLP of equal active parameters: gelu 4x wide against
top-2 of 8 experts 2x wide each (and top-1 of 8 experts 4x wide), forward + backward of the MLP on
its own, time per step and tokens/s. The MoE holds 4x the dense MLP's parameters; a token goes
through as many as the dense MLP has. What it costs is the routing and the per-expert gathers."""

import pytest
import torch

from lab.plugins import registry
from lab.recipe import ModelConfig
from lab.testing import build

SHAPES = {
    "cpu": (ModelConfig(n_embd=256, n_head=4, n_layer=6, block_size=512), 4),
    "gpu": (ModelConfig(n_embd=768, n_head=12, n_layer=12, block_size=1024), 16),
}
VARIANTS = {
    "dense gelu 4x": ("gelu", {"expansion": 4}),
    "moe top-2 of 8, 2x": ("moe", {"n_experts": 8, "top_k": 2, "expansion": 2.0}),
    "moe top-1 of 8, 4x": ("moe", {"n_experts": 8, "top_k": 1, "expansion": 4.0}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_moe_step(timed, benchmark, size, variant, pytestconfig):
    from benchmarks import machine

    device = machine.device()
    model, B = SHAPES[pytestconfig.getoption("lab_size")]
    name, settings = VARIANTS[variant]
    torch.manual_seed(0)
    mlp = build(registry().get("mlp", name), model, **settings).to(device).train()
    x = torch.randn(B, model.block_size, model.n_embd, device=device, requires_grad=True)

    def step():
        mlp(x).square().mean().backward()

    benchmark.group = f"mlp forward + backward: {B}x{model.block_size} tokens, n_embd {model.n_embd}"
    active = (
        mlp.active_params() if hasattr(mlp, "active_params") else sum(p.numel() for p in mlp.parameters())
    )
    benchmark.extra_info.update(
        variant=variant,
        reference="dense gelu 4x",
        note=f"{active / 1e6:.2f}M active of {sum(p.numel() for p in mlp.parameters()) / 1e6:.2f}M",
    )
    _, mean = timed(step)
    if mean:
        benchmark.extra_info.update(tokens_per_s=B * model.block_size / mean)
