"""Parameter roles: what each parameter is for, so an optimizer groups by meaning, not by attribute
names or tensor rank.

The model gives its own parameters the core roles (`embedding`, `head`, `position`); a component
names its own with `set_role(self.router, "router")`. A parameter nobody named gets a default from
its shape: `bias` for a parameter called bias, `vector` for any other of rank < 2, `matrix` for
rank >= 2. A component may use a role of its own (a MoE's `router`) after `declare_role`, so that
a typo (`"matirx"`) is caught when the component is built.

The optimizer factory is handed `params`: a list of `Param(name, param, role)`, one per trainable
parameter (a tied parameter once), and the model.
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

from torch import nn

from lab.errors import LabError, did_you_mean

M = TypeVar("M", bound=nn.Module)  # set_role returns the module it was given, its type kept

ROLES: dict[str, str] = {
    # the core's: the model sets these
    "embedding": "the token embedding (also the head when they are tied)",
    "head": "the LM head's matrix, when not tied to the embedding",
    "position": "the position component's parameters (learned positions)",
    # the components': set with set_role, or the default from the shape
    "matrix": "a weight matrix of a hidden layer (default for rank >= 2)",
    "vector": "any other parameter of rank < 2 (default)",
    "gain": "a norm's scale",
    "bias": "a bias (default for a parameter called bias)",
}


class Param(NamedTuple):
    name: str  # as in model.named_parameters(): "blocks.0.mlp.fc.weight"
    param: nn.Parameter
    role: str


def declare_role(role: str, description: str) -> str:
    """Make a role of your own known (e.g. "router"), once, at import. Returns the role."""
    ROLES.setdefault(role, description)
    return role


def set_role(module: M, role: str, *names: str) -> M:
    """Give `module`'s parameters (all of them, its submodules' too, or only those `names`) a role.
    Returns the module. The role is kept on the module, so it survives .to(), deepcopy and FSDP2."""
    if role not in ROLES:
        raise LabError(
            f"unknown parameter role '{role}'.{did_you_mean(role, ROLES)} Roles: "
            f"{', '.join(ROLES)}; a role of your own needs lab.roles.declare_role('{role}', "
            "'what it is') first"
        )
    for sub in module.modules():
        roles = sub.__dict__.setdefault("_lab_roles", {})
        for name in sub._parameters:
            if not names or (sub is module and name in names):
                roles[name] = role
    missing = [n for n in names if n not in module._parameters]
    if missing:
        raise LabError(
            f"set_role('{role}') names parameters {missing} that {type(module).__name__} does not "
            f"have; it has: {', '.join(module._parameters) or 'none'}"
        )
    return module


def default_role(name: str, param) -> str:
    if name == "bias":
        return "bias"
    return "matrix" if param.dim() >= 2 else "vector"


def parameters(model: nn.Module) -> list[Param]:
    """Every trainable parameter once (the first name of a tied one), with its role."""
    out, seen = [], set()
    for prefix, module in model.named_modules():
        roles = module.__dict__.get("_lab_roles", {})
        for name, p in module._parameters.items():
            if p is None or id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            out.append(
                Param(f"{prefix}.{name}" if prefix else name, p, roles.get(name) or default_role(name, p))
            )
    return out


def build_optimizer(part, model: nn.Module):
    """The recipe's optimizer over `model`: its factory gets (config, parameters(model), model)."""
    return part.build(parameters(model), model)
