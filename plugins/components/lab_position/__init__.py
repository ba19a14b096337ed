"""Where a token is: GPT-2's learned positions, rotary positions, ALiBi."""

from lab import hookimpl
from lab_position.alibi import AlibiConfig, AlibiPosition
from lab_position.learned import LearnedConfig, LearnedPosition
from lab_position.rope import RopeConfig, RotaryPosition


@hookimpl
def lab_components(register):
    register(
        "position",
        "learned",
        LearnedPosition,
        LearnedConfig,
        "learned absolute position embeddings added to the tokens (GPT-2)",
    )
    register(
        "position",
        "rope",
        RotaryPosition,
        RopeConfig,
        "rotary positions: q and k rotated by position (RoFormer, LLaMA); any length",
    )
    register(
        "position",
        "alibi",
        AlibiPosition,
        AlibiConfig,
        "ALiBi: a per-head linear distance penalty on the scores; any length",
    )
