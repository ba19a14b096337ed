"""`lab import-hf`: a local transformers GPT-2 or Llama folder (config.json + weights) -> a lab run
folder whose step-0 checkpoint `lab generate` samples from and `lab run` can fine-tune."""

import json
import pickle
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lab.errors import LabError
from lab.files import write_text_atomically
from lab.model import GPT
from lab.recipe import Recipe, resolve
from lab.runs.checkpoint import latest, save
from lab.runs.layout import LOCK, RECIPE
from lab.runs.lock import RunLock
from lab_hf import llama
from lab_hf.names import to_lab

# transformers' activation names -> the gelu MLP's `approximate`. gelu_new is GPT-2's tanh formula.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}

# What GPT2Config assumes when config.json leaves a key out.
HF_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "resid_pdrop": 0.1,
    "tie_word_embeddings": True,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}


def import_hf(hf_dir, out) -> Path:
    """Write a lab run folder from a transformers GPT-2 or Llama folder; return the checkpoint folder."""
    hf_dir, out = Path(hf_dir), Path(out)
    config = read_config(hf_dir)
    check_out(out)
    recipe = recipe_from_config(config, hf_dir)
    weights = read_weights(hf_dir)  # before building the model: a missing file is found at once
    model = GPT(recipe)
    load_hf_weights(model, weights, hf_dir, config["model_type"])
    recipe.train.out_dir = str(out)  # so that `lab run OUT/recipe.toml` fine-tunes in this folder
    fit_samples(recipe, model)
    with RunLock(out, f"lab import-hf {hf_dir} --out {out}"):
        check_out(out)  # again, now that no other lab process can write there
        # The checkpoint holds weights and step 0 alone: `lab run` fine-tunes it with a fresh optimizer.
        ckpt = save(out, 0, model, recipe.to_toml(), state={"step": 0})
        write_text_atomically(out / RECIPE, recipe.to_toml())
    return ckpt


def fit_samples(recipe: Recipe, model: GPT) -> None:
    """[generate] as lab run checks it: the prompt and the samples within the positions the model
    knows (a GPT-2 with 64 positions cannot sample the default 100 tokens after its prompt)."""
    limit = model.position.max_len
    if limit is None:
        return
    prompt = len(recipe.parts["tokenizer"].build().encode(recipe.generate.prompt)) or 1
    if prompt >= limit:
        recipe.generate.prompt = ""  # then sampling starts from the end-of-text token alone
        prompt = 1
    recipe.generate.max_new_tokens = max(1, min(recipe.generate.max_new_tokens, limit - prompt))


def check_out(out: Path) -> None:
    """--out must be a new or empty folder: the import writes recipe.toml and checkpoints/ there."""
    if out.exists() and not out.is_dir():
        raise LabError(f"--out {out} is a file; give a new folder for the run")
    if latest(out) is not None:
        raise LabError(
            f"{out} already holds a checkpoint ({latest(out)}); choose another --out folder, "
            "or delete that one first"
        )
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        raise LabError(f"--out {out} is a folder of other files; give a new or empty folder for the run")


