"""The mixture-of-experts MLP against a dense, token-by-token reference in float64, its router
losses against their formulas, and a bad top_k caught when the recipe is read."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lab.plugins import registry
from lab.recipe import ModelConfig
from lab.testing import build

MODEL = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, bias=False)


def moe(**settings):
    return build(registry().get("mlp", "moe"), MODEL, **settings)


def per_token_float64(m, x):
    """Each token on its own: softmax over the experts, its top_k, their outputs mixed."""
    out = []
    for token in x.reshape(-1, x.size(-1)).double():
        probs = (m.router.weight.double() @ token).softmax(-1)
        weights, experts = probs.topk(m.top_k)
        if m.config.normalize:
            weights = weights / weights.sum()
        y = torch.zeros_like(token)
        for w, e in zip(weights, experts):
            h = token @ m.w_fc[e].double().T
            h = F.gelu(h, approximate="tanh") if m.config.activation == "gelu" else F.relu(h) ** 2
            y += w * (h @ m.w_proj[e].double().T)
        out.append(y)
    return torch.stack(out).view(x.shape)


@pytest.mark.parametrize(
    "settings",
    [{}, {"top_k": 1, "normalize": False, "activation": "relu2"}, {"n_experts": 4, "top_k": 4}],
    ids=["top2of8", "switch_top1", "all"],
)
def test_moe_equals_the_dense_per_token_reference(settings):
    torch.manual_seed(0)
    m = moe(**settings).eval()
    with torch.no_grad():
        m.w_proj.normal_(0, 0.2)  # outputs of a size that shows a misrouted token
    x = torch.randn(3, 7, 32)
    y = m(x)
    expected = per_token_float64(m, x)
    assert ((y.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_the_balance_loss_is_switchs_formula_and_one_when_uniform():
    torch.manual_seed(0)
    m = moe(n_experts=4, top_k=2)
    probs = torch.rand(10, 4).softmax(-1)
    experts = probs.topk(2, dim=-1).indices
    share = torch.stack([(experts == e).sum() for e in range(4)]).double() / experts.numel()
    expected = 4 * (share * probs.double().mean(0)).sum()
    assert abs(m.balance_loss(probs, experts).item() - expected.item()) < 1e-6
    uniform = torch.full((8, 4), 0.25)
    assert m.balance_loss(uniform, torch.tensor([[0, 1], [2, 3]] * 4)).item() == pytest.approx(1.0)
    logits = torch.randn(10, 4)
    assert m.z_loss(logits).item() == pytest.approx((torch.logsumexp(logits.double(), -1) ** 2).mean().item())


def test_active_parameters_count_top_k_experts():
    m = moe()  # 8 experts of hidden 64 at n_embd 32, top 2
    assert m.active_params() == 32 * 8 + 2 * (32 * 64 + 64 * 32)
    assert sum(p.numel() for p in m.parameters()) == 32 * 8 + 8 * (32 * 64 + 64 * 32)


def test_top_k_above_n_experts_is_a_recipe_error(gpt_small_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lab",
            "recipe",
            gpt_small_path,
            "--set",
            "model.mlp.name=moe",
            "--set",
            "model.mlp.n_experts=4",
            "--set",
            "model.mlp.top_k=5",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        "gpt_small.toml [model.mlp]" in done.stderr
        and "top_k (5) must be at most n_experts (4)" in done.stderr
    )


# --- in a run: the balance loss in metrics.jsonl, exact resume, cached generation, MFU -------------


from tiny import tiny_recipe, write_tiny_run  # noqa: E402

from lab.commands.cli import main  # noqa: E402
from lab.inference.sampling import generate  # noqa: E402
from lab.model import GPT  # noqa: E402
from lab.recipe import load_recipe  # noqa: E402
from lab.runs.metrics import read_metrics  # noqa: E402

RECIPE = tiny_recipe(
    "moe",
    """
[schedule]
name = "cosine"
warmup_steps = 2
[train]
batch_size = 2
grad_accum = 2
max_steps = 6
eval_interval = 3
eval_batches = 1
log_interval = 3
checkpoint_interval = 3
device = "cpu"
[generate]
num_samples = 1
max_new_tokens = 4
""",
).replace('name = "gelu"', 'name = "moe"\nn_experts = 4\nz_loss_coef = 0.001')


@pytest.fixture
def run_recipe(tmp_path):
    return write_tiny_run(tmp_path, RECIPE, file="moe.toml")


def records(run_dir):
    timing = ("tokens_per_s", "mfu", "elapsed")  # wall-clock figures differ between any two runs
    return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run_dir / "metrics.jsonl")]


def test_moe_trains_with_its_router_losses_logged_and_resumes_exactly(run_recipe, tmp_path, capsys):
    torch.set_num_threads(1)
    assert main(["run", run_recipe, "--set", f"train.out_dir={tmp_path / 'straight'}"]) == 0
    out = capsys.readouterr().out
    assert "active per token" in out  # MFU and FLOPs from the active parameters
    assert (
        main(
            [
                "run",
                run_recipe,
                "--set",
                f"train.out_dir={tmp_path / 'resumed'}",
                "--set",
                "train.max_steps=3",
            ]
        )
        == 0
    )
    assert main(["run", run_recipe, "--set", f"train.out_dir={tmp_path / 'resumed'}"]) == 0
    straight = records(tmp_path / "straight")
    assert straight == records(tmp_path / "resumed")  # bit for bit
    steps = [r for r in straight if "loss" in r]
    assert len(steps) == 6 and all(
        0.9 * 2 <= r["loss.balance"] < 4 * 2 for r in steps
    )  # ~1 per layer, 2 layers
    assert all(r["loss.router_z"] > 0 and 0.25 <= r["expert_max_share"] <= 1 for r in steps)
    assert any("val_loss.balance" in r for r in straight)


def test_moe_decodes_with_the_kv_cache_as_without(gpt_small_path):
    recipe = load_recipe(
        gpt_small_path,
        [
            "model.n_layer=2",
            "model.n_embd=32",
            "model.n_head=2",
            "model.block_size=32",
            "model.mlp.name=moe",
            "model.mlp.n_experts=4",
        ],
    )
    torch.manual_seed(0)
    model = GPT(recipe).eval()
    assert model.active_params() < model.num_params()
    idx = torch.randint(0, 50257, (2, 5))
    assert torch.equal(
        generate(model, idx, 12, temperature=0), generate(model, idx, 12, temperature=0, use_cache=False)
    )
