"""Muon against a float64 transcription of the published algorithm (Keller Jordan's Muon,
github.com/KellerJordan/Muon and kellerjordan.github.io/posts/muon): momentum, Nesterov, quintic
Newton-Schulz, shape scaling and decoupled weight decay, written here from the description; and
its AdamW groups against torch.optim.AdamW."""

import pytest
import torch

from lab_optim.muon import Muon, orthogonalize


def published_step_float64(weight, grad, momentum, lr, beta=0.95, weight_decay=0.0, steps=5):
    """One Muon step in float64: (new weight, new momentum)."""
    W, G, M = weight.double(), grad.double(), momentum.double()
    M = beta * M + (1 - beta) * G
    U = (1 - beta) * G + beta * M  # Nesterov
    X = U.T if U.shape[0] > U.shape[1] else U
    X = X / (torch.linalg.matrix_norm(X) + 1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    X = X.T if U.shape[0] > U.shape[1] else X
    scale = max(1.0, U.shape[0] / U.shape[1]) ** 0.5
    return W * (1 - lr * weight_decay) - lr * scale * X, M


@pytest.mark.parametrize("shape", [(24, 16), (16, 48)], ids=["tall", "wide"])
def test_two_steps_match_the_published_algorithm_in_float64(shape):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    optimizer = Muon(
        [
            {
                "params": [weight],
                "use_muon": True,
                "lr": 0.05,
                "momentum": 0.95,
                "nesterov": True,
                "ns_steps": 5,
                "weight_decay": 0.1,
            }
        ]
    )
    expected, momentum = weight.detach().double(), torch.zeros(shape, dtype=torch.float64)
    for _ in range(2):  # the second step uses the momentum the first left
        grad = torch.randn(shape)
        expected, momentum = published_step_float64(expected, grad, momentum, lr=0.05, weight_decay=0.1)
        weight.grad = grad
        optimizer.step()
        change = expected - weight.detach().double()
        assert (change.abs().max() / expected.abs().max()).item() < 1e-5
    assert (optimizer.state[weight]["momentum_buffer"].double() - momentum).abs().max() < 1e-6


def test_newton_schulz_flattens_the_singular_values():
    torch.manual_seed(0)
    g = torch.randn(32, 64) @ torch.diag(torch.logspace(-2, 1, 64))  # singular values over 3 decades
    s = torch.linalg.svdvals(orthogonalize(g).double())
    assert s.min() > 0.6 and s.max() < 1.25  # ~1: the published iteration's band, not exactly 1
    stacked = orthogonalize(torch.stack([g, 2 * g]))  # a stack of matrices (experts) is done matrix by matrix
    torch.testing.assert_close(stacked[0], orthogonalize(g), rtol=1e-5, atol=1e-6)
    bf16 = orthogonalize(g, dtype=torch.bfloat16).float()  # what the published code runs on GPUs
    assert (bf16 - orthogonalize(g)).abs().max() < 0.05


def test_the_adamw_groups_step_as_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(10, 6)), torch.nn.Parameter(torch.randn(10, 6))
    b.data.copy_(a.data)
    ours = Muon(
        [
            {
                "params": [a],
                "use_muon": False,
                "lr": 0.01,
                "betas": (0.8, 0.95),
                "eps": 1e-10,
                "weight_decay": 0.1,
            }
        ]
    )
    theirs = torch.optim.AdamW([b], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(10, 6)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --- in a run: groups by role, DDP, resume, FSDP2 refused ----------------------------------------

from pathlib import Path  # noqa: E402

from test_distributed import RECIPE as DISTRIBUTED_RECIPE  # noqa: E402
from test_distributed import assert_same_losses, lab_run, torchrun  # noqa: E402
from tiny import counting_tokens  # noqa: E402

from lab.commands.cli import main  # noqa: E402
from lab.model import GPT  # noqa: E402
from lab.recipe import load_recipe  # noqa: E402
from lab.roles import build_optimizer  # noqa: E402

LLAMA_STYLE = Path(__file__).resolve().parent.parent / "recipes" / "llama_style.toml"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tied):
    recipe = load_recipe(
        LLAMA_STYLE,
        [
            "model.n_layer=2",
            "model.n_embd=32",
            "model.n_head=4",
            "model.vocab_size=64",
            "model.mlp.multiple_of=16",
            f"model.tie_embeddings={str(tied).lower()}",
            "optimizer.name=muon",
            "optimizer.lr=0.03",
            "optimizer.embedding_lr=0.02",
            "optimizer.head_lr=0.005",
            "optimizer.adamw_lr=0.001",
        ],
    )
    model = GPT(recipe)
    groups = {g["name"]: g for g in build_optimizer(recipe.parts["optimizer"], model).param_groups}
    named = {id(p): n for n, p in model.named_parameters()}
    members = {name: sorted(named[id(p)] for p in g["params"]) for name, g in groups.items()}
    assert members["muon"] == sorted(
        n for n, p in model.named_parameters() if n.startswith("blocks") and p.dim() == 2
    )
    assert members["embedding"] == ["tok_emb.weight"]
    assert members.get("head") == (None if tied else ["head.weight"])
    assert members["adamw"] == sorted(n for n, p in model.named_parameters() if p.dim() == 1)
    assert [groups[n]["lr"] for n in ("muon", "embedding", "adamw")] == [0.03, 0.02, 0.001]
    assert groups["muon"]["use_muon"] and not groups["embedding"]["use_muon"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """test_distributed's tiny run (global batch 8: 2 x 4 in one process, 4 in each of two), with Muon."""
    folder = tmp_path_factory.mktemp("muon")
    data = folder / "data"
    counting_tokens(data)
    text = DISTRIBUTED_RECIPE.format(data=data).replace(
        'name = "adamw"\nlr = 3e-3', 'name = "muon"\nlr = 0.02'
    )
    assert 'name = "muon"' in text
    (folder / "tiny.toml").write_text(text)
    return folder


@pytest.mark.slow  # torchrun, two processes
def test_muon_resumes_exactly_and_two_ddp_processes_log_one_process_losses(folder, one_thread):
    lab_run(folder, "one")  # 6 steps straight, grad_accum 2
    lab_run(folder, "resumed", "train.max_steps=3")
    lab_run(folder, "resumed")
    assert_same_losses(folder / "resumed", folder / "one", grad_norm_rel=0)  # bit for bit: same process
    done = torchrun(folder, "ddp")
    assert done.returncode == 0, done.stderr
    assert "x 1 accum x 2 processes (ddp)" in done.stdout
    assert_same_losses(folder / "ddp", folder / "one")


def test_muon_under_fsdp2_is_refused_when_the_recipe_is_read(folder, capsys):
    assert main(["recipe", str(folder / "tiny.toml"), "--set", "train.parallel=fsdp"]) == 2
    err = capsys.readouterr().err
    assert (
        'tiny.toml [train] parallel = "fsdp"' in err and "optimizer 'muon'" in err and "Traceback" not in err
    )
    assert 'train.parallel = "ddp"' in err
