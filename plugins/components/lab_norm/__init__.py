"""Normalisation: GPT-2's LayerNorm, and LLaMA's RMSNorm."""

from lab import hookimpl
from lab_norm.layernorm import LayerNormConfig, layernorm
from lab_norm.rmsnorm import RMSNorm, RMSNormConfig


@hookimpl
def lab_components(register):
    register("norm", "layernorm", layernorm, LayerNormConfig, "LayerNorm with optional bias (GPT-2)")
    register(
        "norm", "rmsnorm", RMSNorm, RMSNormConfig, "RMSNorm: scale by the root mean square, no bias (LLaMA)"
    )
