"""The layers of lab/ (docs/architecture.md), checked: imports flow one way, none goes round in a
circle, and plugins use only what docs/writing-plugins.md documents.

    lab/*.py, lab/runs/   the plugin API: imports only itself
    lab/data/             + the API
    lab/inference/        + data
    lab/engine/           + data, inference
    lab/commands/         anything in lab
    plugins/components/   the API and data (and other components)
    plugins/apps/         the API, data, inference, engine (not commands)

Every import counts, those inside functions too: an import moved into a function to dodge a cycle
is still a cycle.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ["api", "data", "inference", "engine", "commands"]  # each may import those before it
ALLOWED = {
    "api": {"api"},
    "data": {"api", "data"},
    "inference": {"api", "data", "inference"},
    "engine": {"api", "data", "inference", "engine"},
    "commands": set(LAYERS),
    "component": {"api", "data"},  # data sources read text and token files with lab.data
    "app": {"api", "data", "inference", "engine"},
}


def layer_of_module(name: str) -> str | None:
    """The layer of a module of lab's, by its dotted name; None for anything else."""
    parts = name.split(".")
    if parts[0] != "lab":
        return None
    if name == "lab.__main__":  # python -m lab: the command line
        return "commands"
    if len(parts) > 1 and parts[1] in ("data", "inference", "engine", "commands"):
        return parts[1]
    return "api"  # lab, lab.errors, lab.runs, lab.runs.checkpoint...


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "plugins":
        parts = parts[2:]  # plugins/components/lab_mlp/gelu.py -> lab_mlp.gelu
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, relative ones resolved; `from X import name` also
    yields X.name, which is the module when name is a submodule."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def files(where: str) -> list[pathlib.Path]:
    return sorted((ROOT / where).rglob("*.py"))


def own_modules() -> set[str]:
    return {module_name(p) for p in files("lab")}


def lab_imports(path: pathlib.Path) -> set[tuple[int, str]]:
    """The modules of lab's that the file imports (X.name kept only where it is a module)."""
    known = own_modules()
    return {(line, m) for line, m in imports(path) if m in known}


def broken_rules(paths, layer_of_file) -> list[str]:
    broken = []
    for path in paths:
        mine = layer_of_file(path)
        for line, module in sorted(lab_imports(path)):
            theirs = layer_of_module(module)
            if theirs not in ALLOWED[mine]:
                broken.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {module} ({theirs})")
    return broken


def test_lab_imports_flow_one_way():
    assert broken_rules(files("lab"), lambda p: layer_of_module(module_name(p))) == []


@pytest.mark.parametrize("kind", ["components", "apps"])
def test_plugins_import_only_what_they_may(kind):
    layer = "component" if kind == "components" else "app"
    assert broken_rules(files(f"plugins/{kind}"), lambda p: layer) == []


def test_components_never_import_apps():
    apps = {p.name for p in (ROOT / "plugins" / "apps").iterdir() if p.is_dir()}
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in files("plugins/components")
        for line, module in imports(path)
        if module.partition(".")[0] in apps
    ]
    assert wrong == []


def test_no_import_cycle():
    """Between lab's modules and inside each plugin package, no module reaches itself again."""
    paths = files("lab") + files("plugins")
    names = {module_name(p) for p in paths}
    graph = {module_name(p): {m for _, m in imports(p) if m in names and m != module_name(p)} for p in paths}
    # A package imports its submodules' names by way of its __init__: that edge is the package's own.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    # A package importing from its own name (`from lab.runs import x` inside lab/runs/__init__.py)
    # runs its __init__ half-done: a cycle of one.
    cycles += [[module_name(p)] for p in paths if module_name(p) in {m for _, m in imports(p)}]
    assert cycles == [], f"import cycles: {cycles}"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that reach one another."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checks_can_fail():
    """The rule and the cycle finder catch what they are for."""
    assert layer_of_module("lab.engine.trainer") == "engine" and layer_of_module("lab.runs") == "api"
    assert "engine" not in ALLOWED["api"] and "commands" not in ALLOWED["app"]
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"], ["c"]]
