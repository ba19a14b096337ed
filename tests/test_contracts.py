"""The contracts that reach across slots, tried with small components written here as a third-party
package would write them: a top-2 mixture of experts with a load-balancing loss (extra loss terms,
logged scalars, its own parameter role, active parameters), a role-grouping optimizer, and the
mistakes a plugin author can make."""

import math
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from tiny import TRAIN
from torch import nn

from lab import hookimpl
from lab.commands.cli import main
from lab.errors import LabError
from lab.extras import add_loss, collecting, log_scalar
from lab.model import GPT
from lab.plugins import build_registry
from lab.recipe import load_recipe
from lab.roles import build_optimizer, declare_role, parameters, set_role
from lab.runs.metrics import read_metrics
from lab.testing import cases

ROUTER = declare_role("router", "a mixture of experts' router matrix")


class MoEConfig(BaseModel):
    extra_settings: ClassVar[list[dict]] = [{"experts": 8, "top_k": 1}]  # checked beside the defaults
    experts: int = Field(4, description="experts per layer")
    top_k: int = Field(2, description="experts per token")
    balance: float = Field(0.01, description="weight of the load-balancing loss")
    broken: str = Field(
        "", description="for the tests: 'detach', 'nan' or 'vector' breaks the loss on purpose"
    )


class MoE(nn.Module):
    """Top-k mixture of ReLU^2 experts, with Switch Transformer's load-balancing loss."""

    def __init__(self, config: MoEConfig, model):
        super().__init__()
        self.config, hidden = config, 2 * model.n_embd
        self.router = set_role(nn.Linear(model.n_embd, config.experts, bias=False), ROUTER)
        self.up = nn.Parameter(torch.randn(config.experts, model.n_embd, hidden) * 0.02)
        self.down = nn.Parameter(torch.randn(config.experts, hidden, model.n_embd) * 0.02)
        set_role(self, "matrix", "up", "down")

    def init_weights(self):
        nn.init.normal_(self.up, std=0.02)
        nn.init.normal_(self.down, std=0.02)

    def forward(self, x):
        probs = self.router(x).float().softmax(-1)  # (B, T, E)
        weights, chosen = probs.topk(self.config.top_k, dim=-1)  # (B, T, k)
        y = torch.zeros_like(x)
        for slot in range(self.config.top_k):
            up, down = self.up[chosen[..., slot]], self.down[chosen[..., slot]]  # (B, T, C, H), (B, T, H, C)
            h = F.relu(torch.einsum("btc,btch->bth", x, up)).square()
            y = y + weights[..., slot, None].to(x.dtype) * torch.einsum("bth,bthc->btc", h, down)
        # Switch's balance loss: E * sum_e (share of tokens routed to e) * (mean router prob of e)
        share = F.one_hot(chosen[..., 0], self.config.experts).float().mean((0, 1))
        balance = self.config.experts * (share * probs.mean((0, 1))).sum()
        if self.config.broken == "detach":
            balance = balance.detach()
        elif self.config.broken == "nan":
            balance = balance * float("nan")
        elif self.config.broken == "vector":
            balance = probs.mean((0, 1))
        add_loss(self, "balance", balance, self.config.balance)
        if self.config.broken in ("tokens", "val_acc"):  # names metrics.jsonl keeps for lab's own numbers
            log_scalar(self, self.config.broken, 1.0)
        log_scalar(self, "router_entropy", -(probs * probs.clamp_min(1e-9).log()).sum(-1).mean())
        return y

    def active_params(self):
        per_expert = self.up[0].numel() + self.down[0].numel()
        return self.router.weight.numel() + self.config.top_k * per_expert


class PerRoleConfig(BaseModel):
    lr: float = 1e-2


def per_role_sgd(config, params, model):
    """One group per role, each named after it: what a role-aware optimizer does."""
    roles = sorted({p.role for p in params})
    return torch.optim.SGD(
        [
            {
                "name": r,
                "params": [p.param for p in params if p.role == r],
                "lr": config.lr * (2 if r == "router" else 1),
            }
            for r in roles
        ],
        lr=config.lr,
    )


class WholeConfig(BaseModel):
    works_on_shards: ClassVar[bool] = False
    lr: float = 1e-2


