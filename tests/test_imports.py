"""The package's import graph, read from the source with `ast`: one way, no cycles, imports at the top."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dqo_verl"
# the only imports allowed inside functions: optional heavy dependencies that a CPU test machine may lack
OPTIONAL = {"vllm", "reasoning_gym", "gguf"}


def modules() -> dict[str, ast.Module]:
    return {f"dqo_verl.{p.stem}": ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "dqo_verl":  # `from dqo_verl import algo`
            return [f"dqo_verl.{alias.name}" for alias in node.names]
        return [node.module]
    return []


def function_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                found += [(node.lineno, name) for name in imported(node)]
    return found


def test_nothing_in_the_package_imports_data_prep_or_a_removed_module():
    for name, tree in modules().items():
        for node in ast.walk(tree):
            for module in imported(node):
                assert not module.startswith("data_prep"), f"{name} imports {module}"


def test_imports_inside_functions_are_only_optional_dependencies():
    for name, tree in modules().items():
        for line, module in function_level_imports(tree):
            assert module.split(".")[0] in OPTIONAL, f"{name}:{line} imports {module} inside a function"


def test_the_package_import_graph_has_no_cycle():
    trees = modules()
    graph = {
        name: {m for node in ast.walk(tree) for m in imported(node) if m in trees and m != name}
        for name, tree in trees.items()
    }
    done, path = set(), []

    def visit(name):
        assert name not in path, "import cycle: " + " -> ".join(path[path.index(name) :] + [name])
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        path.pop()
        done.add(name)

    for name in graph:
        visit(name)
    assert graph["dqo_verl.algo"] <= {"dqo_verl.cli"}  # the maths stands alone


def test_the_checks_see_what_they_look_for():
    """The walkers find a function-level import and a data_prep import where there is one."""
    tree = ast.parse("import os\ndef f():\n    from data_prep import x\n    import vllm\n")
    assert function_level_imports(tree) == [(3, "data_prep"), (4, "vllm")]
    assert [m for node in ast.walk(tree) for m in imported(node)] == ["os", "data_prep", "vllm"]
