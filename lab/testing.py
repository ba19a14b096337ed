"""Conformance checks: what every component of a slot must do, whoever wrote it.

lab's own test suite runs them over every installed component, and a plugin's test suite can run
them over its own:

    from lab.testing import check
    def test_conforms():
        check("attention", "mine")      # every check for that component; AssertionError on a failure

or, one pytest case per check (for every installed component when slot and name are left out):

    import pytest
    from lab.testing import cases
    @pytest.mark.parametrize("case", cases("attention", "mine"), ids=str)
    def test_conformance(case):
        case()

To check a plugin before it is installed: cases(..., plugins=build_registry({"my-package": module})).
A check that cannot apply raises unittest.SkipTest (pytest shows a skip, with the reason): an
attention that refuses a position with a LabError (linear attention has no scores for ALiBi to
bias), or a data source whose default settings need files that are not there.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import unittest
from dataclasses import dataclass
from typing import Callable

import torch
from pydantic import BaseModel

from lab.attention import SelfAttention
from lab.errors import LabError
from lab.extras import collecting
from lab.interfaces import DataContext, Extension, Position
from lab.plugins import Component, Registry, registry
from lab.recipe import ModelConfig, Part
from lab.slots import SLOTS

# Small enough to run every check in well under a second on a CPU.
MODEL = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
# Grouped-query attention with QK-norm: 4 query heads share 2 key/value heads.
GQA = MODEL.model_copy(update={"n_kv_head": 2, "qk_norm": True})
B, T = 2, 12
SCHEDULE_STEPS = 100
TEXTS = ["Hello, world!", "  two  spaces,\ttabs\nand lines\n\n", "naïve café — 東京 🙂", ""]


@dataclass(frozen=True)
class Case:
    """One check of one component, callable with no arguments; str() is its test id."""

    id: str
    run: Callable[[], None]

    def __call__(self):
        self.run()

    def __str__(self):
        return self.id


def assert_close_to_scale(
    actual, expected, tol: float, what: str = "values", scale: float | None = None
) -> None:
    """Fail unless every |actual - expected| <= tol x the values' scale (by default the largest |expected|).

    Why the scale and not a fixed number: two float32 computations of one thing (two kernels, or one
    kernel on another CPU: AVX-512, AVX2 and NEON sum in other orders and blocks) differ by rounding
    that grows with the size of the values, so an absolute 1e-5 that holds for values of ~1 fails
    for logits of ~3 on another CPU. Nor elementwise: an entry near zero is the cancellation of larger
    terms and carries their rounding. Pass `scale` when the terms were larger than the result (a dot
    product of long vectors: |q| |k|)."""
    actual, expected = torch.as_tensor(actual).detach().double(), torch.as_tensor(expected).detach().double()
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    )
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= tol * scale, (
        f"{what}: the largest difference, {error:.3g}, is more than {tol:g} x the values' scale {scale:.3g}"
    )


def build(component: Component, *args, **settings):
    """The component built from its Config's defaults (plus settings), type-checked like in a recipe. A
    setting with no default (a tokenizer's file) takes the first of its Field's `examples`."""
    examples = {
        key: field.examples[0]
        for key, field in component.Config.model_fields.items()
        if field.is_required() and field.examples
    }
    return Part(component, component.Config(**{**examples, **settings})).build(*args)


def made(component: Component, *args, **settings):
    """build(), for a check: a factory that refuses these settings with a LabError (an attention
    without grouped heads, a pairing that cannot work) makes the check a skip with its reason."""
    try:
        return build(component, *args, **settings)
    except LabError as e:
        raise unittest.SkipTest(f"{component.slot} '{component.name}' refuses these settings: {e}") from None


def _seeded(check):
    """Each check starts from seed 0 and leaves the caller's random state as it was."""

    @functools.wraps(check)
    def run(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return check(*args, **kwargs)

    return run


def _changes(before, after, what):
    assert not torch.equal(before, after), f"{what} did not change"


def _all_gradients(module, what):
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    for n, p in params:
        assert p.grad is not None, f"{what}: parameter {n} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{what}: parameter {n} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{what}: parameter {n} has an all-zero gradient"


# --- attention ---------------------------------------------------------------------------------


def _attention_input():
    return torch.randn(B, T, MODEL.n_embd), torch.arange(T)


def _run_attention(attn, x, pos, position, what):
    try:
        return attn(x, pos, position)
    except LabError as e:  # a clear refusal is an answer: this pairing cannot work
        raise unittest.SkipTest(f"{what} refuses this pairing: {e}") from None


@_seeded
def attention_shapes(component, position: Position | None = None, model: ModelConfig = MODEL):
    attn, x_pos = made(component, model), _attention_input()
    y = _run_attention(attn, *x_pos, position or Position(), component.name)
    assert y.shape == (B, T, MODEL.n_embd), f"output shape {tuple(y.shape)}, expected {(B, T, MODEL.n_embd)}"
    assert torch.isfinite(y).all(), "output has inf or nan"


@_seeded
def attention_causality(component, position: Position | None = None, model: ModelConfig = MODEL):
    """Changing token t changes no output before t, and does change the output at t."""
    position = position or Position()
    attn, (x, pos) = made(component, model).eval(), _attention_input()
    y = _run_attention(attn, x, pos, position, component.name)
    t = T // 2
    x2 = x.clone()
    x2[:, t] = torch.randn(B, MODEL.n_embd)
    y2 = attn(x2, pos, position)
    assert_close_to_scale(y2[:, :t], y[:, :t], 1e-5, "a future token changed an earlier output")
    _changes(y[:, t], y2[:, t], f"the output at token {t} after changing token {t}")


@_seeded
def attention_gradients(component):
    """Every parameter gets a gradient from the output, or from a loss term the attention adds
    (lab.extras): a parameter only an extra loss reaches (a router's balance) counts too."""
    attn, (x, pos) = made(component, MODEL).train(), _attention_input()
    x.requires_grad_(True)
    with collecting(attn) as extras:
        y = attn(x, pos, Position())
    (y.square().sum() + extras.loss()).backward()
    _all_gradients(attn, component.name)
    assert x.grad is not None and x.grad.abs().sum() > 0, "no gradient reached the input"


@_seeded
def attention_dtypes(component):
    """float32 and bfloat16 run on CPU, return their own dtype, and roughly agree."""
    attn, (x, pos) = made(component, MODEL).eval(), _attention_input()
    reference = attn(x, pos, Position())
    for dtype in (torch.float32, torch.bfloat16):
        y = copy.deepcopy(attn).to(dtype)(x.to(dtype), pos, Position())
        assert y.dtype == dtype, f"{dtype} input gave {y.dtype} output"
        assert torch.isfinite(y).all(), f"{dtype} output has inf or nan"
        # bfloat16 keeps 8 bits: ~0.4% per rounding, a few percent of the scale after a sum
        assert_close_to_scale(y.float(), reference, 5e-2, f"{dtype} output against float32's")


@_seeded
def attention_cached_decoding(component, position: Position | None = None, model: ModelConfig = MODEL):
    """A prefill, then one token at a time through new_cache, gives the full forward's outputs."""
    position = position or Position()
    attn, (x, pos) = made(component, model).eval(), _attention_input()
    full = _run_attention(attn, x, pos, position, component.name)
    cache = attn.new_cache(B, T, x.device, x.dtype)
    prefill = 5
    steps = [attn(x[:, :prefill], pos[:prefill], position, cache)]
    for t in range(prefill, T):
        steps.append(attn(x[:, t : t + 1], pos[t : t + 1], position, cache))
    assert_close_to_scale(torch.cat(steps, dim=1), full, 1e-5, "cached decoding against the full forward")


def attention_with_position(component, position_component, model: ModelConfig = MODEL):
    """Forward, causality and cached decoding with a real position component (rope, alibi...)."""

    @_seeded
    def with_position():
        position = build(position_component, model).eval()
        attention_shapes(component, position, model)
        attention_causality(component, position, model)
        attention_cached_decoding(component, position, model)

    return with_position


@_seeded
def attention_grouped_query(component):
    """[model] n_kv_head = 2 of n_head = 4, with qk_norm: shapes, causality and cached decoding."""
    made(component, GQA)  # an attention without grouped heads refuses: a skip with its reason
    attention_shapes(component, model=GQA)
    attention_causality(component, model=GQA)
    attention_cached_decoding(component, model=GQA)


# --- position ----------------------------------------------------------------------------------


def _qk(dtype=torch.float32):
    shape = (B, MODEL.n_head, T, MODEL.head_dim)
    return torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)


@_seeded
def position_shapes(component):
    p, pos = made(component, MODEL), torch.arange(T)
    x = torch.randn(B, T, MODEL.n_embd)
    assert p.embed(x, pos).shape == x.shape, "embed changed the shape"
    for dtype in (torch.float32, torch.bfloat16):
        q, k = _qk(dtype)
        q2, k2 = p.rotate(q, k, pos)
        assert q2.shape == q.shape and k2.shape == k.shape, "rotate changed the shapes of q, k"
        assert q2.dtype == dtype and k2.dtype == dtype, f"rotate turned {dtype} into {q2.dtype}"
    for q_pos in (pos, pos[-1:]):  # a whole sequence; one new token against the cache
        bias = p.bias(q_pos, pos)
        if bias is not None:
            expected = (MODEL.n_head, len(q_pos), T)
            assert tuple(bias.shape) == expected, (
                f"bias shape {tuple(bias.shape)}, expected (nh, Tq, Tk) = {expected}"
            )
            assert torch.isfinite(bias).all(), "bias has inf or nan"


@_seeded
def position_grouped_heads(component):
    """Grouped-query attention hands rotate q with n_head heads and k with fewer (here 4 and 2):
    each is rotated as it would be alone."""
    p, pos = made(component, MODEL).eval(), torch.arange(T)
    q, k = _qk()
    k_few = k[:, :2]
    q2, k2 = p.rotate(q, k_few, pos)
    assert q2.shape == q.shape and k2.shape == k_few.shape, (
        f"rotate(q {tuple(q.shape)}, k {tuple(k_few.shape)}) gave {tuple(q2.shape)}, {tuple(k2.shape)}"
    )
    q_same, k_same = p.rotate(q, k, pos)
    assert_close_to_scale(
        q2, q_same, 1e-6, "q rotated beside fewer k heads, against q rotated beside as many"
    )
    assert_close_to_scale(
        k2, k_same[:, :2], 1e-6, "k with fewer heads, against the same heads rotated beside q's count"
    )


@_seeded
def position_rotate_preserves_norms(component):
    p, pos = made(component, MODEL), torch.arange(T)
    q, k = _qk()
    q2, k2 = p.rotate(q, k, pos)
    assert_close_to_scale(q2.norm(dim=-1), q.norm(dim=-1), 1e-5, "the norm of q after rotate")
    assert_close_to_scale(k2.norm(dim=-1), k.norm(dim=-1), 1e-5, "the norm of k after rotate")


@_seeded
def position_token_by_token(component):
    """What cached decoding relies on: the tokens at positions pos[t:t+1] are treated exactly as
    the t-th token of the whole sequence is."""
    p, pos = made(component, MODEL).eval(), torch.arange(T)
    x = torch.randn(B, T, MODEL.n_embd)
    q, k = _qk()
    whole_x, (whole_q, whole_k), whole_bias = p.embed(x, pos), p.rotate(q, k, pos), p.bias(pos, pos)
    for t in (0, T - 1):
        one = slice(t, t + 1)
        assert_close_to_scale(
            p.embed(x[:, one], pos[one]), whole_x[:, one], 1e-5, f"embed of token {t} alone"
        )
        q1, k1 = p.rotate(q[:, :, one], k[:, :, one], pos[one])
        assert_close_to_scale(q1, whole_q[:, :, one], 1e-5, f"rotate of token {t} alone (q)")
        assert_close_to_scale(k1, whole_k[:, :, one], 1e-5, f"rotate of token {t} alone (k)")
        if whole_bias is not None:
            assert_close_to_scale(
                p.bias(pos[one], pos), whole_bias[:, one], 1e-5, f"bias for query {t} alone"
            )


@_seeded
def position_max_len(component):
    """max_len is None (any length: far positions must work) or the positions it can place."""
    p = made(component, MODEL)
    limit = p.max_len
    assert limit is None or (isinstance(limit, int) and limit > 0), (
        f"max_len must be None or a positive int, got {limit!r}"
    )
    last = torch.tensor([limit - 1 if limit else 100 * MODEL.block_size])
    x = torch.randn(B, 1, MODEL.n_embd)
    q, k = (t[:, :, :1] for t in _qk())
    outputs = [p.embed(x, last), *p.rotate(q, k, last)]
    bias = p.bias(last, torch.cat([torch.zeros(1, dtype=torch.long), last]))
    for out in outputs + ([bias] if bias is not None else []):
        assert torch.isfinite(out).all(), f"non-finite output at position {last.item()}"


@_seeded
def position_gradients(component):
    p, pos = made(component, MODEL).train(), torch.arange(T)
    if not any(param.requires_grad for param in p.parameters()):
        raise unittest.SkipTest(f"position '{component.name}' has no parameters")
    q, k = _qk()
    q2, k2 = p.rotate(q, k, pos)
    loss = p.embed(torch.randn(B, T, MODEL.n_embd), pos).square().sum() + (q2 * k2).sum()
    bias = p.bias(pos, pos)
    (loss if bias is None else loss + bias.sum()).backward()
    _all_gradients(p, component.name)


# --- mlp and norm: per-token maps (B, T, C) -> (B, T, C) -------------------------------------


@_seeded
def token_map_shapes_and_dtypes(component):
    module, x = made(component, MODEL).eval(), torch.randn(B, T, MODEL.n_embd)
    reference = module(x)
    for dtype in (torch.float32, torch.bfloat16):
        y = copy.deepcopy(module).to(dtype)(x.to(dtype))
        assert y.shape == x.shape, f"output shape {tuple(y.shape)}, expected {tuple(x.shape)}"
        assert y.dtype == dtype, f"{dtype} input gave {y.dtype} output"
        assert torch.isfinite(y).all(), f"{dtype} output has inf or nan"
        # bfloat16 keeps 8 bits: ~0.4% per rounding, a few percent of the scale after a sum
        assert_close_to_scale(y.float(), reference, 5e-2, f"{dtype} output against float32's")


@_seeded
def token_map_per_token(component):
    """Changing token t changes output t only: a block that mixed tokens would break causality."""
    module, x = made(component, MODEL).eval(), torch.randn(B, T, MODEL.n_embd)
    t = T // 2
    x2 = x.clone()
    x2[:, t] = torch.randn(B, MODEL.n_embd)
    y, y2 = module(x), module(x2)
    others = [i for i in range(T) if i != t]
    assert_close_to_scale(
        y2[:, others], y[:, others], 1e-5, f"other tokens' outputs after changing token {t}"
    )
    _changes(y[:, t], y2[:, t], f"the output at token {t} after changing it")


@_seeded
def token_map_gradients(component):
    module, x = made(component, MODEL).train(), torch.randn(B, T, MODEL.n_embd, requires_grad=True)
    with collecting(module) as extras:  # a parameter only an extra loss term reaches gets its gradient
        y = module(x)
    # A weighted sum: the plain sum of a norm's output has zero gradient for x by construction.
    ((y * torch.randn(B, T, MODEL.n_embd)).sum() + extras.loss()).backward()
    _all_gradients(module, component.name)
    assert x.grad is not None and x.grad.abs().sum() > 0, "no gradient reached the input"


# --- schedule ----------------------------------------------------------------------------------


def schedule_pure(component):
    """lr(step) depends on the step only: any order of calls, any fresh instance, same values."""
    steps = list(range(SCHEDULE_STEPS + 10))
    forward = [made(component, SCHEDULE_STEPS)(s) for s in steps]
    schedule = made(component, SCHEDULE_STEPS)
    backward = [schedule(s) for s in reversed(steps)][::-1]
    assert forward == backward, "the schedule's value depends on the order of calls (hidden state?)"
    assert [schedule(s) for s in steps] == forward, "a second pass over the steps gave other values"


def schedule_finite_non_negative(component):
    schedule = made(component, SCHEDULE_STEPS)
    for step in range(SCHEDULE_STEPS + 10):
        value = schedule(step)
        assert isinstance(value, (int, float)), f"step {step}: a {type(value).__name__}, expected a float"
        assert math.isfinite(value) and value >= 0, f"step {step}: lr multiplier {value}"
    assert any(schedule(s) > 0 for s in range(SCHEDULE_STEPS)), "the multiplier is 0 at every step"


# --- optimizer ----------------------------------------------------------------------------------


def tiny_gpt(plugins: Registry | None = None, swap: Component | None = None, extensions=(), **model_settings):
    """A 2-layer GPT of the first installed component of every model slot (lab's own first, which
    are known to work together), or `swap` in its slot: the core's roles and the components'.
    extensions: Parts (or Components, with their defaults) for [extension.NAME]; model_settings
    change the [model] table."""
    from lab.model import GPT
    from lab.recipe import SECTIONS, Recipe

    plugins = plugins or registry()
    parts = {}
    for slot in ("attention", "mlp", "norm", "position"):
        found = plugins.components[slot]
        if not found:
            raise unittest.SkipTest(f"no {slot} component installed to build a GPT with")
        component = min(found.values(), key=lambda c: (c.package != "lab", c.name))
        parts[slot] = Part(component, component.Config())
    if swap is not None:
        parts[swap.slot] = Part(swap, swap.Config())
    # Every section at its defaults (a section added to recipes needs no change here), but the model's.
    sections = {key: section() for key, section in SECTIONS.items()}
    shape = dict(
        vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False, loss_chunk=0
    )
    sections["model"] = ModelConfig(**{**shape, **model_settings})
    extensions = [e if isinstance(e, Part) else Part(e, e.Config()) for e in extensions]
    return GPT(Recipe(name="tiny", source="lab.testing", parts=parts, extensions=extensions, **sections))


def _gpt_batch():
    idx = torch.randint(0, 64, (4, 16))
    return idx[:, :-1], idx[:, 1:]


def role_split(optimizer, params) -> dict[str, list[str]]:
    """{group name: the roles of its parameters}: how an optimizer grouped the roles."""
    role_of = {id(p.param): p.role for p in params}
    return {
        str(g.get("name", i)): sorted({role_of.get(id(p), "?") for p in g["params"]})
        for i, g in enumerate(optimizer.param_groups)
    }


def _build_optimizer(component, model):
    from lab.roles import parameters

    params = parameters(model)
    return made(component, params, model), params


@_seeded
def optimizer_roles(component):
    """On a tiny GPT: every trainable parameter is in exactly one group, and none is left out. The
    split of roles into groups is printed (pytest -s shows it)."""
    model = tiny_gpt()
    optimizer, params = _build_optimizer(component, model)
    counted: dict[int, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            counted[id(p)] = counted.get(id(p), 0) + 1
    for p in params:
        n = counted.get(id(p.param), 0)
        assert n == 1, f"parameter {p.name} (role {p.role}) is in {n} parameter groups, expected 1"
    print(f"optimizer '{component.name}' groups roles as {role_split(optimizer, params)}")


@_seeded
def optimizer_reduces_loss(component):
    model = tiny_gpt()
    optimizer, _ = _build_optimizer(component, model)
    x, y = _gpt_batch()

    def loss():
        return model(x, y)[1]

    start = loss().item()
    for _ in range(10):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < start, (
        f"10 steps on one batch took the loss from {start:.4f} to {loss().item():.4f}"
    )


@_seeded
def optimizer_state_round_trip(component):
    """What resume relies on: a fresh optimizer loaded from state_dict() takes the same next step."""
    model = tiny_gpt()
    x, y = _gpt_batch()
    optimizer, _ = _build_optimizer(component, model)
    for _ in range(3):
        optimizer.zero_grad()
        model(x, y)[1].backward()
        optimizer.step()
    twin = copy.deepcopy(model)
    twin_optimizer, _ = _build_optimizer(component, twin)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        m(x, y)[1].backward()
        opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), f"after loading the state, parameter {name} took a different step"


# --- scheduled quantities ([schedule.QUANTITY] tables), for attention, mlp and norm ----------------


@_seeded
def scheduled_quantities(component):
    """A component whose Config names quantities in its `scheduled` ClassVar gets them through its
    module's set_scheduled(quantity, share), before each step: at a small share it still gives a finite
    output of the right shape (an attention stays causal), and share 1 gives back the component as built."""
    quantities = component.Config.scheduled
    if not quantities:
        raise unittest.SkipTest(f"{component.slot} '{component.name}' takes no scheduled quantity")
    module = build(component, MODEL).eval()
    assert hasattr(module, "set_scheduled"), (
        f"its Config names the scheduled quantities {quantities}, but the module it builds has no "
        "set_scheduled(quantity, share) method"
    )
    x, pos = _attention_input()
    attention = component.slot == "attention"

    def run(inputs):
        return (
            _run_attention(module, inputs, pos, Position(), component.name) if attention else module(inputs)
        )

    full = run(x)
    for quantity in quantities:
        module.set_scheduled(quantity, 1 / 64)
        small = run(x)
        assert small.shape == full.shape and torch.isfinite(small).all(), (
            f"at a share of 1/64 of '{quantity}' the output is {tuple(small.shape)} or not finite"
        )
        if attention:
            x2 = x.clone()
            x2[:, T // 2] = torch.randn(B, MODEL.n_embd)
            later = run(x2)[:, : T // 2]
            assert_close_to_scale(
                later,
                small[:, : T // 2],
                1e-5,
                f"at a small '{quantity}' a future token changed an earlier output",
            )
        module.set_scheduled(quantity, 1.0)
        assert_close_to_scale(
            run(x),
            full,
            1e-6,
            f"after set_scheduled('{quantity}', 1.0) the output is not the component's as built",
        )


# --- extra loss terms (lab/extras.py), for mlp, norm and attention -------------------------------


@_seeded
def extra_loss_gradients(component):
    """A component that adds loss terms, in its slot of a tiny GPT: each term is a finite scalar, its
    gradient reaches the component's own parameters, and two micro-batches through the trainer's
    step give (sum of the micro-batches' cross-entropy + weight * term gradients) / 2."""
    from lab.extras import micro_backward

    slot = component.slot
    model = tiny_gpt(swap=component)
    x, y = _gpt_batch()
    try:
        model(x[:2], y[:2])
    except LabError as e:  # a pairing this component refuses (linear attention and ALiBi)
        raise unittest.SkipTest(f"{slot} '{component.name}' refuses the tiny GPT's components: {e}") from None
    terms = dict(model.extras.terms)
    if not terms:
        raise unittest.SkipTest(f"{slot} '{component.name}' adds no extra loss term")
    for name, term in terms.items():
        assert torch.isfinite(term).all(), f"extra loss '{name}' is {term}"
        assert term.requires_grad, (
            f"extra loss '{name}' has no gradient (detached?): it cannot train anything"
        )
    owned = [
        p
        for m in model.modules()
        if getattr(m, "lab_component", None) and component.name in m.lab_component
        for p in m.parameters()
    ]
    reach = torch.autograd.grad(model.extras.loss(), owned, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in reach), (
        f"the extra loss terms {sorted(terms)} give no gradient to the parameters of {slot} '{component.name}'"
    )
    params = [p for p in model.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p) for p in params]
    for half in (slice(0, 2), slice(2, 4)):  # the reference: each micro-batch's gradient, averaged
        _, ce = model(x[half], y[half])
        for e, g in zip(expected, torch.autograd.grad(ce + model.extras.loss(), params, allow_unused=True)):
            if g is not None:
                e += g / 2
    model.zero_grad(set_to_none=True)
    for half in (slice(0, 2), slice(2, 4)):
        micro_backward(model, model, x[half], y[half], accum=2)
    for (name, p), e in zip(model.named_parameters(), expected):
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        # The same sums in another order at most: float32 rounding, relative to the gradient's scale.
        assert_close_to_scale(
            got,
            e,
            1e-5,
            f"gradient of {name} under grad_accum = 2, against the mean of the micro-batches' gradients",
        )


# --- extension ---------------------------------------------------------------------------------
# An extension is checked in a tiny GPT of 4 layers (so a U-net has halves), its parameters moved off
# their initial values first: a weight that starts at 0 (smear's) would hide what the extension does.


def _extension_gpt(component, *more, train: bool = False, **model_settings):
    try:
        parts = [Part(component, component.Config()), *more]
        model = tiny_gpt(extensions=parts, n_layer=4, **model_settings)
    except LabError as e:
        raise unittest.SkipTest(f"extension '{component.name}' refuses the tiny GPT: {e}") from None
    with torch.no_grad():
        for p in model.extensions.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.train(train)


def _decode(model, idx, prefill: int, caches=None):
    """Logits (B, T, vocab) of idx fed through caches: a prefill, then one token a step. A generator:
    each step yields, so two decodings can be interleaved."""
    caches = caches if caches is not None else model.new_caches(idx.size(0), idx.size(1))
    steps = [model(idx[:, :prefill], caches=caches)[0]]
    yield
    for t in range(prefill, idx.size(1)):
        steps.append(model(idx[:, t : t + 1], caches=caches, start_pos=t)[0])
        yield
    yield torch.cat(steps, dim=1)


def _finish(decoding):
    out = None
    for out in decoding:
        pass
    return out


@_seeded
def extension_cached_decoding(component):
    """A prefill and then one token at a time through the caches, with the extension's per-sequence
    state (new_state, kept beside the caches), gives the logits of the whole forward."""
    model = _extension_gpt(component)
    idx = torch.randint(0, 64, (B, T))
    with torch.no_grad():
        full = model(idx)[0]
        cached = _finish(_decode(model, idx, prefill=5))
    assert_close_to_scale(cached, full, 1e-5, "cached decoding's logits against the whole forward's")


@_seeded
def extension_interleaved_batches(component):
    """Two batches decoded in turn, a step of one then a step of the other (as `lab serve` does),
    give what each gives alone: per-sequence state lives beside each batch's caches, never on the
    module."""
    model = _extension_gpt(component)
    # Of one size: state kept on the module, even keyed by the batch size, would be shared.
    first, second = torch.randint(0, 64, (2, T)), torch.randint(0, 64, (2, T))
    with torch.no_grad():
        alone = [_finish(_decode(model, idx, prefill=4)) for idx in (first, second)]
        a, b = _decode(model, first, prefill=4), _decode(model, second, prefill=4)
        for _ in range(T - 4 + 1):  # prefill and every step, taking turns
            next(a), next(b)
        together = [next(a), next(b)]
    for i, (got, want) in enumerate(zip(together, alone)):
        assert_close_to_scale(got, want, 1e-6, f"batch {i} decoded in turn with another, against alone")


def _train_steps(model, optimizer, x, y, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        (loss + model.extras.loss()).backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@_seeded
def extension_gradients(component):
    """Training with targets: every parameter of the extension gets a finite, non-zero gradient from
    the loss and the loss terms it adds (a parameter only an extra loss reaches, a second head's,
    counts); each term it adds is a finite scalar. Through the fused loss (model.loss_chunk)."""
    model = _extension_gpt(component, train=True, loss_chunk=8)
    x, y = _gpt_batch()
    _, loss = model(x, y)
    for name, term in model.extras.terms.items():
        assert torch.isfinite(term).all(), f"extra loss '{name}' is {term}"
    (loss + model.extras.loss()).backward()
    params = list(model.extensions.named_parameters())
    if not params:
        raise unittest.SkipTest(f"extension '{component.name}' has no parameters")
    for name, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (
            f"extension parameter {name} got no (or a zero or non-finite) gradient"
        )


@_seeded
def extension_resume(component):
    """What exact resume relies on: a model and optimizer loaded from state_dict() take the same next
    steps as the ones they were saved from, bit for bit: the extension keeps no state outside them."""
    model = _extension_gpt(component, train=True, loss_chunk=8)
    x, y = _gpt_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_steps(model, optimizer, x, y, 2)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    expected = _train_steps(model, optimizer, x, y, 2)
    twin = _extension_gpt(component, train=True, loss_chunk=8)
    twin.load_state_dict(saved[0])
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    twin_optimizer.load_state_dict(saved[1])
    got = _train_steps(twin, twin_optimizer, x, y, 2)
    assert got == expected, f"losses after loading the state: {got}, expected {expected}"
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), f"after loading the state, parameter {name} took a different step"


class NoSettings(BaseModel):
    pass


class ContextProbe(Extension):
    """Records what the forward's context holds at every hook point it has."""

    def __init__(self, config=None, model=None):
        super().__init__()
        self.seen: dict[str, list] = {}

    def note(self, point, ctx):
        self.seen.setdefault(point, []).append((ctx.ids, ctx.targets, ctx.meta.get("doc_ids")))

    def embed(self, x, ctx):
        self.note("embed", ctx)
        return x

    def block_input(self, i, x, ctx):
        self.note("block_input", ctx)
        return x

    def block_output(self, i, x, ctx):
        self.note("block_output", ctx)
        return x

    def attention_qkv(self, layer, x, q, k, v, ctx):
        self.note("attention_qkv", ctx)
        return q, k, v

    def attention_heads(self, layer, x, y, ctx):
        self.note("attention_heads", ctx)
        return y

    def head(self, h, ctx):
        self.note("head", ctx)
        return h

    def chunk_loss(self, chunk, ctx):
        self.note("chunk_loss", ctx)
        return {}


@_seeded
def extension_context_metadata(component):
    """With the extension in the model, the data source's per-row metadata (meta["doc_ids"]), the ids
    and the targets reach every hook point of an extension listed after it."""
    probe = Part(Component("extension", "probe", ContextProbe, NoSettings, "", "lab.testing"), NoSettings())
    model = _extension_gpt(component, probe, loss_chunk=8)
    recorder = model.extensions["probe"]
    x, y = _gpt_batch()
    doc_ids = torch.arange(x.numel()).view_as(x) // 5
    model(x, y, meta={"doc_ids": doc_ids})
    points = {"embed", "block_input", "block_output", "head", "chunk_loss"}
    if isinstance(model.blocks[0].attn, SelfAttention):
        points |= {"attention_qkv", "attention_heads"}
    missing = points - set(recorder.seen)
    assert not missing, f"the forward never reached the hook points {sorted(missing)}"
    for point, calls in recorder.seen.items():
        for ids, targets, docs in calls:
            assert ids is x and targets is y, (
                f"at {point}: the context's ids or targets are not the forward's"
            )
            assert docs is doc_ids, f"at {point}: meta['doc_ids'] is not the data source's"


# --- logger -----------------------------------------------------------------------------------


def logger_records_a_run(component):
    """A logger opens on a run folder, takes a run's records (steps, an evaluation), closes, and opens
    again on the same folder as a resumed run does. Offline where the logger has a mode: a check never
    reaches the network. A logger whose package is not installed is skipped, saying so."""
    import tempfile

    settings = {"mode": "offline"} if "mode" in component.Config.model_fields else {}
    try:
        logger = build(component, **settings)
    except LabError as e:  # its package is missing: that is the recipe's message to give, not a failure
        raise unittest.SkipTest(str(e)) from None
    records = [
        {"step": 1, "loss": 2.5, "lr": 1e-3},
        {"step": 2, "loss": 2.25, "lr": 1e-3},
        {"step": 2, "val_loss": 2.4},
    ]
    with tempfile.TemporaryDirectory() as run_dir:
        for first_step in (0, 2):  # a fresh run, then a resume from step 2
            try:
                logger.open(run_dir, {"name": "check"}, first_step)
                for record in records[first_step:]:
                    logger.log(record)
                logger.close()
            except Exception as e:
                raise AssertionError(
                    f"logger '{component.name}' failed on a run's records "
                    f"(first_step {first_step}): {type(e).__name__}: {e}"
                ) from e
            logger = build(component, **settings)


# --- tokenizer and data ------------------------------------------------------------------------


def tokenizer_round_trip(component):
    tokenizer = made(component)
    assert tokenizer.vocab_size > 0, "vocab_size must be positive"
    assert tokenizer.eot_id is None or 0 <= tokenizer.eot_id < tokenizer.vocab_size, (
        "eot_id outside the vocabulary"
    )
    for text in TEXTS:
        try:
            ids = tokenizer.encode(text)
        except LabError:
            continue  # a closed vocabulary (a char tokenizer) refuses, with a message, text it never saw
        assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids), (
            f"ids outside the vocabulary for {text!r}"
        )
        assert tokenizer.decode(ids) == text, f"decode(encode({text!r})) gave {tokenizer.decode(ids)!r}"


def _data_context(plugins: Registry, rank: int = 0, world_size: int = 1) -> DataContext:
    tokenizers = plugins.components["tokenizer"]
    if not tokenizers:
        raise unittest.SkipTest("no tokenizer installed to build a data source with")
    tokenizer = build(tokenizers[sorted(tokenizers)[0]])
    return DataContext(
        block_size=8,
        vocab_size=tokenizer.vocab_size,
        tokenizer=tokenizer,
        seed=0,
        rank=rank,
        world_size=world_size,
        rows_per_step=2 * world_size,
    )


def _data_source(component, context: DataContext):
    try:
        return build(component, context)
    except LabError as e:  # e.g. its default settings name files that are not here
        raise unittest.SkipTest(
            f"data '{component.name}' cannot be built with its default settings: {e}"
        ) from None


def _rows(rank: int, world_size: int, rows: int = 2) -> range:
    """A process's rows of a step's global batch, as the trainer asks for them (one micro-batch)."""
    return range(rank * rows, (rank + 1) * rows)


def data_batches(component, plugins: Registry):
    """Batches of the right shape and type, and y is x shifted by one. Built with the source's
    default settings."""
    context = _data_context(plugins)
    source = _data_source(component, context)
    for split in ("train", "val"):
        x, y, *meta = source.batch(split, 0, range(2))
        for name, value in (meta[0] if meta else {}).items():  # per-row metadata: aligned with x
            assert isinstance(value, torch.Tensor) and value.shape == x.shape, (
                f"{split}: meta[{name!r}] must be a tensor of x's shape {tuple(x.shape)}"
            )
        assert x.shape == y.shape == (2, 8), (
            f"{split} batch shapes {tuple(x.shape)}, {tuple(y.shape)}; expected (2, 8)"
        )
        assert x.dtype == y.dtype == torch.int64, f"{split} batch dtype {x.dtype}, expected torch.int64"
        assert torch.equal(x[:, 1:], y[:, :-1]), f"{split}: y is not x shifted by one token"
        assert 0 <= int(x.min()) and int(x.max()) < context.vocab_size, f"{split}: ids outside the vocabulary"


def data_resume(component, plugins: Registry):
    """What exact resume relies on: a fresh source loaded with the state_dict() taken after some
    steps gives the very batches the original gives next, on each of two processes."""
    for rank in range(2):
        context, rows = _data_context(plugins, rank, 2), _rows(rank, 2)
        source = _data_source(component, context)
        for step in range(3):  # the state is taken mid-stream, where a streaming source has moved on
            source.batch("train", step, rows)
        state = copy.deepcopy(source.state_dict())
        expected = [source.batch("train", step, rows) for step in (3, 4)]
        resumed = _data_source(component, context)
        resumed.load_state_dict(state)
        for step, want in zip((3, 4), expected):
            got = resumed.batch("train", step, rows)
            assert len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want)), (
                f"process {rank} of 2, loaded from the state_dict() taken after 3 steps, gives another batch "
                f"at step {step} than the source it was taken from (is the stream's position in state_dict()?)"
            )


