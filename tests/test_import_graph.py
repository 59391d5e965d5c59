"""The import graph of the library: stages depend only on earlier stages (data flows one way), no module imports a
``_private`` name of another module, nothing under the library imports ``saesteer.cli``, and no import circles —
counting imports inside functions, and resolving names imported from a package's ``__init__`` to the module that
defines them (so a re-export cannot hide a circle). Reads the source as text (ast); nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "saesteer"
# The stages in dependency order: a stage may import itself and any stage before it. (Generation is a model-level
# service — greedy decoding with whatever hooks are registered — that data (the chat mix's answers), evals and
# features use; features (the clamp grid) judges steered answers, so it follows steering and evals; gating turns
# steering options and policy files into the Steering that evals run under.)
STAGES = ["core", "models", "generation", "data", "activations", "sae", "steering", "gating", "evals", "features",
          "experiments", "serve", "cli"]


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


MODS = _modules()


def _is_pkg(name: str) -> bool:
    return MODS[name].name == "__init__.py"


def _target(cur: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = cur.split(".")
    keep = len(base) - node.level + (1 if _is_pkg(cur) else 0)
    return ".".join(base[:keep] + ([node.module] if node.module else []))


def _reexports(pkg: str) -> dict[str, str]:
    """name -> defining module, for the names a package's __init__ imports from its submodules (transitively)."""
    out: dict[str, str] = {}
    for node in ast.walk(ast.parse(MODS[pkg].read_text())):
        if isinstance(node, ast.ImportFrom):
            tgt = _target(pkg, node)
            for a in node.names:
                sub = f"{tgt}.{a.name}"
                if sub in MODS:
                    out[a.asname or a.name] = sub
                elif tgt in MODS:
                    src = _reexports(tgt).get(a.name, tgt) if _is_pkg(tgt) and tgt != pkg else tgt
                    out[a.asname or a.name] = src
    return out


def _edges() -> tuple[dict[str, set[str]], list[str], list[str]]:
    graph: dict[str, set[str]] = {}
    private, cli_use = [], []
    for name, path in MODS.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("saesteer.") and a.name in MODS:
                        deps.add(a.name)
                continue
            if not isinstance(node, ast.ImportFrom):
                continue
            tgt = _target(name, node)
            if not (tgt == "saesteer" or tgt.startswith("saesteer.")):
                continue
            for a in node.names:
                if f"{tgt}.{a.name}" in MODS:
                    dep = f"{tgt}.{a.name}"
                elif tgt in MODS and _is_pkg(tgt) and not name.startswith(tgt + "."):
                    dep = _reexports(tgt).get(a.name, tgt)
                else:
                    dep = tgt
                if dep in MODS and dep != name:
                    deps.add(dep)
                if a.name.startswith("_") and not a.name.startswith("__") and dep != name:
                    private.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {name} imports {tgt}.{a.name}")
            if tgt.startswith("saesteer.cli") and not name.startswith(("saesteer.cli", "saesteer.__main__")):
                cli_use.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {name} imports {tgt}")
        graph[name] = deps
    return graph, private, cli_use


GRAPH, PRIVATE, CLI_USE = _edges()


def _stage(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_every_subpackage_is_a_known_stage():
    pkgs = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert pkgs <= set(STAGES), pkgs - set(STAGES)


def test_no_private_imports_across_modules():
    assert PRIVATE == []


def test_library_never_imports_the_cli():
    assert CLI_USE == []


def test_stages_depend_only_on_earlier_stages():
    bad = []
    for mod, deps in GRAPH.items():
        s = _stage(mod)
        if s is None:
            continue
        for d in deps:
            t = _stage(d)
            if t is not None and STAGES.index(t) > STAGES.index(s):
                bad.append(f"{mod} ({s}) imports {d} ({t})")
    assert bad == [], "\n".join(sorted(bad))


def test_no_import_circles():
    color: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def dfs(u: str) -> None:
        color[u] = 1
        stack.append(u)
        for v in sorted(GRAPH.get(u, ())):
            if _is_pkg(v) and u.startswith(v + "."):
                continue  # a submodule sees its own package's __init__ only as the namespace it lives in
            if color.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif not color.get(v):
                dfs(v)
        stack.pop()
        color[u] = 2

    for m in sorted(GRAPH):
        if not color.get(m):
            dfs(m)
    assert cycles == [], "\n".join(cycles)


@pytest.mark.parametrize("bad", ["private", "circle", "cli"])
def test_the_checks_can_fail(bad, tmp_path, monkeypatch):
    """The checker itself finds a planted private import, a planted circle and a planted library→cli import."""
    import test_import_graph as g

    root = tmp_path / "saesteer"
    (root / "core").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "cli").mkdir()
    for d in (root, root / "core", root / "models", root / "cli"):
        (d / "__init__.py").write_text("")
    a = {"private": "from saesteer.models.m import _hidden\n", "circle": "from saesteer.models.m import f\n",
         "cli": "from saesteer.cli import main\n"}[bad]
    (root / "core" / "c.py").write_text(a + "def g():\n    pass\n")
    (root / "models" / "m.py").write_text(("from saesteer.core.c import g\n" if bad == "circle" else "")
                                          + "def f():\n    pass\n_hidden = 1\n")
    monkeypatch.setattr(g, "ROOT", root)
    monkeypatch.setattr(g, "MODS", g._modules())
    graph, private, cli_use = g._edges()
    monkeypatch.setattr(g, "GRAPH", graph)
    monkeypatch.setattr(g, "PRIVATE", private)
    monkeypatch.setattr(g, "CLI_USE", cli_use)
    check = {"private": g.test_no_private_imports_across_modules, "circle": g.test_no_import_circles,
             "cli": g.test_library_never_imports_the_cli}[bad]
    with pytest.raises(AssertionError):
        check()
