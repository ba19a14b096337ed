"""GPT-2's feed-forward block."""
from lab import hookimpl

from lab_mlp.gelu import GeluConfig, GeluMLP


@hookimpl
def lab_components(register):
    register("mlp", "gelu", GeluMLP, GeluConfig, "Linear -> GELU -> Linear, 4x wide (GPT-2)")
