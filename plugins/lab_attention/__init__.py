"""GPT-2's attention, and the plain reference every other attention is checked against."""
from lab import hookimpl

from lab_attention.manual import ManualAttention, ManualConfig
from lab_attention.sdpa import SDPAAttention, SDPAConfig


@hookimpl
def lab_components(register):
    register("attention", "sdpa", SDPAAttention, SDPAConfig,
             "causal attention through torch's fused scaled_dot_product_attention")
    register("attention", "manual", ManualAttention, ManualConfig,
             "plain matmul-softmax causal attention: the reference")