class MuonConfig(BaseModel):
    works_on_shards: ClassVar[bool] = False  # orthogonalises whole matrices: not on FSDP2 shards
    lr: float = Field(0.02, description="lr of the hidden matrices")
    adam_lr: float = Field(3e-3, description="lr of everything else (AdamW)")
    momentum: float = 0.95


def newton_schulz(G, steps=5):
    """The nearest semi-orthogonal matrix to G, roughly (Muon's quintic iteration)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm() + 1e-7)
    tall = X.size(0) > X.size(1)
    X = X.T if tall else X
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Muon for the hidden matrices (role matrix, rank 2), AdamW for every other role."""

    def __init__(self, config, params):
        matrices = [p.param for p in params if p.role == "matrix" and p.param.dim() == 2]
        others = [p.param for p in params if not (p.role == "matrix" and p.param.dim() == 2)]
        super().__init__(
            [
                {"name": "muon", "params": matrices, "lr": config.lr, "kind": "muon"},
                {"name": "adamw", "params": others, "lr": config.adam_lr, "kind": "adamw"},
            ],
            dict(momentum=config.momentum),
        )

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["kind"] == "muon":
                    buf = state.setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                    p.add_(newton_schulz(p.grad + group["momentum"] * buf), alpha=-group["lr"] * scale)
                else:
                    state.setdefault("step", torch.zeros(()))
                    m, v = (
                        state.setdefault("m", torch.zeros_like(p)),
                        state.setdefault("v", torch.zeros_like(p)),
                    )
                    state["step"] += 1
                    m.lerp_(p.grad, 0.1)
                    v.lerp_(p.grad.square(), 0.05)
                    t = state["step"].item()
                    p.addcdiv_(m / (1 - 0.9**t), (v / (1 - 0.95**t)).sqrt() + 1e-8, value=-group["lr"])


class Package:
    @hookimpl
    def lab_components(self, register):
        register("mlp", "toy_moe", MoE, MoEConfig, "top-2 MoE with a balance loss")
        register("optimizer", "per_role", per_role_sgd, PerRoleConfig, "SGD, a group per role")
        register("optimizer", "whole", per_role_sgd, WholeConfig, "needs whole parameters")
        # "toy_muon": lab ships a real "muon" (issue 14); this one is a third party's, written from the docs
        register(
            "optimizer",
            "toy_muon",
            lambda config, params, model: Muon(config, params),
            MuonConfig,
            "Muon for hidden matrices, AdamW for the rest",
        )


@pytest.fixture(scope="module")
def plugins():
    return build_registry({"lab-toy": Package()}, warn=False)


@pytest.fixture
def run_recipe(tiny_run):
    """write(extra TOML) -> the path of a tiny recipe on counting data, 4 steps (conftest's tiny_run)."""
    return lambda rest="": tiny_run(TRAIN + rest)


def edit(path, old, new):
    text = open(path).read()
    assert old in text
    open(path, "w").write(text.replace(old, new))


def small(plugins, mlp="toy_moe", **settings):
    from lab.recipe import resolve

    raw = {
        "model": {
            "vocab_size": 64,
            "block_size": 16,
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 16,
            "tie_embeddings": False,
            "loss_chunk": 0,
            "attention": {"name": "sdpa"},
            "mlp": {"name": mlp, **settings},
            "norm": {"name": "layernorm"},
            "position": {"name": "learned"},
        },
        "tokenizer": {"name": "gpt2"},
        "data": {"name": "memmap"},
        "optimizer": {"name": "adamw"},
        "schedule": {"name": "cosine"},
    }
    return resolve(raw, "small.toml", plugins=plugins)


# --- parameter roles ---------------------------------------------------------------------------


def test_adamw_groups_from_roles_are_gpt2s_rank_rule(gpt_small_path):
    recipe = load_recipe(gpt_small_path, ["model.n_layer=2", "model.n_embd=64", "model.n_head=2"])
    model = GPT(recipe)
    optimizer = build_optimizer(recipe.parts["optimizer"], model)
    decay, no_decay = ({id(p) for p in g["params"]} for g in optimizer.param_groups)
    params = [p for p in model.parameters()]
    assert decay == {id(p) for p in params if p.dim() >= 2}
    assert no_decay == {id(p) for p in params if p.dim() < 2}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_an_optimizer_part_built_from_the_model_alone_gets_the_roles(gpt_small_path):
    # Scripts written before parameter roles call part.build(model), as the first wave's optimizers took.
    recipe = load_recipe(gpt_small_path, ["model.n_layer=2", "model.n_embd=64", "model.n_head=2"])
    model = GPT(recipe)
    old, new = recipe.parts["optimizer"].build(model), build_optimizer(recipe.parts["optimizer"], model)
    assert [[id(p) for p in g["params"]] for g in old.param_groups] == [
        [id(p) for p in g["params"]] for g in new.param_groups
    ]


