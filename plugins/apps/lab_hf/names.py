"""GPT-2's tensors under lab's names and under transformers' names.

transformers' GPT-2 keeps its linear layers as Conv1D, whose weight is stored (in, out): the
transpose of nn.Linear's (out, in). Files saved from GPT2LMHeadModel prefix every name with
"transformer."; the original OpenAI-converted files (the hub's gpt2 .. gpt2-xl) do not.
"""

import torch

from lab.errors import LabError

PREFIX = "transformer."
LINEARS = {
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}
NORMS = {"norm_1": "ln_1", "norm_2": "ln_2"}


def pairs(n_layer: int):
    """(lab name, transformers name without the prefix, stored transposed?) for every tensor.
    lab's head.weight is tok_emb.weight itself (tied), so it has no pair of its own."""
    yield "tok_emb.weight", "wte.weight", False
    yield "position.wpe.weight", "wpe.weight", False
    for i in range(n_layer):
        for ours, theirs in NORMS.items():
            yield f"blocks.{i}.{ours}.weight", f"h.{i}.{theirs}.weight", False
            yield f"blocks.{i}.{ours}.bias", f"h.{i}.{theirs}.bias", False
        for ours, theirs in LINEARS.items():
            yield f"blocks.{i}.{ours}.weight", f"h.{i}.{theirs}.weight", True
            yield f"blocks.{i}.{ours}.bias", f"h.{i}.{theirs}.bias", False
    yield "norm_f.weight", "ln_f.weight", False
    yield "norm_f.bias", "ln_f.bias", False


def to_lab(hf_state: dict, n_layer: int, source: str) -> dict:
    """A transformers GPT-2 state dict -> lab's, the head tied to the token embedding."""
    hf_state = {k.removeprefix(PREFIX): v for k, v in hf_state.items()}
    out = {}
    for ours, theirs, transposed in pairs(n_layer):
        if theirs not in hf_state:
            raise LabError(
                f"{source} has no tensor '{theirs}' (nor '{PREFIX}{theirs}'), which a GPT-2 "
                f"with n_layer = {n_layer} needs; the weights file does not match config.json"
            )
        tensor = hf_state[theirs]
        if not isinstance(tensor, torch.Tensor):
            raise LabError(
                f"{source}: '{theirs}' is a {type(tensor).__name__}, not a tensor; the weights "
                "file is not a model's state dict"
            )
        tensor = tensor.float()
        out[ours] = tensor.t().contiguous() if transposed else tensor
    out["head.weight"] = out["tok_emb.weight"]
    return out


def to_hf(lab_state: dict, n_layer: int) -> dict:
    """lab's state dict -> GPT2LMHeadModel's, as save_pretrained writes it: lm_head is left out
    because it is tied to wte, and from_pretrained ties it again."""
    out = {}
    for ours, theirs, transposed in pairs(n_layer):
        tensor = lab_state[ours].detach().float().cpu()
        out[PREFIX + theirs] = (tensor.t() if transposed else tensor).contiguous()
    return out
