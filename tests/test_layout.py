"""The package's shape: no private names imported across modules, no import cycles, shipped files alone."""

from __future__ import annotations

import ast
from pathlib import Path

import vac

ROOT = Path(vac.__file__).parent


def modules() -> dict[str, ast.Module]:
    result = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        result[name] = (path, ast.parse(path.read_text()))
    return result


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module if node.module and node.module.split(".")[0] == "vac" else None
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(top_level_only: bool):
    """(importer, imported module, names) for every ``from vac... import`` in the package."""
    for name, (path, tree) in modules().items():
        nodes = tree.body if top_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                target = resolve(name, node, path.name == "__init__.py")
                if target:
                    yield name, target, [a.name for a in node.names]


def test_no_module_imports_a_private_name_from_another():
    private = [(importer, target, n) for importer, target, names in imports(top_level_only=False)
               for n in names if n.startswith("_") and target != importer]
    assert private == []


def test_no_import_cycles_at_module_level():
    known = set(modules())
    graph: dict[str, set[str]] = {m: set() for m in known}
    for importer, target, names in imports(top_level_only=True):
        for n in names:  # `from . import x` imports the submodule x
            if f"{target}.{n}" in known:
                graph[importer].add(f"{target}.{n}")
        if target in known:
            graph[importer].add(target)
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for nxt in sorted(graph[m]):
            if nxt == m or nxt.startswith(m + "."):  # a package importing its own submodules
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [m, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_stage_packages():
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert {"core", "search", "recover", "deploy", "data", "models", "checkpoint", "cli"} <= folders
    assert len([p for p in ROOT.glob("*.py")]) <= 6  # the rest lives in the stage packages


def test_shipped_files_import_no_vac():
    for name in ("configuration_vac.py", "modeling_vac.py"):
        tree = ast.parse((ROOT / "checkpoint" / "hf" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in ("torch", "transformers"), node.module
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in ("torch", "transformers") for a in node.names)


def test_import_vac_registers_the_checkpoint_classes():
    from transformers import AutoConfig

    assert AutoConfig.for_model("vac_llama").model_type == "vac_llama"
    assert AutoConfig.for_model("vac_olmo3").model_type == "vac_olmo3"
