"""Which library code each pipeline stage runs, as small digest files that DVC can depend on.

A stage's outputs depend on the code it runs, not on that code's comments. The `code` stage of
dvc.yaml (`rcg code`) writes `.rcg/code/<stage>.txt` for every pipeline stage: the rcg modules the
stage can execute, each with a hash of its syntax tree without docstrings, then a total. Every other
stage depends on its digest file instead of on .py paths, so a comment or docstring edit reruns only
the (sub-second) `code` stage, while a real code change makes exactly the stages that import the
edited module stale.

The module list comes from static analysis: every `import` / `from ... import` statement anywhere in
a module (inside functions too, since the stages import heavy dependencies lazily), the package
`__init__` files Python runs on the way, and `rcg.cli` and `rcg.launch`, which start every stage.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from rcg.io import atomic_path

# Every stage runs through these: `rcg <stage>` parses its arguments in rcg.cli, which may re-execute
# it under torchrun with rcg.launch.
ENTRY_MODULES = ("rcg.cli", "rcg.launch")
DIGEST_DIR = ".rcg/code"


def module_index(package_dir: str | Path) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package at `package_dir`."""
    root = Path(package_dir)
    if not (root / "__init__.py").exists():
        raise FileNotFoundError(f"{root}: not a Python package (no __init__.py)")
    index: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        index[".".join(parts)] = path
    return index


def _is_bare_string(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(
        stmt.value.value, str
    )


def strip_docstrings(tree: ast.AST) -> ast.AST:
    """Remove docstrings (and any other bare string statement, which does nothing) in place.

    A block left empty gets a `pass`, so the tree stays valid Python.
    """
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            stmts = getattr(node, name, None)
            if not isinstance(stmts, list) or not stmts or not isinstance(stmts[0], ast.stmt):
                continue
            kept = [s for s in stmts if not _is_bare_string(s)]
            setattr(node, name, kept or ([] if isinstance(node, ast.Module) else [ast.Pass()]))
    return tree


def module_digest(path: str | Path) -> str:
    """sha256 of a module's code: its syntax tree without docstrings, written back as source.

    `ast.unparse` of the tree drops comments and formatting; it is also steadier across Python
    versions than `ast.dump`, whose field list changes between releases.
    """
    tree = strip_docstrings(ast.parse(Path(path).read_text(), filename=str(path)))
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from` import names (`from .x import y` in rcg.a.b -> rcg.a.x)."""
    if not node.level:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def imported_modules(module: str, index: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports anywhere in its code, with their parent packages."""
    path = index[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, path.name == "__init__.py")
            found.add(base)
            # `from rcg.metrics import frechet` imports the submodule rcg.metrics.frechet
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for name in found for m in _with_parents(name) if m in index}


def _with_parents(name: str) -> list[str]:
    """`a.b.c` -> [a, a.b, a.b.c]: importing a module runs every parent package's __init__ first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_graph(index: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the package's modules it imports} for every module of `index` (each parsed once)."""
    return {name: imported_modules(name, index) for name in index}


def stage_modules(stage: str, graph: dict[str, set[str]]) -> list[str]:
    """Every module of the package that `rcg <stage>` can run: the closure of its imports, sorted."""
    package = next(iter(graph)).split(".")[0]
    roots = [*ENTRY_MODULES, f"{package}.stages.{stage}"]
    missing = [m for m in roots if m not in graph]
    if missing:
        raise FileNotFoundError(f"stage {stage!r}: no module {', '.join(missing)} in the package")
    todo = [m for root in roots for m in _with_parents(root)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name] - seen)
    return sorted(seen)


def digest_text(stage: str, modules: list[str], digests: dict[str, str]) -> str:
    """The digest file of one stage: `<module> <sha256>` per line, then `total <sha256 of them>`."""
    lines = [f"{name} {digests[name]}" for name in modules]
    total = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    header = f"# rcg modules that stage {stage} runs, hashed without comments/docstrings (rcg code)"
    return "\n".join([header, *lines, f"total {total}"]) + "\n"


def stage_digests(stages: list[str], package_dir: str | Path = "rcg") -> dict[str, str]:
    """{stage: its digest file's text} for the package at `package_dir`."""
    index = module_index(package_dir)
    graph = import_graph(index)
    digests = {name: module_digest(path) for name, path in index.items()}
    return {s: digest_text(s, stage_modules(s, graph), digests) for s in stages}


def write_digests(
    stages: list[str], package_dir: str | Path = "rcg", out_dir: str | Path = DIGEST_DIR
) -> list[Path]:
    """Write `<out_dir>/<stage>.txt` for each stage, atomically; return the paths."""
    written = []
    for stage, text in stage_digests(stages, package_dir).items():
        path = Path(out_dir) / f"{stage}.txt"
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        written.append(path)
    return written
