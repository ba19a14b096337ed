"""Plugins are found through entry points, one broken package does not sink the rest, and the core
names no concrete component."""

import ast
import pathlib
import types
from importlib.metadata import EntryPoint

import pytest
from pydantic import BaseModel

import lab.plugins as plugins
from lab import hookimpl
from lab.commands.cli import main
from lab.errors import LabError
from lab.slots import SLOTS

LAB = pathlib.Path(__file__).resolve().parents[1] / "lab"


def plugin(slot, name):
    class Config(BaseModel):
        pass

    @hookimpl
    def lab_components(register):
        register(slot, name, lambda config, *a: None, Config, "test component")

    return types.SimpleNamespace(lab_components=lab_components)


def test_builtin_components_come_through_entry_points():
    found = plugins.build_registry()
    names = {slot: set(c) for slot, c in found.components.items()}
    assert {"sdpa", "manual"} <= names["attention"]
    for slot in SLOTS:
        assert names[slot], f"no component registered for slot {slot}"
    assert found.get("attention", "sdpa").package == "lab"


def test_two_plugins_with_one_name_is_an_error_naming_both_packages():
    with pytest.raises(LabError) as err:
        plugins.build_registry(extra_plugins={"lab-fancy-attention": plugin("attention", "sdpa")})
    assert "'lab'" in str(err.value) and "'lab-fancy-attention'" in str(err.value)


def test_extra_plugin_registers_beside_the_builtins():
    found = plugins.build_registry(extra_plugins={"lab-flash": plugin("attention", "flash")})
    assert found.get("attention", "flash").package == "lab-flash"
    assert "sdpa" in found.components["attention"]


def test_unknown_slot_is_an_error_naming_the_package():
    with pytest.raises(LabError, match="lab-typo.*unknown slot 'atention'.*Did you mean 'attention'"):
        plugins.build_registry(extra_plugins={"lab-typo": plugin("atention", "x")})


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_load(monkeypatch, capsys):
    real = plugins.entry_points

    def with_a_broken_one(group):
        broken = EntryPoint(name="broken", value="lab_no_such_module_xyz", group=group)
        return list(real(group=group)) + [broken]

    monkeypatch.setattr(plugins, "entry_points", with_a_broken_one)
    found = plugins.build_registry()
    assert "sdpa" in found.components["attention"]
    assert found.failures and "lab_no_such_module_xyz" in found.failures[0][0]
    assert "failed to load" in capsys.readouterr().err


def test_lab_plugins_lists_every_slot_and_marks_the_recipes_choices(capsys, gpt_small_path):
    assert main(["plugins", gpt_small_path]) == 0
    out = capsys.readouterr().out
    for slot in SLOTS:
        assert f"{slot}:" in out
    assert "* sdpa" in out and "  manual" in out and "[lab]" in out


def _string_constants(path):
    """String literals in a module, leaving out docstrings (prose may mention components)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def test_the_core_names_no_concrete_component():
    """design.md's one rule: every component reaches the core through a plugin."""
    names = {n for comps in plugins.registry().components.values() for n in comps}
    for path in LAB.rglob("*.py"):
        leaked = names & _string_constants(path)
        assert not leaked, f"{path.relative_to(LAB.parent)} names component(s) {sorted(leaked)}"


def test_a_config_written_as_a_plain_pydantic_model_gets_the_hook_defaults_and_stays_strict():
    """Packages written before lab.slots.ComponentConfig keep working: their Config is given the
    optional hooks' defaults (no getattr probing in the core) and refuses unknown keys like every
    other component's."""
    from lab.recipe import read_toml, resolve
    from lab.slots import ComponentConfig

    class OldConfig(BaseModel):
        width: int = 3

    @hookimpl
    def lab_components(register):
        register("schedule", "old", lambda config, max_steps: lambda step: 1.0, OldConfig, "old style")

    found = plugins.build_registry(
        extra_plugins={"lab-old": types.SimpleNamespace(lab_components=lab_components)}
    )
    Config = found.get("schedule", "old").Config
    assert issubclass(Config, ComponentConfig) and Config.works_on_shards and Config.extra_settings == []
    assert Config(width=5).width == 5 and Config().check_recipe(None) is None
    with pytest.raises(Exception, match="extra"):
        Config(widht=5)
    raw = {**read_toml(str(LAB.parent / "recipes" / "tiny.toml")), "schedule": {"name": "old", "width": 7}}
    assert resolve(raw, "tiny.toml", plugins=found).parts["schedule"].config.width == 7


def test_the_slot_table_is_what_recipes_plugins_and_conformance_use():
    """One table: every slot has an interface, a recipe table and conformance checks that exist."""
    import lab.testing
    from lab.recipe import LAYER_SLOTS, MANY, TABLES

    for slot in SLOTS.values():
        assert isinstance(slot.interface, type) and slot.table and slot.checks, slot.name
        assert [c.__name__ for c in lab.testing.CHECKS[slot.name]] == list(slot.checks)
        assert (slot.name in MANY) == slot.many and (slot.name in TABLES) != slot.many
        assert (slot.name in LAYER_SLOTS) == slot.per_layer
    assert set(plugins.registry().components) == set(SLOTS)
