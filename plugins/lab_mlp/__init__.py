"""Feed-forward blocks: GPT-2's GELU MLP and LLaMA's SwiGLU."""
from lab import hookimpl

from lab_mlp.gelu import GeluConfig, GeluMLP
from lab_mlp.swiglu import SwiGLU, SwiGLUConfig


@hookimpl
def lab_components(register):
    register("mlp", "gelu", GeluMLP, GeluConfig, "Linear -> GELU -> Linear, 4x wide (GPT-2)")
    register("mlp", "swiglu", SwiGLU, SwiGLUConfig,
             "down(silu(gate(x)) * up(x)), 2/3 of 4x wide (LLaMA); no biases when model.bias is false")
