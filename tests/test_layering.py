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
(``rmexport.cli``, ``rmexport.pipeline``, ``rmexport.inputs``, the ``rmexport`` package's API,
``rmexport.imatrix_text``, ``bench``)
may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rmexport", "converters", "validation", "bench")

# rmexport.imatrix_text joins a prune's calibration text to the GGUF exporter, for api and pipeline.
TOP = (
    "rmexport.cli",
    "rmexport.commands",
    "rmexport.pipeline",
    "rmexport.inputs",
    "rmexport.api",
    "rmexport.config",
    "rmexport.imatrix_text",
    "rmexport.frontier",
    "bench",
)
METHOD = ("rmexport.replaceme", "rmexport.prune")
CALIB = ("rmexport.calib",)
CONVERTERS = ("converters",)
VALIDATION = ("validation",)
ARCH = ("rmexport.arch",)
BASE = ("rmexport.errors", "rmexport.log", "rmexport.measures")
# Above calibration, below the method: resolving and loading a model (which streams its weights with
# calib.weights and checks a GGUF's tokenizer on the built-in text).
SOURCES = ("rmexport.models", "rmexport.tokenizer_parity")

# Every module's rank, top first; a module in none of these groups is a shared helper (rmexport.atomic,
# rmexport.fold, ...), between calibration and arch. An import never goes to a higher rank.
RANKS: tuple[tuple[str, ...], ...] = (
    TOP,
    METHOD + VALIDATION,
    SOURCES,
    CALIB + CONVERTERS,
    (),  # shared helpers
    ARCH,
    BASE,
)

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


def _rank(module: str) -> int:
    ranked = [rank for rank, groups in enumerate(RANKS) if _within(module, groups)]
    return ranked[0] if ranked else RANKS.index(())


def test_no_import_points_upward():
    upward = [
        f"{module} -> {target}"
        for module in MODULES
        for target in sorted(GRAPH[module])
        if _rank(target) < _rank(module) and (module, target) not in ALLOWED_EDGES
    ]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_see_a_cycle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _rank("rmexport.calib.engine") > _rank("rmexport.replaceme.apply")  # engine -> apply is upward
    assert _rank("rmexport.config") < _rank("validation.speed")
    assert _rank("rmexport.atomic") > _rank("rmexport.models") > _rank("rmexport.prune")


OPTIONAL = ("onnxruntime", "onnxruntime_genai", "datasets")


def test_optional_dependencies_are_imported_through_one_helper():
    """A dependency only some installs have is imported by ``rmexport.optional.optional_import``."""
    direct = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            direct += [f"{module}: {name}" for name in names if name.split(".")[0] in OPTIONAL]
    assert not direct, "import these with optional_import:\n" + "\n".join(direct)


# The top layer keeps its imports inside the commands, so that ``rmexport --help`` loads no torch.
LAZY_TOP = ("rmexport.cli", "rmexport.api", "rmexport.pipeline", "rmexport.inputs", "bench")


def test_project_imports_are_at_module_top():
    """Below the top layer, a module imports the project at its top: no import hides a cycle."""
    inside = []
    for module, path in MODULES.items():
        if _within(module, LAZY_TOP):
            continue
        tree = ast.parse(path.read_text())
        top = {id(node) for statement in tree.body for node in ast.walk(statement)} - {
            id(node)
            for statement in tree.body
            if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            for node in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
                name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if getattr(node, "level", 0) or (name or "").startswith(PACKAGES):
                    inside.append(f"{module}:{node.lineno} {ast.unparse(node)}")
    assert not inside, "move these imports to the module top:\n" + "\n".join(inside)


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
