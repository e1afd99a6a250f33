"""One way to do each thing (issue 31): rules about the source tree itself, read as text.

* the imports between the modules of ``cqdino/`` (those inside functions included) have no
  circle;
* files are put in place by one writer, :mod:`cqdino.utils.io` (fsync, umask permissions): no
  ``os.replace``/``os.rename`` elsewhere;
* no public name is defined in two modules of ``cqdino/``, and "use the EMA weights?" is
  decided by one function (:func:`cqdino.engine.checkpoint.use_ema_weights`).
"""

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(name: str, path: Path, modules: Set[str]) -> Set[str]:
    """The modules of ``modules`` that ``path`` (module ``name``) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for a in node.names:
                if f"{source}.{a.name}" in modules:  # from package import module
                    found.add(f"{source}.{a.name}")
                elif source in modules:
                    found.add(source)
    found.discard(name)
    return found


def import_graph(folder: Path, root: Path = ROOT) -> Dict[str, Set[str]]:
    """Module -> the modules of ``folder`` it imports (``root``: where module names start)."""
    files = {_module_name(p, root): p for p in folder.rglob("*.py")}
    return {m: _imports(m, p, set(files)) for m, p in files.items()}


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_circle_finder_finds_a_circle_through_a_lazy_import(tmp_path):
    """The check itself: a circle closed by an import inside a function is found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import g\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = import_graph(pkg, root=tmp_path)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert circles(graph) == [["pkg.a", "pkg.b"]]


def test_library_imports_have_no_circle():
    graph = import_graph(ROOT / "cqdino")
    assert graph["cqdino.data.build"] >= {"cqdino.data.datasets", "cqdino.data.sampler"}
    assert circles(graph) == []


# Files whose own os.rename is not a file write: the synthetic generator swaps a whole generated
# folder into place (the files in it are complete before the rename).
RENAME_ALLOWED = {"cqdino/data/synthetic/generation.py"}


def _python_files() -> List[Path]:
    """The project's Python files (not the virtual environment, datasets or runs)."""
    folders = ("cqdino", "projects", "tools", "benchmarks", "configs", "tests", "docs")
    return sorted(ROOT.glob("*.py")) + [
        p for f in folders for p in sorted((ROOT / f).rglob("*.py"))
    ]


def test_files_are_put_in_place_by_the_one_atomic_writer():
    found = []
    for path in _python_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("cqdino/utils/io.py", "tests/test_design.py"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for call in re.findall(r"\bos\.(replace|rename)\(", line):
                if call == "rename" and rel in RENAME_ALLOWED:
                    continue
                found.append(f"{rel}:{i}: {line.strip()}")
    assert found == [], "use cqdino.utils.io.atomic_write/atomic_save:\n" + "\n".join(found)


ENTRY_POINTS = {"main"}  # ``python -m`` modules each have their own


def _defined(path: Path) -> Set[str]:
    tree = ast.parse(path.read_text(), str(path))
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return {n.name for n in tree.body if isinstance(n, kinds) and not n.name.startswith("_")}


def test_no_library_name_is_defined_twice():
    where: Dict[str, List[str]] = {}
    for path in sorted((ROOT / "cqdino").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for name in _defined(path) - ENTRY_POINTS:
            where.setdefault(name, []).append(rel)
    assert {k: v for k, v in where.items() if len(v) > 1} == {}


def test_the_ema_rule_is_read_in_one_place():
    readers = []
    for path in _python_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("tests/", "configs/")):
            continue
        if "eval_with_ema" in path.read_text():
            readers.append(rel)
    assert readers == ["cqdino/engine/checkpoint.py"]


# Entry-point helpers that share a library name on purpose: compare_heads.generate runs the
# generator's command line for one C; demo.py's Predictor predates cqdino.predictor (issue 32).
SAME_NAME_ALLOWED = {("tools/compare_heads.py", "generate"), ("projects/demo.py", "Predictor")}


def test_tools_do_not_redefine_library_names():
    """tools/, benchmarks/ and projects/ call the library's classes and functions (e.g.
    ``cqdino.utils.io.InputError``) instead of defining their own of the same name."""
    library = set()
    for path in (ROOT / "cqdino").rglob("*.py"):
        library |= _defined(path) - ENTRY_POINTS
    found = []
    for folder in ("tools", "benchmarks", "projects"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for name in sorted(_defined(path) & library):
                if (rel, name) not in SAME_NAME_ALLOWED:
                    found.append(f"{rel}: {name}")
    assert found == []
