"""Llama's layout in transformers (LlamaForCausalLM): which lab runs are Llamas, and their tensors
under both sets of names.

A lab Llama is rotary positions on every dim of each head, RMSNorm, a SwiGLU MLP, no biases,
softmax attention with n_kv_head key/value heads (grouped-query attention when fewer than n_head),
and a head tied to the embedding or not. lab's rope pairs dims (i, i + hs/2),
as transformers' Llama does (rotate_half), so q and k need no permutation. lab keeps q, k and v
in one projection and SwiGLU's gate and up in one matrix: transformers has one of each.
"""

from __future__ import annotations

from typing import Any

import torch

from lab.errors import LabError
from lab.recipe import ModelConfig, Recipe

# The tokenizer is any with a Hugging Face form: export_hf.tokenizer_refusals.
PARTS = {"attention": ("sdpa", "manual"), "mlp": ("swiglu",), "norm": ("rmsnorm",), "position": ("rope",)}
NORMS = {"norm_1": "input_layernorm", "norm_2": "post_attention_layernorm"}


def refusals(recipe: Recipe) -> list[str]:
    """Every way the recipe leaves Llama's architecture ([] for a Llama)."""
    reasons = [
        f"{slot} '{recipe.parts[slot].name}' (Llama's is {' or '.join(names)})"
        for slot, names in PARTS.items()
        if recipe.parts[slot].name not in names
    ]
    m = recipe.model
    if m.bias:
        reasons.append("model.bias = true (Llama's linear layers and norms have no biases)")
    if m.logit_softcap:
        reasons.append(f"model.logit_softcap = {m.logit_softcap} (Llama's logits are not capped)")
    if getattr(m, "qk_norm", False):
        reasons.append("model.qk_norm = true (Llama has no norm on queries and keys)")
    position: Any = recipe.parts["position"]  # its config is rope's own when the name is rope
    if position.name == "rope" and position.config.fraction != 1.0:
        reasons.append(f"model.position.fraction = {position.config.fraction} (Llama rotates every dim)")
    return reasons


def hf_config(recipe: Recipe, eot: int | None) -> dict:
    m = recipe.model
    # Any: the swiglu's, rmsnorm's and rope's own Configs, which the checks made sure of
    mlp: Any = recipe.parts["mlp"]
    norm: Any = recipe.parts["norm"].config
    rope: Any = recipe.parts["position"].config
    from lab_mlp.swiglu import hidden_width

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.n_embd,
        "intermediate_size": hidden_width(mlp.config, m.n_embd),
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.block_size,
        "rms_norm_eps": norm.eps,
        "rope_theta": rope.theta,  # transformers < 5 reads this
        "rope_parameters": {"rope_type": "default", "rope_theta": rope.theta},  # >= 5 reads this
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": m.dropout,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    }


def _layer_pairs(i: int):
    """(lab name, transformers name) of the tensors that map one to one in block i."""
    yield f"blocks.{i}.attn.proj.weight", f"model.layers.{i}.self_attn.o_proj.weight"
    yield f"blocks.{i}.mlp.proj.weight", f"model.layers.{i}.mlp.down_proj.weight"
    for ours, theirs in NORMS.items():
        yield f"blocks.{i}.{ours}.weight", f"model.layers.{i}.{theirs}.weight"


def to_hf(state: dict, m: ModelConfig) -> dict:
    """lab's state dict -> LlamaForCausalLM's. lm_head is written only when it is not tied."""
    state = {k: v.detach().float().cpu() for k, v in state.items()}
    q_rows, kv_rows = m.n_head * m.head_dim, m.kv_heads * m.head_dim
    out = {"model.embed_tokens.weight": state["tok_emb.weight"], "model.norm.weight": state["norm_f.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    for i in range(m.n_layer):
        out.update({theirs: state[ours] for ours, theirs in _layer_pairs(i)})
        q, k, v = state[f"blocks.{i}.attn.qkv.weight"].split([q_rows, kv_rows, kv_rows])
        gate, up = state[f"blocks.{i}.mlp.fc.weight"].chunk(2)
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out.update(
            {
                f"{attn}.q_proj.weight": q,
                f"{attn}.k_proj.weight": k,
                f"{attn}.v_proj.weight": v,
                f"{mlp}.gate_proj.weight": gate,
                f"{mlp}.up_proj.weight": up,
            }
        )
    return {k: v.contiguous() for k, v in out.items()}


def to_lab(hf: dict, m: ModelConfig, source: str) -> dict:
    """LlamaForCausalLM's state dict -> lab's."""

    def get(name):
        if name not in hf:
            raise LabError(
                f"{source} has no tensor '{name}', which a Llama with num_hidden_layers = "
                f"{m.n_layer} needs; the weights file does not match config.json"
            )
        if not isinstance(hf[name], torch.Tensor):
            raise LabError(f"{source}: {name} is a {type(hf[name]).__name__}, not a tensor")
        return hf[name].float()

    out = {"tok_emb.weight": get("model.embed_tokens.weight"), "norm_f.weight": get("model.norm.weight")}
    out["head.weight"] = out["tok_emb.weight"] if m.tie_embeddings else get("lm_head.weight")
    for i in range(m.n_layer):
        out.update({ours: get(theirs) for ours, theirs in _layer_pairs(i)})
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([get(f"{attn}.{p}_proj.weight") for p in "qkv"])
        out[f"blocks.{i}.mlp.fc.weight"] = torch.cat(
            [get(f"{mlp}.gate_proj.weight"), get(f"{mlp}.up_proj.weight")]
        )
    return out


# What LlamaConfig assumes when config.json leaves a key out.
HF_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "rope_scaling": None,
}


def recipe_table(config: dict, source: str) -> dict:
    """The [model] table of a lab recipe for a config.json of model_type "llama"."""
    config = {**HF_DEFAULTS, **config}
    refuse_unsupported(config, source)
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    model = {
        "vocab_size": config["vocab_size"],
        "block_size": config["max_position_embeddings"],
        "n_layer": config["num_hidden_layers"],
        "n_head": config["num_attention_heads"],
        "n_embd": config["hidden_size"],
        "dropout": config["attention_dropout"],
        "bias": False,
        "tie_embeddings": bool(config["tie_word_embeddings"]),
        "attention": {"name": "sdpa"},
        "mlp": {"name": "swiglu", "hidden": config["intermediate_size"]},
        "norm": {"name": "rmsnorm", "eps": config["rms_norm_eps"]},
        "position": {"name": "rope", "theta": float(theta)},
    }
    kv = config["num_key_value_heads"]
    if kv and kv != config["num_attention_heads"]:
        model["n_kv_head"] = kv  # grouped-query attention
    return model


def refuse_unsupported(config: dict, source: str) -> None:
    """Llama variants lab's components cannot reproduce exactly."""
    heads, width = config["num_attention_heads"], config["hidden_size"]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    checks = [
        (config["hidden_act"] == "silu", f"hidden_act = {config['hidden_act']!r}; lab's swiglu uses silu"),
        (
            not config["attention_bias"] and not config["mlp_bias"],
            "attention_bias or mlp_bias is true; lab's Llama has no biases",
        ),
        (
            rope.get("rope_type", "default") == "default",
            f"rope type {rope.get('rope_type')!r}; lab's rope is the default one, unscaled",
        ),
        (
            config["head_dim"] in (None, width // heads),
            f"head_dim = {config['head_dim']} is not hidden_size / num_attention_heads = {width // heads}",
        ),
    ]
    for ok, why in checks:
        if not ok:
            raise LabError(f"{source}: {why}; import-hf cannot read this model")
