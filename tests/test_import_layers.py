"""How ``inferpass/`` imports itself: no cycle, layers import only downward, the eager path never imports Triton.

The import graph is read with ``ast`` from every ``inferpass/**/*.py``: each ``import`` statement
naming a module of ours, at module level or inside a function (an import inside a function that
closes a cycle is still a cycle). Importing ``a.b.c`` also runs the ``__init__`` of the packages
``a.b`` and ``a``, so those count as imported too, except the importer's own packages (already
being imported when it runs). Imports by name through ``importlib`` (the target registry, plugins)
are not statements and not edges.

The rule enforced: a module imports only modules of its own layer or of a lower one. A module's
layer is that of the longest entry of ``LAYERS`` naming it or a package above it; lowest first:

0. the foundation: the ``inferpass`` package itself, ``errors``, ``defaults``, ``progress``, ``plugins``;
1. ``ir.ops``, the op registry the kernels register into;
2. the kernels' planners and layouts (pure torch);
3. the Triton kernels;
4. ``triton_ops``, the Triton kernels as torch ops;
5. the rest of ``kernels``: op registration (``split_kv_op``, ``kv_quant_op``, the package, and
   ``cuda_kernels`` on ``triton_ops``) and ``compile_check``;
6. the rest of ``ir`` (``serialize`` imports ``kernels`` so that loading registers the built-in
   ops): so ``kernels`` sits beside ``ir`` and imports nothing of it but ``ir.ops``, and ``ir.ops``
   imports nothing of ``kernels``;
7. ``capture`` (it builds ``ir`` programs), 8. ``passes``, 9. ``targets``, 10. ``runtime``,
11. ``eval`` and ``serve``, 12. the front end: ``repro``, ``commands``, ``cli``.

A module under no entry fails the test until it is given a layer.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "inferpass"

_KERNELS = "inferpass.kernels"
LAYERS: tuple[tuple[str, ...], ...] = (
    ("inferpass", "inferpass.errors", "inferpass.defaults", "inferpass.progress", "inferpass.plugins"),
    ("inferpass.ir.ops",),
    tuple(f"{_KERNELS}.{m}" for m in ("decode_plan", "attention_state", "quantization", "quantized_cache",
                                      "split_kv_reference", "quantized_attention")),
    (f"{_KERNELS}.split_kv_triton", f"{_KERNELS}.kv_quant_triton"),
    (f"{_KERNELS}.triton_ops",),
    (_KERNELS,),
    ("inferpass.ir",),
    ("inferpass.capture",),
    ("inferpass.passes",),
    ("inferpass.targets",),
    ("inferpass.runtime",),
    ("inferpass.eval", "inferpass.serve"),
    ("inferpass.repro", "inferpass.commands", "inferpass.cli"),
)

ImportGraph = dict[str, dict[str, int]]  # importer -> {imported module: a line importing it}


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package at ``root`` (packages by their ``__init__.py``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _named(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Dotted names an import statement in ``module`` may load (``from p import x``: ``p`` and ``p.x``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph(root: Path) -> ImportGraph:
    """Which of the package's modules each module imports (see module doc for what counts)."""
    found = modules(root)
    graph: ImportGraph = {}
    for module, path in found.items():
        edges = graph.setdefault(module, {})
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _named(module, path.name == "__init__.py", node):
                parts = name.split(".")
                for target in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
                    if target in found and target not in own:
                        edges.setdefault(target, node.lineno)
    return graph


def cycles(graph: ImportGraph) -> list[list[str]]:
    """One cycle (first module repeated at the end) per strongly connected group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1 or node in graph.get(node, {}):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(graph, set(group), min(group)) for group in groups]


def _cycle_through(graph: ImportGraph, group: set[str], start: str) -> list[str]:
    """A shortest import path from ``start`` back to itself inside ``group`` (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    chain = [node]
                    while chain[-1] != start:
                        chain.append(parents[chain[-1]])
                    return [*reversed(chain), start]
                if nxt in group and nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def layer(module: str) -> int | None:
    """Index in ``LAYERS`` of the longest entry naming ``module`` or a package above it (``inferpass`` only itself)."""
    best, depth = None, -1
    for rank, names in enumerate(LAYERS):
        for name in names:
            covers = module == name or (name != "inferpass" and module.startswith(name + "."))
            if covers and name.count(".") > depth:
                best, depth = rank, name.count(".")
    return best


def _describe(graph: ImportGraph, cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_no_import_cycle_in_inferpass():
    graph = import_graph(ROOT)
    assert graph["inferpass.cli"].keys() >= {"inferpass.commands"}  # imports inside functions are read
    found = [_describe(graph, cycle) for cycle in cycles(graph)]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_a_cycle_closed_inside_a_function_is_found(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from pkg import a\n")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def late():\n    from pkg.a import thing\n    return thing\n")
    graph = import_graph(package)
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert _describe(graph, ["pkg.a", "pkg.b", "pkg.a"]) == "pkg.a (line 1) -> pkg.b (line 2) -> pkg.a"


def test_every_module_imports_only_its_layer_or_below():
    graph = import_graph(ROOT)
    unplaced = sorted(m for m in graph if layer(m) is None)
    assert not unplaced, f"modules with no layer in LAYERS: {unplaced}"
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)}) at line {line}"
              for a, edges in sorted(graph.items()) for b, line in sorted(edges.items()) if layer(b) > layer(a)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_eager_path_never_imports_triton():
    # torch's own probe for Triton (in torch._dynamo, which torch.export's serializer imports) would put it in
    # sys.modules; after the first check, blocking the import makes any import of it by ours fail instead
    code = ("import sys\n"
            "import inferpass.kernels, inferpass.targets.eager\n"
            "assert 'triton' not in sys.modules, 'inferpass.kernels or inferpass.targets.eager imported triton'\n"
            "sys.modules['triton'] = None\n"
            "import inferpass.ir.serialize\n"
            "from inferpass.targets import get_target\n"
            "get_target('eager')\n"
            "assert 'inferpass.kernels.cuda_kernels' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr[-3000:]
