"""The package's shape, read from its imports: no import circle, no reaching into another
module's private names (function-local imports included)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gem_jax"


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text("utf-8"), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules=None):
    """``({module: {imported gem_jax modules}}, [(module, imported, name)] of private names)``."""
    modules = modules or _modules()
    packages = {m for m in modules if (PACKAGE.parent / (m.replace(".", "/") + "/__init__.py")).exists()}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for name, tree in modules.items():
        aliases: dict[str, str] = {}  # local name -> gem_jax module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("gem_jax"):
                        target = a.name if a.name in modules else a.name.rsplit(".", 1)[0]
                        edges[name].add(target)
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(name, node, name in packages)
                if not src.startswith("gem_jax"):
                    continue
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in modules:  # "from gem_jax import files": the module itself
                        edges[name].add(sub)
                        aliases[a.asname or a.name] = sub
                    else:
                        edges[name].add(src)
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            private.append((name, src, a.name))
        for node in ast.walk(tree):  # module._private used through an alias
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != name):
                private.append((name, aliases[node.value.id], node.attr))
    for name in edges:
        edges[name].discard(name)
        # importing a package's module runs the package's __init__ first: not a circle of ours
        edges[name] = {e for e in edges[name] if e in modules}
    return edges, private


def cycles(edges) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _package_init_edges(edges):
    """Edges into a package's ``__init__`` from its own submodules are how Python works (the
    package runs first); a circle through them is still a circle."""
    return edges


def test_no_import_circles():
    edges, _ = import_graph()
    found = cycles(_package_init_edges(edges))
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_private_names_across_modules():
    _, private = import_graph()
    assert not private, "private names used across modules: " + ", ".join(
        f"{m} uses {src}.{n}" for m, src, n in sorted(set(private)))


def test_the_checker_finds_circles_and_private_names(tmp_path):
    """The checks above can fail: a circle and a private reach-in, written here, are found."""
    mods = {
        "gem_jax.a": ast.parse("from gem_jax import b\n"),
        "gem_jax.b": ast.parse("def f():\n    from gem_jax.a import _hidden\n    import gem_jax.c as c\n"
                               "    return c._secret\n"),
        "gem_jax.c": ast.parse("x = 1\n"),
    }
    edges, private = import_graph(mods)
    assert cycles(edges) == [["gem_jax.a", "gem_jax.b"]]
    assert ("gem_jax.b", "gem_jax.a", "_hidden") in private and ("gem_jax.b", "gem_jax.c", "_secret") in private


@pytest.mark.parametrize("module", ["gem_jax.cli", "gem_jax.demo"])
def test_the_demo_imports_no_cli_module(module):
    edges, _ = import_graph()
    if module == "gem_jax.demo":
        assert not any(e.startswith("gem_jax.cli") for e in edges[module])
    else:
        assert "gem_jax.cli.common" in edges[module]
