"""How readable the code is, in numbers: file sizes, the longest functions, import cycles, the round.

    python scripts/code_report.py            # the package: specwhisper/, kernels/, weights/
    python scripts/code_report.py --root DIR # another checkout (e.g. an older commit, to compare)

Imports are read from the source (nothing is imported), counting imports inside functions and
skipping those under `if TYPE_CHECKING:`, which exist only for type hints. A cycle is a strongly
connected group of modules in that graph. The speculative round is the function that holds the
draft -> verify -> accept loop body: `speculative_round` when it exists, else `speculative_decode`.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

# Folder of the checkout -> the package name its modules import as (see pyproject.toml).
PACKAGES = {"specwhisper": "specwhisper", "kernels": "specwhisper.kernels", "weights": "specwhisper.weights"}
LONG_FUNCTION = 80  # lines


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.AST) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:`."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = here[:len(here) - node.level + 1] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                submodules = [f"{prefix}.{alias.name}" for alias in node.names]
                # `from . import attention` imports a submodule, not the package's own code.
                targets = submodules + ([prefix] if not all(m in mods for m in submodules) else [])
            for target in targets:
                if target in mods and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def local_names(fn: ast.FunctionDef) -> set[str]:
    """Names bound inside the function (parameters excluded), not counting nested functions' own."""
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    params = {a.arg for a in fn.args.args + fn.args.kwonlyargs + fn.args.posonlyargs}
    return names - params


def short(module: str) -> str:
    return module.split(".", 1)[1] if "." in module else module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    root = Path(args.root)
    mods = modules(root)
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in mods.items()}

    sizes = sorted(((len(p.read_text(encoding="utf-8").splitlines()), n) for n, p in mods.items()), reverse=True)
    print(f"modules: {len(mods)}, lines: {sum(s for s, _ in sizes)}")
    print("largest files: " + ", ".join(f"{short(n)} {s}" for s, n in sizes[:args.top]))

    spans = sorted(((fn.end_lineno - fn.lineno + 1, f"{short(n)}.{fn.name}")
                    for n, t in trees.items() for fn in functions(t)), reverse=True)
    print("longest functions: " + ", ".join(f"{name} {lines}" for lines, name in spans[:args.top]))
    long = [f"{name} {lines}" for lines, name in spans if lines > LONG_FUNCTION]
    print(f"functions over {LONG_FUNCTION} lines: {len(long)}" + (f" ({', '.join(long)})" if long else ""))

    found = cycles(import_graph(mods))
    print(f"import cycles (imports inside functions included): {len(found)}")
    for component in found:
        print("  " + " <-> ".join(short(m) for m in component))

    spec = trees.get("specwhisper.speculative")
    if spec is not None:
        by_name = {fn.name: fn for fn in functions(spec)}
        fn = by_name.get("speculative_round") or by_name.get("speculative_decode")
        params = len(fn.args.args) + len(fn.args.kwonlyargs)
        loops = [n for n in ast.walk(fn) if isinstance(n, ast.While)]
        loop = f", its while-loop {loops[0].end_lineno - loops[0].lineno + 1} lines" if loops else ""
        print(f"the round ({fn.name}): {fn.end_lineno - fn.lineno + 1} lines, {params} parameters, "
              f"{len(local_names(fn))} locals{loop}")
        print(f"speculative.py: {len(spec.body)} top-level statements, "
              f"{len(mods['specwhisper.speculative'].read_text(encoding='utf-8').splitlines())} lines")


if __name__ == "__main__":
    main()
