"""Finding components: every plugin, built-in or third-party, comes through the entry-point group
`lab.plugins` and registers its components with the `lab_components` hook."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable

import pluggy
from pydantic import BaseModel

from lab import hookspecs
from lab.errors import LabError, did_you_mean, plugin_error
from lab.slots import SLOTS, ComponentConfig

GROUP = "lab.plugins"


@dataclass(frozen=True)
class Component:
    slot: str
    name: str
    factory: Callable
    Config: type[BaseModel]
    description: str
    package: str  # the distribution that provides it, e.g. "lab" or "lab-linear-attention"


@dataclass
class Registry:
    components: dict[str, dict[str, Component]] = field(default_factory=lambda: {slot: {} for slot in SLOTS})
    failures: list[tuple[str, str]] = field(default_factory=list)  # (package, error) that failed
    hook: object = None  # pluggy's hook relay, for hooks other than lab_components
    package_of: dict[str, str] = field(default_factory=dict)  # pluggy's plugin name -> its package

    def call_each(self, hook: str, what: str, **kwargs) -> None:
        """Call a hook's implementations one by one, so an error in one is said with its package's
        name (lab.errors.PluginError) instead of a traceback through pluggy."""
        for impl in getattr(self.hook, hook).get_hookimpls():
            package = self.package_of.get(impl.plugin_name, impl.plugin_name)
            try:
                impl.function(**kwargs)
            except Exception as e:
                raise plugin_error(package, what, e) from e

    def get(self, slot: str, name: str, where: str = "") -> Component:
        """The component, or a LabError naming what exists and the closest match."""
        if slot not in self.components:
            raise LabError(
                f"unknown slot '{slot}'; slots are: {', '.join(SLOTS)}.{did_you_mean(slot, SLOTS)}"
            )
        found = self.components[slot]
        if name in found:
            return found[name]
        where = f" in {where}" if where else ""
        available = ", ".join(sorted(found)) or "none (is lab installed? pip install -e .)"
        raise LabError(f"unknown {slot} '{name}'{where}; available: {available}.{did_you_mean(name, found)}")

    def add(self, component: Component) -> None:
        if component.slot not in SLOTS:
            raise LabError(
                f"package '{component.package}' registers '{component.name}' in an unknown slot "
                f"'{component.slot}'; slots are: {', '.join(SLOTS)}.{did_you_mean(component.slot, SLOTS)}"
            )
        if not (isinstance(component.Config, type) and issubclass(component.Config, BaseModel)):
            raise LabError(
                f"package '{component.package}' registers {component.slot} '{component.name}' "
                "with a Config that is not a pydantic BaseModel subclass"
            )
        if not issubclass(component.Config, ComponentConfig):  # written before ComponentConfig: give it
            component = dataclasses.replace(component, Config=_with_hook_defaults(component.Config))
        taken = self.components[component.slot].get(component.name)
        if taken is not None:
            raise LabError(
                f"{component.slot} '{component.name}' is registered twice: by package "
                f"'{taken.package}' and by package '{component.package}'. Uninstall one of them "
                "(pip uninstall NAME), or rename the component in one."
            )
        self.components[component.slot][component.name] = component


def _with_hook_defaults(config: type[BaseModel]) -> type[ComponentConfig]:
    """A plain pydantic Config as a ComponentConfig: the same fields, the optional hooks' defaults."""
    if config is BaseModel:  # no settings at all
        return ComponentConfig
    return type(config.__name__, (config, ComponentConfig), {"__module__": config.__module__,
                                                             "__doc__": config.__doc__})  # fmt: skip


def lazy_command(module: str, name: str, needs: tuple[str, ...] = (), extra: str = "") -> Callable:
    """A command handler imported when the command runs, not when `lab` starts: every command's
    parser is built at start-up, and its module may import heavy libraries (a web server, lm-eval).
    For a `lab_commands` hook: `parser.set_defaults(func=lazy_command("my_pkg.cli", "cli_mine"))`.
    needs: the libraries of an optional extra that the command imports; one missing is one message
    naming `pip install 'lab[EXTRA]'`, not an ImportError."""

    def run(args):
        for library in needs:
            try:
                importlib.import_module(library)
            except ImportError:
                raise LabError(f"this command needs {library}: pip install 'lab[{extra}]'") from None
        return getattr(importlib.import_module(module), name)(args)

    return run


def _distribution_name(ep) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else ep.value.split(":")[0]


def _plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("lab")
    pm.add_hookspecs(hookspecs)
    return pm


def build_registry(extra_plugins: dict[str, object] | None = None, warn=True) -> Registry:
    """Load every installed plugin (each on its own: one that fails to import is reported with
    its package name and the rest still load), plus `extra_plugins` {package: module-or-object}."""
    registry = Registry()
    pm = _plugin_manager()
    package_of: dict[str, str] = {}
    for ep in entry_points(group=GROUP):
        package = _distribution_name(ep)
        try:
            pm.register(ep.load(), name=f"{package}:{ep.name}")
        except Exception as e:  # a broken plugin must not take the others down
            registry.failures.append((package, f"{type(e).__name__}: {e}"))
            if warn:
                print(
                    f"warning: plugin package '{package}' (entry point '{ep.name}') failed to "
                    f"load and is skipped: {type(e).__name__}: {e}",
                    file=sys.stderr,
                )
            continue
        package_of[f"{package}:{ep.name}"] = package
    for package, plugin in (extra_plugins or {}).items():
        pm.register(plugin, name=f"{package}:extra")
        package_of[f"{package}:extra"] = package

    # Call each plugin's hook on its own so every component knows which package registered it.
    for impl in pm.hook.lab_components.get_hookimpls():
        package = package_of[impl.plugin_name]

        def register(slot, name, factory, Config, description="", _package=package):
            registry.add(Component(slot, name, factory, Config, description, _package))

        try:
            impl.function(register=register)
        except Exception as e:
            raise plugin_error(package, "its lab_components hook", e) from e
    registry.hook, registry.package_of = pm.hook, package_of
    return registry


_registry: Registry | None = None


def registry() -> Registry:
    """The registry of installed plugins, loaded once per process."""
    global _registry
    if _registry is None:
        _registry = build_registry()
    return _registry
