"""The hooks a lab plugin can implement. Bodies are docstrings: pluggy calls the implementations."""

import pluggy

hookspec = pluggy.HookspecMarker("lab")


@hookspec
def lab_components(register):
    """Register components by calling `register(slot, name, factory, Config, description)`.

    slot:        one of lab.slots.SLOTS ("attention", "mlp", "norm", ...)
    name:        what a recipe writes, e.g. `[model.attention] name = "..."`
    factory:     builds the component; its arguments depend on the slot (see lab.interfaces)
    Config:      a pydantic model of the component's settings, with defaults and a doc per field
    description: one line for `lab plugins`
    """


@hookspec
def lab_commands(subparsers):
    """Add subcommands to `lab`: `p = subparsers.add_parser(NAME, help=...)`, then
    `p.set_defaults(func=callable(args) -> exit status)`. Raise lab.errors.LabError for user errors."""
