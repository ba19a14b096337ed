"""`lab export-hf`: a lab run folder whose components are GPT-2's or Llama's -> a folder that
transformers' GPT2LMHeadModel or LlamaForCausalLM from_pretrained (and AutoTokenizer) loads."""

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

import lab.runs
from lab.errors import LabError
from lab.files import usual_mode
from lab.recipe import Recipe
from lab.runs.layout import RECIPE
from lab_hf import llama
from lab_hf.names import to_hf
from lab_tokenizers.gpt2 import HERE as GPT2_FILES

# The components GPT-2 is made of. Both attentions compute the same softmax attention. The tokenizer
# is any with a Hugging Face form (tokenizer_refusals).
GPT2_PARTS = {
    "attention": ("sdpa", "manual"),
    "mlp": ("gelu",),
    "norm": ("layernorm",),
    "position": ("learned",),
}
ACTIVATION = {"tanh": "gelu_new", "none": "gelu"}


def export_hf(run_dir, out) -> Path:
    recipe, model, ckpt = lab.runs.load(run_dir)
    tokenizer = recipe.parts["tokenizer"].build()  # from the run's own copy (lab.runs.tokenizer_files)
    family = pick_family(recipe, tokenizer, ckpt / RECIPE)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LabError(f"{out} exists and is not an empty folder; choose a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    if family == "llama":
        weights, config = (
            llama.to_hf(model.state_dict(), recipe.model),
            llama.hf_config(recipe, tokenizer.eot_id),
        )
    else:
        weights, config = to_hf(model.state_dict(), recipe.model.n_layer), hf_config(recipe, tokenizer.eot_id)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    usual_mode(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(recipe, tokenizer, out)
    return out


def write_tokenizer(recipe: Recipe, tokenizer, out: Path) -> None:
    """transformers' GPT-2 tokenizer files are the ones lab ships, under their hub names; another
    tokenizer is written as tokenizer.json. tokenizer_config.json says which class reads them, or
    AutoTokenizer on a Llama folder would look for Llama's own."""
    special = (
        {}
        if tokenizer.eot_id is None
        else {key: tokenizer.decode([tokenizer.eot_id]) for key in ("bos_token", "eos_token", "unk_token")}
    )
    if recipe.parts["tokenizer"].name == "gpt2":
        shutil.copyfile(GPT2_FILES / "encoder.json", out / "vocab.json")
        shutil.copyfile(GPT2_FILES / "vocab.bpe", out / "merges.txt")
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False}
    else:
        (out / "tokenizer.json").write_text(tokenizer.hf_json())
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config = {**config, **special, "model_max_length": recipe.model.block_size}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def tokenizer_refusals(recipe: Recipe, tokenizer) -> list[str]:
    name = recipe.parts["tokenizer"].name
    if name == "gpt2" or tokenizer.hf_json() is not None:
        return []
    return [f"tokenizer '{name}' (it has no Hugging Face tokenizer.json form)"]


def pick_family(recipe: Recipe, tokenizer, source) -> str:
    """ "gpt2" or "llama": the family the run belongs to, or one message with every part that keeps it
    out of the closer one (rotary positions make it a Llama candidate, anything else a GPT-2 one)."""
    refused = tokenizer_refusals(recipe, tokenizer) + extension_refusals(recipe)
    llama_reasons, gpt2_reasons = llama.refusals(recipe) + refused, gpt2_refusals(recipe) + refused
    if not gpt2_reasons:
        return "gpt2"
    if not llama_reasons:
        return "llama"
    family, reasons = (
        ("a Llama", llama_reasons) if recipe.parts["position"].name == "rope" else ("a GPT-2", gpt2_reasons)
    )
    raise LabError(
        f"{source} is not {family}, so export-hf cannot write it: "
        + "; ".join(reasons)
        + ". Export writes GPT-2 and Llama models; train a recipe without these parts"
    )


def extension_refusals(recipe: Recipe) -> list[str]:
    """Extensions that change what the model computes (a training-only one, a z-loss, does not)."""
    return [
        f"extension '{part.name}' (neither GPT-2 nor Llama has it)"
        for part in recipe.extensions
        if not getattr(part.component.factory, "training_only", False)
    ]


def gpt2_refusals(recipe: Recipe) -> list[str]:
    """Every way the recipe leaves GPT-2's architecture."""
    reasons = [
        f"{slot} '{recipe.parts[slot].name}' (GPT-2's is {' or '.join(names)})"
        for slot, names in GPT2_PARTS.items()
        if recipe.parts[slot].name not in names
    ]
    if not recipe.model.bias:
        reasons.append("model.bias = false (GPT-2's linear layers and norms have biases)")
    if not recipe.model.tie_embeddings:
        reasons.append("model.tie_embeddings = false (GPT-2's head is its token embedding)")
    if recipe.model.logit_softcap:
        reasons.append(f"model.logit_softcap = {recipe.model.logit_softcap} (GPT-2's logits are not capped)")
    if recipe.model.kv_heads != recipe.model.n_head:
        reasons.append(
            f"model.n_kv_head = {recipe.model.n_kv_head} "
            "(GPT-2 gives every query head its own keys and values)"
        )
    if recipe.model.qk_norm:
        reasons.append("model.qk_norm = true (GPT-2 has no norm on queries and keys)")
    return reasons


def hf_config(recipe: Recipe, eot: int | None) -> dict:
    m = recipe.model
    # Any: the gelu MLP's and layernorm's own Configs, which the checks above made sure of
    mlp: Any = recipe.parts["mlp"].config
    norm: Any = recipe.parts["norm"].config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.block_size,
        "n_embd": m.n_embd,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_inner": mlp.expansion * m.n_embd,
        "activation_function": ACTIVATION[mlp.approximate],
        "layer_norm_epsilon": norm.eps,
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": True,
    }


def cli_export(args) -> int:
    out = export_hf(args.run_dir, args.out)
    model = json.loads((out / "config.json").read_text())["architectures"][0]
    print(
        f"wrote {out}/config.json, model.safetensors and tokenizer files; load it with "
        f"transformers' {model}.from_pretrained({str(out)!r})",
        file=sys.stderr,
    )
    return 0
