"""The package layout's rules (shared/ARCHITECTURE.md), checked by walking every import statement.

Units are the top-level packages (``search``, ``controller``, ``proxy_eval``) and the subpackages
of ``detector`` (``detector.model``, ``detector.fast``, ...; a top-level module such as
``detector.cli`` is its own unit). Imports inside functions count too: a lazy import is still a
dependency.
"""
import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("detector", "search", "controller", "proxy_eval")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _unit(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "detector" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules (and external top-level names) that ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found.update(n for n in names if n in modules)
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = defaultdict(set)
    for module, path in modules.items():
        for imported in _imports(path, modules):
            if imported.split(".")[0] in PACKAGES and _unit(imported) != _unit(module):
                graph[_unit(module)].add(_unit(imported))
    return graph


def _external(unit: str) -> set[str]:
    modules = _modules()
    return {imported.split(".")[0] for module, path in modules.items() if _unit(module) == unit
            for imported in _imports(path, modules)}


def test_no_two_units_import_each_other_in_a_loop():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(unit: str, trail: list[str]) -> None:
        state[unit] = 1
        for other in sorted(graph.get(unit, ())):
            if state.get(other) == 1:
                loop = trail[trail.index(other):] + [other] if other in trail else [unit, other]
                raise AssertionError("import loop: " + " -> ".join(loop))
            if other not in state:
                visit(other, trail + [other])
        state[unit] = 2

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [unit])


def test_the_architecture_vocabulary_imports_no_torch():
    assert "torch" not in _external("detector.arch") and "torchvision" not in _external("detector.arch")


def test_the_reference_model_imports_no_fast_path_engine_bench_or_command():
    assert not _graph()["detector.model"] & {"detector.fast", "detector.engine", "detector.bench",
                                              "detector.commands"}


def test_nothing_under_detector_imports_search_controller_or_proxy_eval():
    for unit, imported in _graph().items():
        if unit.startswith("detector"):
            assert not imported & {"search", "controller", "proxy_eval"}, unit


def test_proxy_eval_and_controller_do_not_import_search():
    graph = _graph()
    assert "search" not in graph["proxy_eval"] and "search" not in graph["controller"]


def test_nothing_in_proxy_eval_imports_its_factory_back():
    modules = _modules()
    for module, path in modules.items():
        if module.startswith("proxy_eval.") and module != "proxy_eval.build":
            assert "proxy_eval.build" not in _imports(path, modules), module


def test_the_rules_see_a_loop_when_there_is_one(monkeypatch):
    """The walker itself: a fake pair of units importing each other is reported."""
    import sys

    fake = {"detector.model": {"detector.fast"}, "detector.fast": {"detector.model"}}
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: fake)
    try:
        test_no_two_units_import_each_other_in_a_loop()
    except AssertionError as err:
        assert "import loop" in str(err)
    else:
        raise AssertionError("the loop was not found")