def _same(a, b) -> bool:
    """Equal tensors, or equal dicts of tensors (a batch's meta)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def data_processes_share(component, plugins: Registry):
    """Two processes get different rows of a step: a source that ignored its rank would train every
    process on the same text."""
    batches = [
        _data_source(component, _data_context(plugins, rank, 2)).batch("train", 0, _rows(rank, 2))
        for rank in range(2)
    ]
    assert not torch.equal(batches[0][0], batches[1][0]), (
        "processes 0 and 1 of 2 got the same batch: take the rows asked for, or a share by DataContext.rank"
    )


# --- which checks run for what -----------------------------------------------------------------

# Each slot's checks, as lab/slots.py names them.
CHECKS: dict[str, list[Callable]] = {s.name: [globals()[c] for c in s.checks] for s in SLOTS.values()}


def cases(
    slot: str | None = None,
    name: str | None = None,
    plugins: Registry | None = None,
    settings: dict | None = None,
) -> list[Case]:
    """Every check for every installed component (or only those of one slot / one name), with each
    component's Config defaults and with every entry of its Config's `extra_settings` (a ClassVar
    list of dicts). `settings` runs one component's checks on those settings instead."""
    plugins = plugins or registry()
    if name is not None:
        plugins.get(slot, name)  # an unknown name raises, listing what is installed
    found = []
    for s, components in plugins.components.items():
        for n, component in sorted(components.items()):
            if slot in (None, s) and name in (None, n):
                variants = [settings] if settings is not None else [{}, *component.Config.extra_settings]
                for variant in variants:
                    found += _cases_for(with_settings(component, variant), plugins)
    return found


