"""Every installed component, built-in or third-party, against lab.testing's conformance checks:
the cases come from the registry, so a newly installed plugin is checked without a new test.
Then the checks themselves, shown to catch a component that breaks each rule."""

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel

from lab import hookimpl
from lab.attention import SelfAttention
from lab.interfaces import DataSource, Logger, Position, Schedule, Tokenizer
from lab.plugins import build_registry
from lab.slots import ComponentConfig
from lab.testing import cases


@pytest.mark.parametrize("case", cases(), ids=str)
def test_conformance(case):
    case()


# --- components that each break one rule -------------------------------------------------------


class Empty(BaseModel):
    pass


class Peeking(SelfAttention):
    """No causal mask: every token sees the future."""

    def __init__(self, config, model):
        super().__init__(model)

    def attend(self, q, k, v, q_pos, k_pos, bias):
        return F.scaled_dot_product_attention(q, k, v)


class Causal(Peeking):
    def attend(self, q, k, v, q_pos, k_pos, bias):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Forgetful(Causal):
    """Its cache keeps nothing: decoding sees only the new tokens."""

    def new_cache(self, batch, max_len, device, dtype):
        return None


class Upcasting(Causal):
    """Returns float32 whatever it is given."""

    def forward(self, x, pos, position, cache=None):
        return super().forward(x, pos, position, cache).float()


class Stretching(Position):
    def __init__(self, config, model):
        super().__init__()

    def rotate(self, q, k, pos):
        return 2 * q, k


class OneHeadCount(Position):
    """Rotates k as if it had q's heads: breaks grouped-query attention (fewer k heads)."""

    def __init__(self, config, model):
        super().__init__()

    def rotate(self, q, k, pos):
        return q, k.repeat_interleave(q.size(1) // k.size(1), dim=1)


def norm_over_time(config, model):
    """Normalises across tokens, not features: token t's output depends on every token."""

    class OverTime(torch.nn.Module):
        def forward(self, x):
            return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-5)

    return OverTime()


class Counting(Schedule):
    """Hidden state: the value depends on how often it was called."""

    def __init__(self, config, max_steps):
        self.calls = 0

    def __call__(self, step):
        self.calls += 1
        return 1.0 / self.calls


def frozen(config, params, model):
    return torch.optim.SGD(model.parameters(), lr=0.0)


def matrices_only(config, params, model):
    """Leaves every parameter that is not a matrix out: they would never train."""
    return torch.optim.SGD([p.param for p in params if p.role == "matrix"], lr=0.1)


class Lowercasing(Tokenizer):
    name, vocab_size, eot_id = "lower", 256, None

    def __init__(self, config):
        pass

    def encode(self, text):
        return list(text.lower().encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8")


class Amnesic(DataSource):
    """Streams (each batch takes the next tokens), but its state_dict() is always {}: a resumed run
    would start the data over."""

    def __init__(self, config, context):
        self.block_size, self.next = context.block_size, 7 * context.rank

    def batch(self, split, step, rows):
        T = self.block_size
        tokens = (self.next + torch.arange(len(rows) * T + 1)) % 50
        self.next += len(rows) * T
        windows = tokens.unfold(0, T + 1, T)  # (rows, T + 1), each starting where the last one ended
        return windows[:, :-1], windows[:, 1:]


class SameEverywhere(DataSource):
    """A pure function of the step that ignores the rows: every process trains on the same text."""

    def __init__(self, config, context):
        self.block_size = context.block_size

    def batch(self, split, step, rows):
        windows = (step + torch.arange(self.block_size + 1)).repeat(len(rows), 1) % 50
        return windows[:, :-1], windows[:, 1:]


class StepsOnly(Logger):
    """Expects every record to be a training step's: an evaluation's record has no "loss"."""

    def __init__(self, config):
        self.seen = []

    def log(self, record):
        self.seen.append(record["loss"])


class ShrinkingConfig(ComponentConfig):
    scheduled: ClassVar[tuple[str, ...]] = ("window",)


class Shrinking(Causal):
    """Takes a scheduled window, but a share applies to the window it has now, never to the one it was
    built with: after a small share, share 1 does not give the whole window back."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.window = 16

    def set_scheduled(self, quantity, share):
        self.window = max(1, round(self.window * share))

    def attend(self, q, k, v, q_pos, k_pos, bias):
        seen = (k_pos[None, :] <= q_pos[:, None]) & (q_pos[:, None] - k_pos[None, :] < self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=seen)


class Broken:
    @hookimpl
    def lab_components(self, register):
        register("attention", "peeking", Peeking, Empty, "")
        register("attention", "forgetful", Forgetful, Empty, "")
        register("attention", "upcasting", Upcasting, Empty, "")
        register("attention", "shrinking", Shrinking, ShrinkingConfig, "")
        register("position", "stretching", Stretching, Empty, "")
        register("position", "one_head_count", OneHeadCount, Empty, "")
        register("norm", "over_time", norm_over_time, Empty, "")
        register("schedule", "counting", Counting, Empty, "")
        register("optimizer", "frozen", frozen, Empty, "")
        register("optimizer", "matrices_only", matrices_only, Empty, "")
        register("tokenizer", "lowercasing", Lowercasing, Empty, "")
        register("data", "amnesic", Amnesic, Empty, "")
        register("data", "same_everywhere", SameEverywhere, Empty, "")
        register("logger", "steps_only", StepsOnly, Empty, "")


@pytest.fixture(scope="module")
def broken():
    return build_registry({"broken-components": Broken()}, warn=False)


@pytest.mark.parametrize(
    "slot, name, check",
    [
        ("attention", "peeking", "attention_causality"),
        ("attention", "forgetful", "attention_cached_decoding"),
        ("attention", "upcasting", "attention_dtypes"),
        ("attention", "shrinking", "scheduled_quantities"),
        ("position", "stretching", "position_rotate_preserves_norms"),
        ("position", "one_head_count", "position_grouped_heads"),
        ("norm", "over_time", "token_map_per_token"),
        ("schedule", "counting", "schedule_pure"),
        ("optimizer", "frozen", "optimizer_reduces_loss"),
        ("optimizer", "matrices_only", "optimizer_roles"),
        ("tokenizer", "lowercasing", "tokenizer_round_trip"),
        ("data", "amnesic", "data_resume"),
        ("data", "same_everywhere", "data_processes_share"),
        ("logger", "steps_only", "logger_records_a_run"),
    ],
)
def test_the_checks_catch_a_broken_component(broken, slot, name, check):
    [case] = [c for c in cases(slot, name, broken) if str(c).endswith(check)]
    with pytest.raises(AssertionError):
        case()


def test_the_broken_data_sources_pass_the_other_checks(broken):
    """So each is caught by the one check it breaks: the resume check is what catches a stream
    that does not save its position (the shapes check alone took the state before any batch)."""
    for name, failing in (("amnesic", "data_resume"), ("same_everywhere", "data_processes_share")):
        for case in cases("data", name, broken):
            if not str(case).endswith(failing):
                case()


def test_an_unknown_component_is_named_with_what_is_installed(broken):
    from lab.errors import LabError

    with pytest.raises(LabError, match="available: .*sdpa"):
        cases("attention", "nope", broken)
