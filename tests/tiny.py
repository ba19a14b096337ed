"""The tiny GPT-2 recipe the training tests run: 2 layers, 32 wide, on token files they write."""


def tiny_recipe(name: str, rest: str, data: str = "{data}", model_extra: str = "") -> str:
    """Model shape, components, data and optimizer; `rest` adds [schedule], [train], [generate].
    Placeholders like {data} and {out} are left for the caller's .format()."""
    return f'name = "{name}"\n' + """
[model]
block_size = 32
n_layer = 2
n_head = 2
n_embd = 32
""" + model_extra + """
[model.attention]
name = "sdpa"
[model.mlp]
name = "gelu"
[model.norm]
name = "layernorm"
[model.position]
name = "learned"
[tokenizer]
name = "gpt2"

[data]
name = "memmap"
path = \"""" + data + """\"

[optimizer]
name = "adamw"
lr = 3e-3
""" + rest
