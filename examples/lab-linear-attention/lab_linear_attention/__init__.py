"""A lab plugin package: causal linear attention, registered as attention "linear"."""

from lab import hookimpl
from lab_linear_attention.linear import LinearAttention, LinearConfig


@hookimpl
def lab_components(register):
    register(
        "attention",
        "linear",
        LinearAttention,
        LinearConfig,
        "causal linear attention, elu+1 features; a fixed-size recurrent state when decoding",
    )
