"""Package structure: no import cycles (between modules, and between top-level folders), small files,
and megatron-core imported only inside ``megatron_spo/megatron/``.

The imports are read from the source with :mod:`ast` (nothing is imported, so no torch is needed).
Every import statement counts, wherever it is written: at module level, inside a function (lazy
imports), or under ``if TYPE_CHECKING:``; so do ``importlib.import_module("literal")`` calls. Only
what is written counts: importing ``megatron_spo.a.b`` is an edge to ``megatron_spo.a.b`` and not
also to the ``__init__`` modules Python runs on the way.
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

PACKAGE = "megatron_spo"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 450
# Folder (top-level subpackage) that alone may import megatron-core.
MEGATRON_FOLDER = "megatron"
# Cycles printed per strongly connected component; the component's edges are always all listed.
MAX_CYCLES_SHOWN = 20


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.lru_cache(maxsize=None)
def package_files() -> Dict[str, Path]:
    """``{module name: path}`` of every module of the package (a package is named by its ``__init__``)."""
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return package_files()[name].name == "__init__.py"


def _resolve_relative(current: str, module: Optional[str], level: int) -> str:
    """Absolute name of ``from {'.' * level}{module} import ...`` written in module ``current``."""
    base = current.split(".") if _is_package(current) else current.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def written_imports(name: str, tree: ast.AST) -> Iterator[Tuple[str, int]]:
    """``(absolute module name, line)`` of every import written in module ``name``.

    ``from pkg import x`` gives ``pkg.x`` when that is a module of this package, else ``pkg``.
    """
    known = package_files()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(name, node.module, node.level) if node.level else node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), node.lineno
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and _is_import_call(node.func)):
            yield node.args[0].value, node.lineno


def _is_import_call(func: ast.expr) -> bool:
    """``importlib.import_module(...)``, ``import_module(...)`` or ``__import__(...)``."""
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


@functools.lru_cache(maxsize=None)
def all_imports() -> Dict[str, List[Tuple[str, int]]]:
    """``{module: [(imported absolute name, line), ...]}`` for every module of the package."""
    return {name: list(written_imports(name, ast.parse(path.read_text(), str(path))))
            for name, path in package_files().items()}


@functools.lru_cache(maxsize=None)
def module_graph() -> Dict[str, Dict[str, List[int]]]:
    """``{importer: {imported module: [lines]}}``, edges between modules of the package only.

    A name that is not a module of the package is attributed to its longest known module prefix
    (``import_module`` strings may name anything), except the package root itself: that edge is
    counted only when the root is what is written.
    """
    known = package_files()
    graph: Dict[str, Dict[str, List[int]]] = {name: {} for name in known}
    for src, imports in all_imports().items():
        for target, line in imports:
            parts = target.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            dst = ".".join(parts)
            if dst == PACKAGE and target != PACKAGE:
                continue
            if dst and dst != src and line not in graph[src].get(dst, []):
                graph[src].setdefault(dst, []).append(line)  # `from m import a, b` is one edge
    return graph


def folder_of(module: str) -> str:
    """Folder-graph node: ``X/`` for anything in ``megatron_spo/X/``, else the module's own file name."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__.py"
    if len(parts) == 2 and not _is_package(module):
        return parts[1] + ".py"
    return parts[1] + "/"


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Components of more than one node (Tarjan, iterative), each sorted; in sorted order."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    out: List[List[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(out)


def simple_cycles(graph: Dict[str, Set[str]], nodes: List[str], limit: int) -> List[List[str]]:
    """Up to ``limit`` elementary cycles inside ``nodes``, each starting at its smallest node."""
    members = set(nodes)
    cycles: List[List[str]] = []
    for start in sorted(nodes):
        path, todo = [start], [iter(sorted(n for n in graph[start] if n in members and n >= start))]
        while todo and len(cycles) < limit:
            nxt = next(todo[-1], None)
            if nxt is None:
                todo.pop()
                path.pop()
            elif nxt == start:
                cycles.append(path + [start])
            elif nxt not in path:
                path.append(nxt)
                todo.append(iter(sorted(n for n in graph[nxt] if n in members and n >= start)))
    return cycles


def _describe_cycles(graph: Dict[str, Set[str]], edge_text) -> List[str]:
    """One block per strongly connected component: its cycles (up to a limit) and every edge in it."""
    blocks = []
    for comp in strongly_connected(graph):
        members = set(comp)
        cycles = simple_cycles(graph, comp, MAX_CYCLES_SHOWN)
        lines = [f"{len(comp)} nodes in a cycle: {', '.join(comp)}"]
        lines += ["  cycle: " + " -> ".join(c) for c in cycles]
        if len(cycles) == MAX_CYCLES_SHOWN:
            lines.append(f"  (first {MAX_CYCLES_SHOWN} cycles shown)")
        lines += [f"  edge {src} -> {dst}: {edge_text(src, dst)}"
                  for src in comp for dst in sorted(graph[src]) if dst in members]
        blocks.append("\n".join(lines))
    return blocks


def module_cycles() -> List[str]:
    graph = module_graph()
    plain = {src: set(dsts) for src, dsts in graph.items()}
    return _describe_cycles(plain, lambda src, dst: "line " + ", ".join(map(str, graph[src][dst])))