def with_settings(component: Component, settings: dict) -> Component:
    """The component as if its Config's defaults were `settings` (validated when it is built); its
    name carries them, so a case id says which settings failed: moe[experts=8,top_k=1]."""
    if not settings:
        return component
    component.Config(**settings)  # a wrong setting fails here, with pydantic's message

    def factory(config, *args):
        return component.factory(
            component.Config(**{**settings, **config.model_dump(exclude_unset=True)}), *args
        )

    label = ",".join(f"{k}={v}" for k, v in settings.items())
    return dataclasses.replace(component, name=f"{component.name}[{label}]", factory=factory)


def _cases_for(component: Component, plugins: Registry) -> list[Case]:
    label = f"{component.slot}-{component.name}"
    out = []
    for check_fn in CHECKS[component.slot]:
        extra = (plugins,) if component.slot == "data" else ()
        out.append(Case(f"{label}-{check_fn.__name__}", functools.partial(check_fn, component, *extra)))
    if component.slot == "attention":  # and with every installed position
        for pname, position in sorted(plugins.components["position"].items()):
            out.append(Case(f"{label}-with-{pname}", attention_with_position(component, position)))
    return out


def check(slot: str, name: str, plugins: Registry | None = None, settings: dict | None = None) -> list[str]:
    """Run every check for one component; raise on the first failure. Returns the skip reasons."""
    skipped = []
    for case in cases(slot, name, plugins, settings):
        try:
            case()
        except unittest.SkipTest as e:
            skipped.append(f"{case}: {e}")
    return skipped
