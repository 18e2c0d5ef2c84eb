"""The package's import rules (ARCHITECTURE.md, "Rules"), read from the source with ``ast``.

This file mirrors no module: it checks how the modules of ``stampbatch`` import each other.

1. No import cycle among ``stampbatch`` modules. Every ``import`` / ``from ... import`` of a
   ``stampbatch`` module counts, function-level (lazy) imports included; only imports under
   ``if TYPE_CHECKING:`` are exempt (they never run).
2. No module imports another module's private name. A name with one leading underscore
   (dunders such as ``__version__`` are not private) is visible only inside the namespace that
   defines it: ``_x`` defined in module ``m`` only in ``m``; a private module ``p._m`` only
   inside package ``p`` (its siblings and their sub-packages), and the names it gives them
   must be public. Reading ``alias._x`` off an imported ``stampbatch`` module counts too.
3. ``h5py`` is imported only under ``stampbatch/store/`` (the one module that knows the HDF5
   layout), TYPE_CHECKING imports included.

Module names are derived from file paths and relative imports are resolved, so the checks
hold whatever sub-packages the modules live in. The checker is also run on small packages
built in ``tmp_path`` that break each rule, so a checker that cannot fail would be caught.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

# The package beside the tests: the first folder above this file that holds stampbatch/
# (the tests may be sorted into sub-folders).
PACKAGE_DIR = next(d / "stampbatch" for d in Path(__file__).resolve().parents
                   if (d / "stampbatch" / "__init__.py").is_file())


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


@dataclasses.dataclass(frozen=True)
class ImportUse:
    """One reference from ``importer`` to the dotted name ``target`` (a module, or a name in one)
    at ``line``; ``type_checking`` when it sits under ``if TYPE_CHECKING:`` (exempt from the
    cycle rule); ``attribute`` when it is ``alias.name`` read off an imported module (checked
    for private names; the import that bound the alias is the cycle edge)."""

    importer: str
    target: str
    line: int
    type_checking: bool
    attribute: bool = False


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package_dir`` (a package)."""
    root = package_dir.parent
    mods = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, type_checking: bool = False):
    """Yield (node, under_type_checking) for every node below ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            yield child, type_checking
            for stmt in child.body:
                yield stmt, True
                yield from _walk(stmt, True)
            for stmt in child.orelse:
                yield stmt, type_checking
                yield from _walk(stmt, type_checking)
            continue
        yield child, type_checking
        yield from _walk(child, type_checking)


def _resolve_from(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_uses(package_dir: Path) -> tuple[dict[str, Path], list[ImportUse], list[str]]:
    """(modules, every reference to a ``stampbatch``-style name, every h5py import as
    "module:line") for the package at ``package_dir``."""
    mods = module_names(package_dir)
    top = package_dir.name
    uses: list[ImportUse] = []
    h5py: list[str] = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases: dict[str, str] = {}  # local name bound to a package module -> that module
        for node, tc in _walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "h5py":
                        h5py.append(f"{name}:{node.lineno}")
                    if alias.name.split(".")[0] != top:
                        continue
                    uses.append(ImportUse(name, alias.name, node.lineno, tc))
                    if alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                target = _resolve_from(name, path.name == "__init__.py", node)
                if target.split(".")[0] == "h5py":
                    h5py.append(f"{name}:{node.lineno}")
                if target.split(".")[0] != top:
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    uses.append(ImportUse(name, full, node.lineno, tc))
                    if full in mods:
                        aliases[alias.asname or alias.name] = full
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                uses.append(ImportUse(name, f"{aliases[node.value.id]}.{node.attr}",
                                      node.lineno, False, attribute=True))
    return mods, uses, h5py


def _module_of(target: str, mods: dict[str, Path]) -> str:
    """The module a dotted reference lands in: itself if it is a module, else its parent."""
    while target not in mods and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def import_graph(mods: dict[str, Path], uses: list[ImportUse]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (TYPE_CHECKING imports left out)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for use in uses:
        if use.type_checking or use.attribute:
            continue
        dep = _module_of(use.target, mods)
        if dep in mods and dep != use.importer:
            graph[use.importer].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing
    itself), each sorted: every import cycle lies inside one of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        # iterative Tarjan: (node, iterator over its successors)
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, succ = work[-1]
            for nxt in succ:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1 or node in graph[node]:
                        found.append(sorted(comp))
    return sorted(found)


def private_imports(uses: list[ImportUse]) -> list[str]:
    """Every reference to a private name from outside the namespace that defines it, as
    "importer:line imports target"."""
    bad = []
    for use in uses:
        parts = use.target.split(".")
        for i, part in enumerate(parts):
            if not _is_private(part):
                continue
            owner = ".".join(parts[:i])  # the namespace the private name belongs to
            if not (use.importer == owner or use.importer.startswith(owner + ".")):
                bad.append(f"{use.importer}:{use.line} imports {use.target}")
                break
    return sorted(set(bad))


def h5py_outside_store(package_dir: Path, h5py: list[str]) -> list[str]:
    store = f"{package_dir.name}.store"
    return sorted(where for where in h5py
                  if not (where.split(":")[0] == store or where.startswith(store + ".")))


def check(package_dir: Path) -> dict[str, list]:
    """Every broken rule of the package at ``package_dir``, by rule."""
    mods, uses, h5py = import_uses(package_dir)
    return {"cycles": cycles(import_graph(mods, uses)),
            "private imports": private_imports(uses),
            "h5py outside store": h5py_outside_store(package_dir, h5py)}


# --------------------------------------------------------------------------- the package


def test_package_modules_found():
    mods = module_names(PACKAGE_DIR)
    assert "stampbatch" in mods and "stampbatch.store" in mods
    assert len(mods) > 40 and all(p.is_file() for p in mods.values())


@pytest.fixture(scope="module")
def package_report():
    return check(PACKAGE_DIR)


def test_no_import_cycles(package_report):
    found = package_report["cycles"]
    assert not found, "import cycles among stampbatch modules: " + "; ".join(
        " <-> ".join(c) for c in found)


def test_no_cross_module_private_imports(package_report):
    found = package_report["private imports"]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_h5py_only_under_store(package_report):
    found = package_report["h5py outside store"]
    assert not found, "h5py imported outside stampbatch/store/: " + ", ".join(found)


# --------------------------------------------------------------------------- the checker


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    """Write a package ``stampbatch`` under tmp_path from {relative path: source}."""
    pkg = tmp_path / "stampbatch"
    for rel, text in {"__init__.py": "", **files}.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(pkg).parents:
            (pkg / parent / "__init__.py").touch()
        path.write_text(text)
    return pkg


def test_checker_passes_a_clean_package(tmp_path):
    pkg = _package(tmp_path, {
        "a.py": "from stampbatch import b\nfrom stampbatch.store import open_it\n"
                "from stampbatch import __version__\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from stampbatch.a import A\n",
        "store/__init__.py": "from stampbatch.store._schema import META\nimport h5py\n",
        "store/_schema.py": "META = 'meta'\n_HIDDEN = 1\nimport h5py as _h5\n",
        "store/_read.py": "from . import _schema\nfrom ._schema import META\nx = _schema.META\n",
        "store/deep/_inner.py": "from stampbatch.store._schema import META\n",
    })
    assert check(pkg) == {"cycles": [], "private imports": [], "h5py outside store": []}


def test_checker_finds_cycles_lazy_and_relative(tmp_path):
    pkg = _package(tmp_path, {
        "a.py": "from stampbatch import b\n",
        "b.py": "def f():\n    from stampbatch.sub import c  # lazy: still a cycle\n",
        "sub/c.py": "from ..a import thing\n",  # relative, two levels up
        "d.py": "import stampbatch.e\n",
        "e.py": "import stampbatch.d as dd\n",
        "f.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from stampbatch import g\n",
        "g.py": "from stampbatch import f\n",  # f -> g only under TYPE_CHECKING: no cycle
        "p/__init__.py": "from .q import x\n",  # relative to the package itself: p.q
        "p/q.py": "import stampbatch.p\n",
    })
    assert check(pkg)["cycles"] == [["stampbatch.a", "stampbatch.b", "stampbatch.sub.c"],
                                    ["stampbatch.d", "stampbatch.e"],
                                    ["stampbatch.p", "stampbatch.p.q"]]


def test_checker_finds_private_imports(tmp_path):
    pkg = _package(tmp_path, {
        "a.py": "_helper = 1\n",
        "b.py": "from stampbatch.a import _helper\n",
        "c.py": "from stampbatch import a\ny = a._helper\n",
        "d.py": "import stampbatch.a as aa\ndef f():\n    return aa._helper\n",
        "store/__init__.py": "",
        "store/_schema.py": "_META = 'meta'\nMETA = 'meta'\n",
        "store/_read.py": "from ._schema import _META\n",  # sibling, but the name is private
        "e.py": "from stampbatch.store._schema import META\n",  # private module, from outside
        "f.py": "from stampbatch.store import _schema\n",
        "sub/g.py": "from ..store._schema import META\n",  # relative, still from outside
        "sub/h.py": "from .._own import thing\n",  # a private module of stampbatch: allowed
    })
    assert check(pkg)["private imports"] == [
        "stampbatch.b:1 imports stampbatch.a._helper",
        "stampbatch.c:2 imports stampbatch.a._helper",
        "stampbatch.d:3 imports stampbatch.a._helper",
        "stampbatch.e:1 imports stampbatch.store._schema.META",
        "stampbatch.f:1 imports stampbatch.store._schema",
        "stampbatch.store._read:1 imports stampbatch.store._schema._META",
        "stampbatch.sub.g:1 imports stampbatch.store._schema.META",
    ]


def test_checker_finds_h5py_outside_store(tmp_path):
    pkg = _package(tmp_path, {
        "a.py": "import h5py\n",
        "b.py": "def f():\n    from h5py import File\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import h5py.h5t\n",
        "store/_x.py": "import h5py\n",
        "storefront.py": "import h5py\n",  # a name that starts like store is not store
    })
    assert check(pkg)["h5py outside store"] == [
        "stampbatch.a:1", "stampbatch.b:2", "stampbatch.c:3", "stampbatch.storefront:1"]