def test_roles_of_a_gpt(plugins):
    model = GPT(small(plugins))
    roles = {p.name: p.role for p in parameters(model)}
    assert roles["tok_emb.weight"] == "embedding" and roles["head.weight"] == "head"
    assert roles["position.wpe.weight"] == "position"
    assert roles["blocks.0.mlp.router.weight"] == "router" and roles["blocks.0.mlp.up"] == "matrix"
    assert roles["blocks.0.attn.qkv.weight"] == "matrix" and roles["blocks.0.attn.qkv.bias"] == "bias"
    assert roles["blocks.0.norm_1.weight"] == "gain" and roles["norm_f.bias"] == "bias"
    assert sorted(roles) == sorted(n for n, _ in model.named_parameters())


def test_an_unknown_role_names_the_component_and_the_fix(plugins):
    class Typo(MoE):
        def __init__(self, config, model):
            super().__init__(config, model)
            set_role(self.router, "matirx")

    class P:
        @hookimpl
        def lab_components(self, register):
            register("mlp", "typo", Typo, MoEConfig, "")

    with pytest.raises(
        LabError,
        match=r"mlp 'typo' from package 'lab-typo': unknown parameter role 'matirx'. "
        r"Did you mean 'matrix'\?.*declare_role",
    ):
        GPT(small(build_registry({"lab-typo": P()}, warn=False), mlp="typo"))


def test_every_groups_lr_is_logged(plugins, run_recipe, tmp_path, monkeypatch):
    import lab.plugins

    monkeypatch.setattr(lab.plugins, "_registry", plugins)
    path = run_recipe()
    text = (
        open(path)
        .read()
        .replace('name = "gelu"', 'name = "toy_moe"')
        .replace('name = "adamw"\nlr = 3e-3', 'name = "per_role"')
    )
    open(path, "w").write(text)
    assert main(["run", path]) == 0
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert {"lr.router", "lr.matrix", "lr.gain", "lr.bias", "lr.embedding"} <= set(steps[0])
    assert math.isclose(steps[0]["lr.router"], 2 * steps[0]["lr.matrix"])


def test_an_optimizer_that_needs_whole_parameters_refuses_fsdp(plugins, run_recipe, monkeypatch, capsys):
    import lab.plugins

    monkeypatch.setattr(lab.plugins, "_registry", plugins)
    path = run_recipe()
    text = open(path).read().replace('name = "adamw"\nlr = 3e-3', 'name = "whole"')
    open(path, "w").write(text.replace('device = "cpu"', 'device = "cpu"\nparallel = "fsdp"'))
    for command in ("recipe", "run"):
        assert main([command, path]) == 2
        err = capsys.readouterr().err
        assert "optimizer 'whole' from package 'lab-toy' needs whole parameters" in err
        assert 'train.parallel = "ddp"' in err and "Traceback" not in err


# --- extra losses ------------------------------------------------------------------------------


def test_extra_loss_terms_and_scalars_reach_metrics(plugins, run_recipe, tmp_path, monkeypatch, capsys):
    import lab.plugins

    monkeypatch.setattr(lab.plugins, "_registry", plugins)
    path = run_recipe()
    edit(path, 'name = "gelu"', 'name = "toy_moe"')
    assert main(["run", path]) == 0
    out = capsys.readouterr().out
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    # the balance loss of 2 layers (each about 1 when the router is balanced), and the entropy of 4 experts
    assert all(1.0 < r["loss.balance"] < 4.0 and 0 < r["router_entropy"] <= math.log(4) + 1e-6 for r in steps)
    assert all("val_loss.balance" in r for r in evals)
    assert "loss.balance" in out and "router_entropy" in out
    assert "active per token" in out


