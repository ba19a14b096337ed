"""The orthogonalising optimizers' step on the hidden matrices of a modern_small-shaped model (one
qkv, attention output, MLP in and MLP out per layer), side by side: Muon with Newton-Schulz (the
reference), Muon with Polar Express (the same matmuls, other coefficients), NorMuon (Polar Express,
then the per-neuron normalisation), and NorMuon with cautious weight decay. What differs is a few
elementwise passes; the matmuls of the orthogonalisation dominate. Each optimizer's update is
checked to be a finite step of Muon's size before it is timed."""

import pytest
import torch

from lab_optim.muon import Muon

SHAPES = {"cpu": (256, 6), "gpu": (768, 12)}  # (n_embd, n_layer): modern_small, GPT-2 small
VARIANTS = {
    "muon, newton-schulz": {},
    "muon, polar express": {"orthogonalization": "polar_express"},
    "normuon": {"orthogonalization": "polar_express", "normalize": True, "beta2": 0.95},
    "normuon, cautious decay": {
        "orthogonalization": "polar_express",
        "normalize": True,
        "beta2": 0.95,
        "weight_decay": 0.1,
        "cautious": True,
    },
}


def hidden_matrices(n_embd: int, n_layer: int, device) -> list[torch.nn.Parameter]:
    shapes = [(3 * n_embd, n_embd), (n_embd, n_embd), (4 * n_embd, n_embd), (n_embd, 4 * n_embd)]
    return [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for _ in range(n_layer) for s in shapes]


@pytest.mark.parametrize("variant", VARIANTS)
def test_optimizer_step(timed, benchmark, variant, pytestconfig, device):
    n_embd, n_layer = SHAPES[pytestconfig.getoption("lab_size")]
    torch.manual_seed(0)
    params = hidden_matrices(n_embd, n_layer, device)
    for p in params:
        p.grad = torch.randn_like(p)
    group = {
        "use_muon": True,
        "lr": 0.02,
        "momentum": 0.95,
        "nesterov": True,
        "ns_steps": 5,
        "weight_decay": 0.0,
    }
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # "auto", as a run picks it
    optimizer = Muon([{"params": params, **group, **VARIANTS[variant]}], ns_dtype=dtype)
    before = params[0].detach().clone()
    optimizer.step()
    change = (params[0].detach() - before).float()
    # A semi-orthogonal (3C, C) matrix has RMS 1 / sqrt(3C); the tall-matrix scale is sqrt(3).
    expected_rms = 0.02 * 3**0.5 / (3 * n_embd) ** 0.5
    assert torch.isfinite(change).all() and 0.5 < change.pow(2).mean().sqrt() / expected_rms < 1.5
    benchmark.group = f"hidden-matrix optimizer step: {n_layer} layers x 4 matrices, n_embd {n_embd}"
    benchmark.extra_info.update(variant=variant, reference="muon, newton-schulz")
    timed(optimizer.step)