def read_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise LabError(
            f"{hf_dir} is not a folder; give a folder saved by transformers' save_pretrained "
            "(config.json and model.safetensors or pytorch_model.bin)"
        )
    if not path.is_file():
        raise LabError(
            f"{hf_dir} has no config.json, so it is not a transformers model folder; give the "
            "folder save_pretrained wrote (config.json and model.safetensors or pytorch_model.bin)"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LabError(f"cannot parse {path}: {e}") from None
    if not isinstance(config, dict) or config.get("model_type") not in ("gpt2", "llama"):
        found = config.get("model_type") if isinstance(config, dict) else None
        raise LabError(
            f"{path} has model_type = {found!r}; import-hf reads GPT-2 and Llama models "
            '(model_type "gpt2" or "llama")'
        )
    return {**HF_DEFAULTS, **config} if config["model_type"] == "gpt2" else config


def recipe_from_config(config: dict, hf_dir: Path) -> Recipe:
    """The model's shape and components from config.json, and the default training tables."""
    source = str(hf_dir / "config.json")
    if config["model_type"] == "llama":
        model = llama.recipe_table(config, source)
    else:
        model = gpt2_model_table(config, source)
    raw = {
        "name": hf_dir.resolve().name,
        "model": model,
        "tokenizer": {"name": "gpt2"},
        "data": {"name": "memmap"},
        "optimizer": {"name": "adamw"},
        "schedule": {"name": "cosine"},
    }
    recipe = resolve(raw, source)
    vocab = recipe.parts["tokenizer"].build().vocab_size
    if recipe.model.vocab_size < vocab:
        raise LabError(
            f"{source}: vocab_size = {recipe.model.vocab_size} is smaller than GPT-2's tokenizer "
            f"({vocab}); this model uses another tokenizer, which import-hf cannot bring along"
        )
    return recipe


def gpt2_model_table(config: dict, source: str) -> dict:
    """The [model] table of a lab recipe for a config.json of model_type "gpt2"."""
    refuse_unsupported(config, source)
    n_inner = config["n_inner"] or 4 * config["n_embd"]
    return {
        "vocab_size": config["vocab_size"],
        "block_size": config["n_positions"],
        "n_layer": config["n_layer"],
        "n_head": config["n_head"],
        "n_embd": config["n_embd"],
        "dropout": config["resid_pdrop"],
        "bias": True,
        "tie_embeddings": True,
        "attention": {"name": "sdpa"},
        "mlp": {
            "name": "gelu",
            "expansion": n_inner // config["n_embd"],
            "approximate": ACTIVATIONS[config["activation_function"]],
        },
        "norm": {"name": "layernorm", "eps": config["layer_norm_epsilon"]},
        "position": {"name": "learned"},
    }


def refuse_unsupported(config: dict, source: str) -> None:
    """GPT-2 variants lab's components cannot reproduce exactly."""
    act = config["activation_function"]
    if act not in ACTIVATIONS:
        raise LabError(
            f"{source}: activation_function = {act!r} has no lab equivalent; "
            f"import-hf reads {', '.join(ACTIVATIONS)}"
        )
    if config["n_inner"] and config["n_inner"] % config["n_embd"]:
        raise LabError(
            f"{source}: n_inner = {config['n_inner']} is not a multiple of n_embd = "
            f"{config['n_embd']}; lab's gelu MLP is a whole multiple of n_embd wide"
        )
    for key, gpt2 in (
        ("tie_word_embeddings", True),
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if bool(config[key]) != gpt2:
            raise LabError(
                f"{source}: {key} = {config[key]!r}; import-hf reads GPT-2 models with "
                f"{key} = {str(gpt2).lower()} only"
            )


def read_weights(hf_dir: Path) -> dict:
    """model.safetensors, or else pytorch_model.bin (read with weights_only: a pickle can run code)."""
    safetensors, pickled = hf_dir / "model.safetensors", hf_dir / "pytorch_model.bin"
    try:
        if safetensors.is_file():
            return load_file(str(safetensors))
        if pickled.is_file():
            state = torch.load(pickled, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise LabError(
                    f"{pickled} holds a {type(state).__name__}, not a dict of tensors; save the "
                    "model with save_pretrained"
                )
            return state
    except (OSError, RuntimeError, SafetensorError, pickle.UnpicklingError, EOFError) as e:
        # Not torch's text: it suggests weights_only=False, which would let the file run code.
        raise LabError(
            f"cannot read the weights in {hf_dir} ({type(e).__name__}): the file is damaged or "
            "not a PyTorch/safetensors weights file; save the model again with save_pretrained"
        ) from None
    raise LabError(
        f"{hf_dir} has a config.json but no model.safetensors or pytorch_model.bin "
        "(sharded checkpoints are not read); save the model with save_pretrained"
    )


def load_hf_weights(model: GPT, hf_state: dict, hf_dir: Path, model_type: str = "gpt2") -> None:
    if model_type == "llama":
        state = llama.to_lab(hf_state, model.config, str(hf_dir))
    else:
        state = to_lab(hf_state, model.config.n_layer, str(hf_dir))
        head = hf_state.get("lm_head.weight")
        if head is not None and not isinstance(head, torch.Tensor):
            raise LabError(f"{hf_dir}: lm_head.weight is a {type(head).__name__}, not a tensor")
        if head is not None and not torch.equal(head.float(), state["tok_emb.weight"]):
            raise LabError(
                f"{hf_dir}: lm_head.weight differs from wte.weight, but lab's GPT-2 ties them; "
                "this model cannot be imported"
            )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # a tensor of another shape than config.json says
        raise LabError(
            f"the weights in {hf_dir} do not match its config.json: {str(e).splitlines()[-1].strip()}"
        ) from None


def cli_import(args) -> int:
    ckpt = import_hf(args.hf_dir, args.out)
    print(
        f'imported {args.hf_dir} into {ckpt}\ntry: lab generate {args.out} --prompt "Hello"\n'
        f"fine-tune it: lab run {Path(args.out) / 'recipe.toml'} --set data.path=YOUR_DATA "
        "--set train.max_steps=200",
        file=sys.stderr,
    )
    return 0