@pytest.mark.parametrize(
    "broken, message",
    [
        (
            "nan",
            r"mlp 'toy_moe' from package 'lab-toy' gave the extra loss term 'balance' = nan at step 1.*finite",
        ),
        (
            "vector",
            r"mlp 'toy_moe' from package 'lab-toy' added the extra loss 'balance' as \(4,\), not a scalar",
        ),
        # The token count `lab compare` plots against: a scalar of that name would overwrite it.
        ("tokens", r"mlp 'toy_moe' from package 'lab-toy' logs a scalar called 'tokens', a name metrics"),
        ("val_acc", r"mlp 'toy_moe' from package 'lab-toy' logs a scalar called 'val_acc', a name metrics"),
    ],
)
def test_a_bad_extra_loss_stops_with_a_message_and_touches_no_checkpoint(
    plugins, run_recipe, tmp_path, monkeypatch, capsys, broken, message
):
    import lab.plugins

    monkeypatch.setattr(lab.plugins, "_registry", plugins)
    path = run_recipe()
    edit(path, 'name = "gelu"', f'name = "toy_moe"\nbroken = "{broken}"')
    assert main(["run", path]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_extra_loss_gradient_is_scaled_like_the_loss_under_grad_accum(plugins):
    """The trainer's micro-steps: grad_accum = 2 on halves gives the whole batch's gradient of
    CE + weight * balance (both are means over the batch's tokens... the balance loss is not linear
    in the batch, so the reference is the mean of the two halves' gradients)."""
    [case] = [c for c in cases("mlp", "toy_moe", plugins) if str(c) == "mlp-toy_moe-extra_loss_gradients"]
    case()


def test_the_extra_loss_check_catches_a_detached_loss(plugins):
    class P:
        @hookimpl
        def lab_components(self, register):
            register("mlp", "detached", lambda c, m: MoE(MoEConfig(broken="detach"), m), MoEConfig, "")

    broken = build_registry({"lab-broken": P()}, warn=False)
    [case] = [c for c in cases("mlp", "detached", broken) if str(c) == "mlp-detached-extra_loss_gradients"]
    with pytest.raises(AssertionError, match="no gradient"):
        case()


def test_collecting_a_component_on_its_own():
    from lab.recipe import ModelConfig

    moe = MoE(MoEConfig(), ModelConfig(n_embd=16, n_head=2))
    x = torch.randn(2, 5, 16)
    moe(x)  # outside a model and outside collecting: the calls do nothing
    with collecting(moe) as extras:
        moe(x)
    assert set(extras.terms) == {"balance"} and set(extras.scalars) == {"router_entropy"}
    assert extras.weights["balance"] == 0.01


def test_mfu_counts_active_parameters(plugins):
    model = GPT(small(plugins))
    moe = model.blocks[0].mlp
    per_expert = moe.up[0].numel() + moe.down[0].numel()
    inactive = 2 * (4 - 2) * per_expert  # 2 layers, 2 of 4 experts unused per token
    assert model.active_params() == model.num_params() - inactive


def test_extras_survive_torch_compile(plugins):
    model = GPT(small(plugins))
    x = torch.randint(0, 64, (2, 16))
    eager = model(x, x)[1] + model.extras.loss()
    eager_terms = model.extras.values()
    compiled = torch.compile(model, backend="aot_eager")
    total = compiled(x, x)[1] + model.extras.loss()
    torch.testing.assert_close(total, eager)
    assert set(model.extras.values()) == set(eager_terms)


def test_declared_extra_settings_are_checked_too(plugins):
    ids = [str(c) for c in cases("mlp", "toy_moe", plugins)]
    assert "mlp-toy_moe-extra_loss_gradients" in ids
    assert "mlp-toy_moe[experts=8,top_k=1]-extra_loss_gradients" in ids
    [case] = [
        c
        for c in cases("mlp", "toy_moe", plugins)
        if str(c) == "mlp-toy_moe[experts=8,top_k=1]-token_map_per_token"
    ]
    case()
    # and settings given by hand replace them
    ids = [str(c) for c in cases("mlp", "toy_moe", plugins, settings={"experts": 2})]
    assert ids and all("toy_moe[experts=2]" in i for i in ids)


def test_a_muon_written_from_the_docs_passes_the_optimizer_checks(plugins, capsys):
    for case in cases("optimizer", "toy_muon", plugins):
        case()
    assert (
        "optimizer 'toy_muon' groups roles as {'muon': ['matrix'], 'adamw': ['bias', 'embedding', 'gain', 'head'"
        in capsys.readouterr().out
    )
