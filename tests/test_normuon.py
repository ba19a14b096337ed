"""NorMuon, Polar Express and cautious weight decay against float64 transcriptions of their published
descriptions (NorMuon: Li et al. 2025, arXiv 2510.05491, as the NanoGPT speedrun's record runs it;
Polar Express: Amsel et al. 2025, arXiv 2505.16932; cautious weight decay: Chen et al. 2025, arXiv
2510.12402), written here from the papers' formulas; then each in a run: resume bit for bit, and two
DDP processes log one process's losses."""

import pytest
import torch
from test_distributed import RECIPE as DISTRIBUTED_RECIPE
from test_distributed import assert_same_losses, lab_run, torchrun
from tiny import counting_tokens

from lab.plugins import registry
from lab.testing import build
from lab_optim.adamw import LoopAdamW
from lab_optim.muon import POLAR_EXPRESS, Muon, orthogonalize

NS = (3.4445, -4.7750, 2.0315)


def orthogonal_float64(U, method="newton_schulz", steps=5):
    """The quintic iteration on the wide side, in float64."""
    X = U.T if U.shape[0] > U.shape[1] else U
    norm = torch.linalg.matrix_norm(X)
    X = X / (norm * 1.02 + 1e-6) if method == "polar_express" else X / (norm + 1e-7)
    for i in range(steps):
        a, b, c = POLAR_EXPRESS[min(i, 4)] if method == "polar_express" else NS
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ A @ X
    return X.T if U.shape[0] > U.shape[1] else X


def normuon_step_float64(W, G, M, V, lr, wd, beta=0.95, beta2=0.95, cautious=True, method="polar_express"):
    """One NorMuon step in float64: (W, M, V). V holds one mean square per neuron: per row when
    rows >= cols, per column otherwise (the record's layout)."""
    W, G = W.double(), G.double()
    M = beta * M + (1 - beta) * G
    Q = orthogonal_float64((1 - beta) * G + beta * M, method)  # Nesterov
    rows_are_neurons = W.shape[0] >= W.shape[1]
    mean_square = (Q**2).mean(dim=1 if rows_are_neurons else 0, keepdim=True)
    V = beta2 * V + (1 - beta2) * mean_square
    N = Q / V.sqrt()
    N = N * torch.linalg.matrix_norm(Q) / torch.linalg.matrix_norm(N)  # back to Q's Frobenius norm
    U = N * max(1.0, W.shape[0] / W.shape[1]) ** 0.5
    mask = (U * W >= 0).double() if cautious else torch.ones_like(W)
    return W - lr * wd * mask * W - lr * U, M, V


def matrix_group(**settings):
    group = {
        "use_muon": True,
        "lr": 0.05,
        "momentum": 0.95,
        "nesterov": True,
        "ns_steps": 5,
        "weight_decay": 0.2,
    }
    return {**group, **settings}


@pytest.mark.parametrize("shape", [(24, 16), (16, 48), (20, 20)], ids=["tall", "wide", "square"])
def test_normuon_three_steps_match_the_formula_in_float64(shape):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    group = matrix_group(
        params=[weight], orthogonalization="polar_express", cautious=True, normalize=True, beta2=0.95
    )
    optimizer = Muon([group])
    W, M = weight.detach().double(), torch.zeros(shape, dtype=torch.float64)
    V = torch.zeros((shape[0], 1) if shape[0] >= shape[1] else (1, shape[1]), dtype=torch.float64)
    for _ in range(3):  # the later steps use the momentum and the second moment the first left
        grad = torch.randn(shape)
        W, M, V = normuon_step_float64(W, grad, M, V, lr=0.05, wd=0.2)
        weight.grad = grad
        optimizer.step()
        assert ((W - weight.detach().double()).abs().max() / W.abs().max()).item() < 1e-5
    state = optimizer.state[weight]
    assert (state["second_moment"].double() - V).abs().max() / V.abs().max() < 1e-5


def test_normuon_balances_the_neurons_and_muon_does_not():
    """What NorMuon is for: after the normalisation every neuron (row) of the update has the same
    norm, where Muon's orthogonalised update leaves them uneven; the update's total norm is Muon's."""
    torch.manual_seed(0)
    grad = torch.randn(32, 16) * torch.logspace(-1, 1, 32)[:, None]  # rows of very different sizes
    steps = {}
    for normalize in (False, True):
        weight = torch.nn.Parameter(torch.zeros(32, 16))
        extra = {"normalize": True, "beta2": 0.0} if normalize else {}  # beta2 0: this step's squares alone
        optimizer = Muon([matrix_group(params=[weight], weight_decay=0.0, **extra)])
        weight.grad = grad
        optimizer.step()
        steps[normalize] = -weight.detach() / 0.05
    muon_rows, normuon_rows = steps[False].norm(dim=1), steps[True].norm(dim=1)
    assert muon_rows.max() / muon_rows.min() > 1.2
    assert normuon_rows.max() / normuon_rows.min() < 1.0001
    assert steps[True].norm() == pytest.approx(steps[False].norm().item(), rel=1e-5)


