"""Feed-forward blocks: GPT-2's GELU MLP, LLaMA's SwiGLU the speedrun's squared ReLU, a mixture of experts."""

from lab import hookimpl
from lab_mlp.gelu import GeluConfig, GeluMLP
from lab_mlp.moe import MoE, MoEConfig
from lab_mlp.relu2 import ReLU2Config, ReLU2MLP
from lab_mlp.swiglu import SwiGLU, SwiGLUConfig


@hookimpl
def lab_components(register):
    register("mlp", "gelu", GeluMLP, GeluConfig, "Linear -> GELU -> Linear, 4x wide (GPT-2)")
    register(
        "mlp",
        "swiglu",
        SwiGLU,
        SwiGLUConfig,
        "down(silu(gate(x)) * up(x)), 2/3 of 4x wide (LLaMA); no biases when model.bias is false",
    )
    register(
        "mlp",
        "relu2",
        ReLU2MLP,
        ReLU2Config,
        "Linear -> ReLU squared -> Linear, 4x wide (Primer; modded-nanogpt, nanochat)",
    )
    register(
        "mlp",
        "moe",
        MoE,
        MoEConfig,
        "mixture of experts: each token to its top_k of n_experts MLPs, with a load-balancing loss",
    )
