"""The layout rules of the codebase, checked on its source: no import cycle among library modules (function-level
imports included), no private name imported from one library module into another, the CLI on the public API only,
and no variant switches outside the variant definitions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import localify

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "localify"
CLI = ROOT / "cli"


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(LIB.glob("*.py"))}


def _imports(tree: ast.Module) -> list[tuple[str, list[str], bool]]:
    """(imported library module, names, at top level) for every in-package import, nested ones included."""
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [a.name for a in node.names]
            if node.module:
                out.append((node.module.split(".")[0], names, id(node) in top))
            else:  # from . import x
                out += [(n, [], id(node) in top) for n in names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("localify."):
            out.append((node.module.split(".")[1], [a.name for a in node.names], id(node) in top))
    return out


def test_no_import_cycle_counting_function_level_imports() -> None:
    mods = _modules()
    graph = {m: {i for i, _, _ in _imports(t) if i in mods and i != m} for m, t in mods.items() if m != "__init__"}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(n):] + [n]) if n in path else n)
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_in_package_imports_at_top_and_no_private_names_across_modules() -> None:
    for name, tree in _modules().items():
        for mod, names, top in _imports(tree):
            assert top, f"localify/{name}.py imports .{mod} inside a function"
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"localify/{name}.py imports private {private} from .{mod}"


def test_cli_uses_the_public_api_only() -> None:
    public = set(localify.__all__) | {"errors"}
    for p in sorted(CLI.glob("*.py")):
        tree = ast.parse(p.read_text(), str(p))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("localify"):
                assert node.module in ("localify", "localify.errors"), f"{p.name} imports {node.module}"
                assert all(a.name in public for a in node.names), f"{p.name}: {[a.name for a in node.names]}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "localify":
                assert node.attr in public, f"{p.name} uses localify.{node.attr}, not a public name"


def _variant_switches(path: Path) -> list[str]:
    """Names of the spliced classes and comparisons with variant names in a file's code (not its docstrings)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Name) and node.id in ("LocalityLinear", "LocalViTFFN", "PRESERVING"):
            found.append(node.id)
        if isinstance(node, ast.Attribute) and node.attr in ("LocalityLinear", "LocalViTFFN"):
            found.append(node.attr)
        if isinstance(node, ast.Compare):
            consts = [c for c in ast.walk(node) if isinstance(c, ast.Constant)]
            found += [c.value for c in consts if c.value in ("dwconv", "residual", "localvit")]
    return found


@pytest.mark.parametrize("path", [LIB / "_convert.py", LIB / "_io.py", LIB / "_export.py", LIB / "_splice.py",
                                  LIB / "_plan.py", CLI / "verify.py", CLI / "convert.py"], ids=lambda p: p.name)
def test_no_variant_switches_outside_the_variants(path: Path) -> None:
    assert not _variant_switches(path), f"{path.name}: variant knowledge belongs in localify/_variants.py"