@pytest.mark.parametrize("shape", [(24, 16), (16, 48)], ids=["tall", "wide"])
def test_polar_express_matches_its_float64_iteration_and_lands_closer_to_one(shape):
    torch.manual_seed(0)
    g = torch.randn(shape) @ torch.diag(torch.logspace(-2, 0, shape[1]))  # singular values over 2 decades
    ours = orthogonalize(g, method="polar_express").double()
    reference = orthogonal_float64(g.double(), "polar_express")
    assert (ours - reference).abs().max() < 1e-5
    polar, newton = torch.linalg.svdvals(reference), torch.linalg.svdvals(orthogonal_float64(g.double()))
    assert polar.min() > 0.85 and polar.max() < 1.15  # Newton-Schulz's band is about [0.68, 1.2]
    assert polar.min() > newton.min() + 0.1


def test_cautious_muon_decays_only_where_the_update_agrees_in_sign():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 24))
    start, grad = weight.detach().double().clone(), torch.randn(16, 24)
    optimizer = Muon([matrix_group(params=[weight], cautious=True)])
    weight.grad = grad
    optimizer.step()
    U = orthogonal_float64(0.05 * grad.double() + 0.95 * 0.05 * grad.double())  # Nesterov from zero momentum
    expected = start - 0.05 * 0.2 * (U * start >= 0) * start - 0.05 * U
    assert (weight.detach().double() - expected).abs().max() < 1e-5
    assert 0.3 < (U * start >= 0).double().mean() < 0.7  # both kinds of coordinate were exercised


def adamw_float64(W, G, m, v, t, lr, wd, betas=(0.9, 0.95), eps=1e-8, cautious=True):
    """One AdamW step in float64 (Loshchilov & Hutter), no decay where the update and W differ in sign."""
    W, G = W.double(), G.double()
    m = betas[0] * m + (1 - betas[0]) * G
    v = betas[1] * v + (1 - betas[1]) * G * G
    update = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    mask = (update * W >= 0).double() if cautious else 1.0
    return W - lr * wd * mask * W - lr * update, m, v


def test_cautious_adamw_matches_the_formula_in_float64_and_plain_matches_torch():
    torch.manual_seed(0)
    shape = (12, 8)
    cautious = torch.nn.Parameter(torch.randn(shape))
    plain, theirs = (torch.nn.Parameter(cautious.detach().clone()) for _ in range(2))
    settings = {"lr": 0.01, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.5}
    ours = LoopAdamW([{"params": [cautious]}], **settings, cautious=True)
    loop = LoopAdamW([{"params": [plain]}], **settings)
    torch_adamw = torch.optim.AdamW([theirs], **settings)
    W, m, v = cautious.detach().double(), torch.zeros(shape, dtype=torch.float64), 0
    for t in range(1, 4):
        grad = torch.randn(shape)
        W, m, v = adamw_float64(W, grad, m, v, t, lr=0.01, wd=0.5)
        for p, opt in ((cautious, ours), (plain, loop), (theirs, torch_adamw)):
            p.grad = grad.clone()
            opt.step()
        assert (cautious.detach().double() - W).abs().max() < 1e-6
    torch.testing.assert_close(plain, theirs, rtol=1e-6, atol=1e-7)
    assert not torch.equal(cautious, plain)


def test_the_recipe_settings_reach_the_groups():
    params_model = registry().get("optimizer", "normuon")
    from lab.roles import parameters
    from lab.testing import tiny_gpt

    model = tiny_gpt()
    groups = {g["name"]: g for g in build(params_model, parameters(model), model).param_groups}
    assert groups["muon"]["normalize"] and groups["muon"]["orthogonalization"] == "polar_express"
    assert groups["muon"]["cautious"] and groups["adamw"]["cautious"]
    adamw = build(registry().get("optimizer", "adamw"), parameters(model), model, cautious_weight_decay=True)
    assert isinstance(adamw, LoopAdamW) and adamw.defaults["cautious"]


# --- in a run ------------------------------------------------------------------------------------

VARIANTS = {
    "normuon": 'name = "normuon"\nlr = 0.02\nweight_decay = 0.1\nadamw_weight_decay = 0.1',
    "muon_polar_cautious": 'name = "muon"\nlr = 0.02\northogonalization = "polar_express"\n'
    "weight_decay = 0.1\ncautious_weight_decay = true",
    "adamw_cautious": 'name = "adamw"\nlr = 3e-3\ncautious_weight_decay = true',
}


def variant_run(folder, variant):
    """test_distributed's tiny run (global batch 8: 2 x 4 in one process, 4 in each of two), 6 steps
    straight in one process (grad_accum 2), with the variant's optimizer."""
    counting_tokens(folder / "data")
    text = DISTRIBUTED_RECIPE.format(data=folder / "data").replace(
        'name = "adamw"\nlr = 3e-3', VARIANTS[variant]
    )
    assert VARIANTS[variant] in text
    (folder / "tiny.toml").write_text(text)
    lab_run(folder, "one")


@pytest.mark.parametrize("variant", VARIANTS)
def test_resumes_bit_for_bit(variant, tmp_path, one_thread):
    variant_run(tmp_path, variant)
    lab_run(tmp_path, "resumed", "train.max_steps=3")
    lab_run(tmp_path, "resumed")
    assert_same_losses(tmp_path / "resumed", tmp_path / "one", grad_norm_rel=0)


@pytest.mark.slow  # torchrun, two processes
@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ddp_processes_log_one_process_losses(variant, tmp_path, one_thread):
    variant_run(tmp_path, variant)
    done = torchrun(tmp_path, "ddp")
    assert done.returncode == 0, done.stderr
    assert "x 1 accum x 2 processes (ddp)" in done.stdout
    assert_same_losses(tmp_path / "ddp", tmp_path / "one")
