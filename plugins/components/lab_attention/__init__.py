"""Attention: GPT-2's, the plain reference every other attention is checked against, and a sliding window."""

from lab import hookimpl
from lab_attention.manual import ManualAttention, ManualConfig
from lab_attention.sdpa import SDPAAttention, SDPAConfig
from lab_attention.sliding import SlidingAttention, SlidingConfig


@hookimpl
def lab_components(register):
    register(
        "attention",
        "sdpa",
        SDPAAttention,
        SDPAConfig,
        "causal attention through torch's fused scaled_dot_product_attention",
    )
    register(
        "attention",
        "manual",
        ManualAttention,
        ManualConfig,
        "plain matmul-softmax causal attention: the reference",
    )
    register(
        "attention",
        "sliding",
        SlidingAttention,
        SlidingConfig,
        "causal attention to the last `window` tokens (FlexAttention on CUDA, masked SDPA elsewhere)",
    )
