"""The repository's modules (the *.py files at its root): each imports on its own, and their
import graph has no cycle. An import anywhere in a file counts, also one inside a function:
a lazy import only postpones a cycle to the first call.

Run as a script, prints the graph: `python tests/test_imports.py` (one line per module).
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(path.stem for path in ROOT.glob("*.py"))


def imported_names(path):
    """The top-level names of the modules a file imports, wherever in the file it does."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def import_graph():
    """module -> the sorted list of the repository's modules it imports (itself left out)."""
    return {module: sorted((imported_names(ROOT / f"{module}.py") & set(MODULES)) - {module})
            for module in MODULES}


def find_cycle(graph):
    """A list [a, b, ..., a] of modules each importing the next, or None if there is none."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for dep in graph[module]:
            cycle = visit(dep)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in graph:
        cycle = visit(module)
        if cycle:
            return cycle
    return None


# One interpreter for all the modules, as a fresh one for each costs the import of torch
# (about 3 s) every time: before each module, every module of the repository is removed
# from sys.modules, so that each is imported as if alone (third-party modules stay loaded).
IMPORT_EACH = """
import importlib, json, sys, traceback
root, modules = sys.argv[1], sys.argv[2:]
sys.path.insert(0, root)
failed = {}
for module in modules:
    for name in modules:
        sys.modules.pop(name, None)
    try:
        importlib.import_module(module)
    except BaseException:
        failed[module] = traceback.format_exc()
print(json.dumps(failed))
"""


def test_each_module_imports_alone():
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH, str(ROOT), *MODULES], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    failed = json.loads(result.stdout.splitlines()[-1])
    assert not failed, "\n".join(f"import {module} failed:\n{error}" for module, error in failed.items())


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "utils" in graph and "train" in graph        # the graph found the modules
    assert "utils" in graph["train"]                    # ... and their imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["b"]}) == ["b", "c", "b"]


if __name__ == "__main__":
    for module, deps in import_graph().items():
        print(f"{module} -> {', '.join(deps)}")
    cycle = find_cycle(import_graph())
    print("import cycle: " + " -> ".join(cycle) if cycle else "no import cycle")
