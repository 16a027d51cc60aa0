"""The layering of the design notes, read from the imports of every module (ast, no import).

Top to bottom: cli -> pipeline -> {method, calibration, converters, validation} -> arch.

- method (``rmexport/replaceme``, ``rmexport/calib``, ``rmexport/prune.py``) never reaches converters,
  validation or the top layer;
- converters never reach method, calibration, validation or the top layer;
- ``rmexport/arch`` reaches nothing of the project but the base layer (``rmexport/errors.py``,
  ``rmexport/log.py``, ``rmexport/measures.py``), and the base layer reaches nothing else;
- validation never reaches method (``rmexport/replaceme``, ``rmexport/prune.py``) or the top layer.

"Reaches" is transitive: an import of a shared module (``rmexport.models``, ``rmexport.tokenizer_parity``,
...) counts with everything that module imports, function-level imports included. The top layer
(``rmexport.cli``, ``rmexport.pipeline``, ``rmexport.inputs``, the ``rmexport`` package's API, ``bench``)
may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rmexport", "converters", "validation", "bench")

TOP = ("rmexport.cli", "rmexport.pipeline", "rmexport.inputs", "rmexport.api", "rmexport.config", "bench")
METHOD = ("rmexport.replaceme", "rmexport.prune")
CALIB = ("rmexport.calib",)
CONVERTERS = ("converters",)
VALIDATION = ("validation",)
ARCH = ("rmexport.arch",)
BASE = ("rmexport.errors", "rmexport.log", "rmexport.measures")

# Edges a lower layer may still take, each with why; an entry that no longer exists fails the test,
# so that the list only ever shrinks.
ALLOWED_EDGES: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (a module, or the module defining an attribute)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        else:
            continue
        for target in targets:
            resolved = _resolve(target)
            # The package itself only names __version__ and imports its API lazily (checked below).
            if resolved and resolved not in (module, "rmexport"):
                found.add(resolved)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _within(module: str, groups: tuple[str, ...]) -> bool:
    return any(module == g or module.startswith(g + ".") for g in groups)


def _paths(start: str, forbidden: tuple[str, ...]) -> list[list[str]]:
    """One import chain from ``start`` to each forbidden module it reaches (breadth first)."""
    seen = {start: [start]}
    queue = [start]
    hits = []
    while queue:
        current = queue.pop(0)
        for target in sorted(GRAPH[current]):
            if (current, target) in ALLOWED_EDGES or target in seen:
                continue
            seen[target] = [*seen[current], target]
            if _within(target, forbidden):
                hits.append(seen[target])
                continue
            queue.append(target)
    return hits


def _violations(groups: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [
        " -> ".join(chain)
        for module in MODULES
        if _within(module, groups)
        for chain in _paths(module, forbidden)
    ]


def test_the_module_list_is_complete():
    assert "rmexport.cli" in MODULES and "converters.gguf_export" in MODULES and "rmexport.arch" in MODULES
    assert all(_resolve(m) == m for m in MODULES)


@pytest.mark.parametrize(
    "groups, forbidden",
    [
        pytest.param(METHOD + CALIB, CONVERTERS + VALIDATION + TOP, id="method"),
        pytest.param(CONVERTERS, METHOD + CALIB + VALIDATION + TOP, id="converters"),
        pytest.param(VALIDATION, METHOD + TOP, id="validation"),
    ],
)
def test_layer_never_reaches_the_forbidden_ones(groups, forbidden):
    violations = _violations(groups, forbidden)
    assert not violations, "layering broken:\n" + "\n".join(violations)


def test_arch_imports_nothing_of_the_project_but_the_base():
    leaks = [
        f"{module} -> {target}"
        for module in MODULES
        if _within(module, ARCH)
        for target in GRAPH[module]
        if not _within(target, ARCH + BASE)
    ]
    assert not leaks, "arch/ imports the project:\n" + "\n".join(leaks)


def test_base_imports_nothing_of_the_project():
    assert "rmexport.measures" in MODULES
    leaks = [f"{m} -> {t}" for m in MODULES if _within(m, BASE) for t in GRAPH[m] if not _within(t, BASE)]
    assert not leaks


def test_the_package_imports_its_api_lazily():
    """``import rmexport`` (which every ``from rmexport import __version__`` runs) loads nothing else."""
    tree = ast.parse(MODULES["rmexport"].read_text())
    eager = [
        ast.unparse(node)
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        and (getattr(node, "level", 0) or (getattr(node, "module", "") or "").startswith(PACKAGES))
    ]
    assert not eager


def test_allowed_edges_still_exist():
    gone = [f"{a} -> {b}" for (a, b) in ALLOWED_EDGES if b not in GRAPH.get(a, ())]
    assert not gone, "remove these from ALLOWED_EDGES, they are fixed:\n" + "\n".join(gone)


def test_the_checker_sees_a_violation(tmp_path):
    """The walk finds a transitive chain: a fake graph where converters reach calib through models."""
    saved = dict(GRAPH)
    try:
        GRAPH["converters.gguf_export"] = {"rmexport.models"}
        GRAPH["rmexport.models"] = {"rmexport.calib.weights"}
        chains = _paths("converters.gguf_export", CALIB)
        assert chains == [["converters.gguf_export", "rmexport.models", "rmexport.calib.weights"]]
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_method_and_validation_share_the_measurements():
    """Calibration's distances, the engine's loss, perplexity and parity's KL come from one module."""
    for module in (
        "rmexport.calib.collect",
        "rmexport.calib.engine",
        "validation.perplexity",
        "validation.parity",
    ):
        assert "rmexport.measures" in GRAPH[module], module
