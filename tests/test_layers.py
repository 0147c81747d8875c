"""The package's imports go down only: no cycle, no import of a higher layer.

Every `import` / `from ... import` in moka_jax/ is read with ast, function-local ones included
(a lazy import is still a dependency), and checked against LAYERS, lowest first. A module may
import its own layer or a lower one; within a layer the order is free, but a cycle fails.

    python -m tests.test_layers          # prints modules, layers, import links and cycles
    python tests/test_layers.py --edges  # ... and every link, layer by layer
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "moka_jax"

# Lowest first. A module belongs to the longest prefix that names it.
LAYERS = (
    ("support", ["moka_jax.support"]),
    ("core", ["moka_jax.core"]),
    ("quant", ["moka_jax.quant"]),
    ("variables", ["moka_jax.variables"]),
    ("adapters", ["moka_jax.adapters"]),
    ("nn", ["moka_jax.nn"]),
    ("models", ["moka_jax.models"]),
    ("config", ["moka_jax.config"]),
    ("data", ["moka_jax.data"]),
    ("io", ["moka_jax.io"]),
    ("api", ["moka_jax.api"]),
    ("training", ["moka_jax.training"]),
    ("eval", ["moka_jax.eval"]),
    ("parity", ["moka_jax.parity"]),
    ("cli", ["moka_jax.cli"]),
    ("face", ["moka_jax"]),  # moka_jax/__init__.py: lazy, imports nothing at import time
)


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(node, module: str, is_package: bool, known) -> list[str]:
    """Package modules that one import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolve against the importing module's package
            pkg = module.split(".") if is_package else module.split(".")[:-1]
            pkg = pkg[:len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        # `from a import b` names the submodule a.b when there is one, else the module a.
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = []
    for name in names:
        while name and name not in known:  # `import a.b.c` of a name inside a module
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """{module: {imported module: line of the first import}} within the package."""
    files = module_files(root, package)
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges = graph.setdefault(module, {})
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _imported(node, module, path.name == "__init__.py", files):
                    if target != module:
                        edges.setdefault(target, node.lineno)
    return graph


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py LAYERS; add it")
    return best


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def levels(graph) -> dict[str, int]:
    """Import level of each module: 1 + the highest level it imports (a cycle counts as one)."""
    comp = {v: i for i, c in enumerate(cycles(graph)) for v in c}
    level: dict[str, int] = {}

    def lv(v, seen=()):
        if v in level:
            return level[v]
        seen = (*seen, v)
        below = [lv(w, seen) for w in graph[v] if w not in seen
                 and not (v in comp and comp.get(w) == comp[v])]
        level[v] = 1 + max(below, default=0)
        return level[v]

    for v in graph:
        lv(v)
    return level


def figures(graph) -> dict:
    lv = levels(graph)
    return {"modules": len(graph), "levels": max(lv.values(), default=0),
            "links": sum(len(e) for e in graph.values()), "cycles": len(cycles(graph))}


def upward_imports(graph) -> list[str]:
    files = module_files()
    bad = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            lo, hi = layer_of(module), layer_of(target)
            if hi > lo:
                rel = files[module].relative_to(ROOT)
                bad.append(f"{rel}:{line}: {module} (layer {LAYERS[lo][0]}) imports {target} "
                           f"(layer {LAYERS[hi][0]}, higher)")
    return bad


# ---- the tests ------------------------------------------------------------------------------

def test_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    lines = []
    for comp in found:
        members = set(comp)
        for m in comp:
            lines += [f"  {m} -> {t} (line {n})" for t, n in graph[m].items() if t in members]
    assert not found, "import cycles in moka_jax:\n" + "\n".join(lines)


def test_imports_go_down_only():
    bad = upward_imports(import_graph())
    assert not bad, ("imports that climb the layers of tests/test_layers.py:\n  "
                     + "\n  ".join(bad))


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_public_face_imports_nothing_eagerly():
    """moka_jax/__init__.py names its exports lazily (module __getattr__)."""
    graph = import_graph()
    assert not graph[PACKAGE], f"moka_jax/__init__.py imports {sorted(graph[PACKAGE])}"


def test_bench_has_no_import_cycle():
    """bench/ scripts import their helpers as siblings (bench/ is on sys.path)."""
    bench = ROOT / "bench"
    names = {p.stem for p in bench.glob("*.py")}
    graph = {}
    for p in bench.glob("*.py"):
        edges = graph.setdefault(p.stem, {})
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            for t in targets:
                if t in names and t != p.stem:
                    edges.setdefault(t, node.lineno)
    assert not cycles(graph), f"import cycles among bench/ scripts: {cycles(graph)}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    graph = import_graph()
    f = figures(graph)
    print(f"moka_jax: {f['modules']} modules on {f['levels']} import levels, "
          f"{f['links']} import links, {f['cycles']} cycles")
    for comp in cycles(graph):
        print("  cycle: " + " <-> ".join(comp))
    try:
        bad = upward_imports(graph)
        used = sorted({layer_of(m) for m in graph})
        print(f"declared layers: {len(used)} ({' < '.join(LAYERS[i][0] for i in used)}); "
              f"upward imports: {len(bad)}")
        for line in bad:
            print("  " + line)
    except AssertionError as e:
        print(f"declared layers: not checked ({e})")
    if "--edges" in argv:
        for module in sorted(graph, key=lambda m: (levels(graph)[m], m)):
            print(f"{levels(graph)[module]:3d} {module} -> {', '.join(sorted(graph[module]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