def folder_edges() -> Dict[str, Dict[str, List[str]]]:
    """``{folder: {imported folder: ["importer:line -> imported module", ...]}}`` across folders."""
    edges: Dict[str, Dict[str, List[str]]] = defaultdict(dict)
    for src, dsts in module_graph().items():
        for dst, lines in dsts.items():
            a, b = folder_of(src), folder_of(dst)
            if a != b:
                edges[a].setdefault(b, []).extend(f"{src}:{line} -> {dst}" for line in lines)
    return edges


def folder_cycles() -> List[str]:
    edges = folder_edges()
    nodes = {folder_of(m) for m in package_files()}
    plain = {n: set(edges.get(n, {})) for n in nodes}
    return _describe_cycles(plain, lambda src, dst: "; ".join(sorted(edges[src][dst])))


def oversize_files() -> List[str]:
    out = []
    for path in package_files().values():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            out.append(f"{path.relative_to(ROOT.parent)}: {n} lines")
    return out


def megatron_outside_folder() -> List[str]:
    """``module:line imports name`` for megatron / megatron.* imports outside ``megatron_spo/megatron/``."""
    out = []
    for src, imports in sorted(all_imports().items()):
        if folder_of(src) == MEGATRON_FOLDER + "/":
            continue
        out += [f"{src}:{line} imports {target}" for target, line in imports
                if target == "megatron" or target.startswith("megatron.")]
    return out


# --- the checks ----------------------------------------------------------------------------------------


def test_no_import_cycle_between_modules():
    cycles = module_cycles()
    assert not cycles, "import cycles between modules:\n" + "\n".join(cycles)


def test_no_import_cycle_between_folders():
    cycles = folder_cycles()
    assert not cycles, ("import cycles between top-level folders (megatron_spo/X/ is one node, a module "
                        "directly in megatron_spo/ is its own):\n" + "\n".join(cycles))


def test_files_are_at_most_450_lines():
    big = oversize_files()
    assert not big, f"files over {MAX_LINES} lines:\n" + "\n".join(big)


def test_megatron_core_imported_only_in_megatron_folder():
    found = megatron_outside_folder()
    assert not found, f"megatron imported outside {PACKAGE}/{MEGATRON_FOLDER}/:\n" + "\n".join(found)


# --- the checker itself, on a tiny made-up package -----------------------------------------------------


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    """A package ``megatron_spo`` in ``tmp_path`` whose files the test writes; the caches are cleared."""
    root = tmp_path / PACKAGE

    def write(files: Dict[str, str]) -> None:
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        for fn in (package_files, all_imports, module_graph):
            fn.cache_clear()

    monkeypatch.setitem(globals(), "ROOT", root)  # the helpers read ROOT from this module's globals
    yield write
    for fn in (package_files, all_imports, module_graph):
        fn.cache_clear()


def test_checker_resolves_every_import_form(toy_package):
    toy_package({
        "__init__.py": "",
        "top.py": "import megatron_spo\n",
        "a/__init__.py": "from . import y\n",
        "a/x.py": "from . import y\nfrom .y import f\nfrom megatron_spo.b import z\nfrom megatron_spo.b import VALUE\n",
        "a/y.py": "def f():\n    from ..b.z import g\n    from megatron_spo.nowhere import h\n",
        "b/__init__.py": "",
        "b/z.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import megatron_spo.a.x\n"
                   "import importlib\nm = importlib.import_module('megatron_spo.top')\n"),
    })
    graph = {src: sorted(dsts) for src, dsts in module_graph().items() if dsts}
    assert graph == {
        "megatron_spo.top": ["megatron_spo"],
        "megatron_spo.a": ["megatron_spo.a.y"],
        "megatron_spo.a.x": ["megatron_spo.a.y", "megatron_spo.b", "megatron_spo.b.z"],
        "megatron_spo.a.y": ["megatron_spo.b.z"],
        "megatron_spo.b.z": ["megatron_spo.a.x", "megatron_spo.top"],
    }
    cycles = module_cycles()
    assert len(cycles) == 1 and "cycle: megatron_spo.a.x -> megatron_spo.b.z -> megatron_spo.a.x" in cycles[0]
    assert "cycle: megatron_spo.a.x -> megatron_spo.a.y -> megatron_spo.b.z -> megatron_spo.a.x" in cycles[0]
    folders = folder_cycles()
    assert len(folders) == 1 and folders[0].startswith("2 nodes in a cycle: a/, b/")
    assert "edge b/ -> a/: megatron_spo.b.z:3 -> megatron_spo.a.x" in folders[0]


def test_checker_flags_megatron_and_size(toy_package):
    toy_package({
        "__init__.py": "",
        "megatron/__init__.py": "",
        "megatron/ok.py": "import megatron.core\n",
        "bad.py": "def f():\n    from megatron.core import parallel_state\n" + "\n" * MAX_LINES,
        "fine.py": "import megatron_spo.megatron.ok\n",
    })
    assert megatron_outside_folder() == ["megatron_spo.bad:2 imports megatron.core"]
    assert oversize_files() == [f"{PACKAGE}/bad.py: {MAX_LINES + 2} lines"]
    assert not module_cycles() and not folder_cycles()
