"""The import graph, read from the source with `ast`: layers one way, data_prep above dqo_verl, no stage borrowing
from a peer stage, no cycles, imports at the top; and the cluster job's imports, in a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# dqo_verl's subpackages, lowest first: a module may import its own subpackage and the ones before it
LAYERS = ("config", "reward", "data", "workers", "trainer", "eval", "pipeline")
# the stage modules (what a stage runs); each may import libraries, never another stage's module
STAGE_MODULES = {
    "data_prep.models",
    "data_prep.sft",
    "data_prep.prompts",
    "data_prep.corpus",
    "data_prep.score",
    "data_prep.process",
    "data_prep.baselines",
    "dqo_verl.trainer.job",
    "dqo_verl.eval.harness",
    "dqo_verl.eval.report",
}
# the only imports allowed inside functions: optional heavy dependencies that a CPU test machine may lack
OPTIONAL = {"vllm", "reasoning_gym", "gguf"}


def modules() -> dict[str, ast.Module]:
    out = {}
    for package in ("dqo_verl", "data_prep"):
        for p in sorted((ROOT / package).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = ast.parse(p.read_text(), str(p))
    return out


def imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        if (
            node.module in ("dqo_verl", "data_prep")
            or node.module.count(".") == 1
            and node.module.startswith("dqo_verl")
        ):
            return [f"{node.module}.{alias.name}" for alias in node.names]  # `from dqo_verl.trainer import algo`
        return [node.module]
    return []


def top_level_imports(tree: ast.Module) -> list[str]:
    """What a module imports when it is imported (not inside functions or `if __name__ == "__main__"`)."""
    found = []
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                break
            found += imported(sub)
    return found


def function_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                found += [(node.lineno, name) for name in imported(node)]
    return found


def layer(module: str) -> int:
    """The layer of a dqo_verl module (main.py, the job, stands on top)."""
    parts = module.split(".")
    return len(LAYERS) if len(parts) < 2 or parts[1] not in LAYERS else LAYERS.index(parts[1])


@pytest.mark.parametrize("sub", [*LAYERS, "main"])
def test_each_dqo_verl_subpackage_imports_only_its_own_layer_and_below_and_never_data_prep(sub):
    trees = {n: t for n, t in modules().items() if n.startswith(f"dqo_verl.{sub}")}
    assert trees, sub
    for name, tree in trees.items():
        for node in ast.walk(tree):
            for module in imported(node):
                assert not module.startswith("data_prep"), f"{name} imports {module}"
                if module.startswith("dqo_verl."):
                    assert layer(module) <= layer(name), f"{name} (layer {sub}) imports {module} from a layer above"


def test_no_stage_module_imports_a_peer_stage():
    for name, tree in modules().items():
        if name in STAGE_MODULES:
            for module in top_level_imports(tree):
                assert not any(module == s or module.startswith(s + ".") for s in STAGE_MODULES - {name}), (
                    f"{name} imports the stage module {module}: shared helpers belong a layer below"
                )


def test_every_subpackage_says_what_it_owns():
    for name, tree in modules().items():
        assert ast.get_docstring(tree), f"{name} has no docstring"


def test_imports_inside_functions_are_only_optional_dependencies():
    for name, tree in modules().items():
        for line, module in function_level_imports(tree):
            assert module.split(".")[0] in OPTIONAL, f"{name}:{line} imports {module} inside a function"


def test_the_import_graph_has_no_cycle():
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
    assert graph["dqo_verl.trainer.algo"] == set()  # the maths stands alone


def test_the_checks_see_what_they_look_for():
    """The walkers find a function-level import, a data_prep import and a layer above where there is one."""
    tree = ast.parse("import os\ndef f():\n    from data_prep import x\n    import vllm\n")
    assert function_level_imports(tree) == [(3, "data_prep.x"), (4, "vllm")]
    assert [m for node in ast.walk(tree) for m in imported(node)] == ["os", "data_prep.x", "vllm"]
    assert top_level_imports(ast.parse("import a\nif __name__ == '__main__':\n    import b\n")) == ["a"]
    assert layer("dqo_verl.eval.harness") > layer("dqo_verl.trainer.algo") > layer("dqo_verl.config.errors")


LEAN = """
import builtins, sys
first = {}
real = builtins.__import__
def spy(name, globals=None, locals=None, fromlist=(), level=0):
    top = name.split(".")[0]
    if top not in sys.modules and top not in first:
        first[top] = (globals or {}).get("__name__")
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = spy
import dqo_verl.main
builtins.__import__ = real
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("data_prep", "matplotlib") or m.startswith("ray.data"))
print(heavy)
print(first.get("datasets"))
"""


@pytest.mark.slow
def test_the_cluster_job_imports_no_data_generation_code():
    """`python -m dqo_verl.main` loads no data_prep, Ray Data or matplotlib; `datasets` only as verl 0.9.1's own FSDP
    engine imports it (verl.utils.dataset), not through any module of ours."""
    out = subprocess.run([sys.executable, "-c", LEAN], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    heavy, datasets_by = out.stdout.strip().splitlines()[-2:]
    assert heavy == "[]"
    assert datasets_by == "None" or datasets_by.startswith("verl."), datasets_by
