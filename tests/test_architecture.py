"""The shape of the code base: the layer table of docs/ARCHITECTURE.md is the rule for imports (and
lists every module, as README.md's Layout does), commands sit on top, modules stay small, the
installed package holds no benchmark code, and the repository cites only documents it contains."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "afm_ray"
MAX_MODULE_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` -- code that runs only when the module is the program, i.e.
    as `__main__` and not as the package module, so its imports cannot close a cycle."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators)
    )


def package_imports(path: Path, known: set[str]) -> set[str]:
    """Every afm_ray module `path` imports, wherever the import statement sits (module level,
    inside functions, under TYPE_CHECKING), except in a `__main__` guard."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_main_guard(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "afm_ray")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "afm_ray":
            for alias in node.names:  # `from afm_ray import attacks` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    # A package's __init__ is imported with each of its submodules; ours hold docstrings only.
    return {name: package_imports(path, known) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    """The checker itself: an import inside a function closes a cycle; one in a __main__ guard does not."""
    pkg = tmp_path / "afm_ray"
    pkg.mkdir()
    (pkg / "a.py").write_text("from afm_ray import b\n")
    (pkg / "b.py").write_text("def f():\n    from afm_ray.a import x\n")
    (pkg / "c.py").write_text("from afm_ray import a\nif __name__ == '__main__':\n    from afm_ray import c2\n")
    (pkg / "c2.py").write_text("from afm_ray import c\n")
    known = {"afm_ray.a", "afm_ray.b", "afm_ray.c", "afm_ray.c2"}
    graph = {f"afm_ray.{p.stem}": package_imports(p, known) for p in pkg.glob("*.py")}
    assert find_cycle(graph) in (["afm_ray.a", "afm_ray.b", "afm_ray.a"], ["afm_ray.b", "afm_ray.a", "afm_ray.b"])
    del graph["afm_ray.b"], graph["afm_ray.a"]
    assert find_cycle(graph) is None


def test_imports_form_a_one_way_graph():
    graph = import_graph()
    assert len(graph) >= 15
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def module_path(name: str) -> str:
    """afm_ray.sweep.driver -> sweep/driver.py; afm_ray.sweep.__main__ -> sweep/__main__.py; afm_ray -> __init__.py"""
    parts = name.split(".")[1:]
    return "/".join(parts) + ".py" if parts else "__init__.py"


def layer_table() -> dict[str, int]:
    """{module path: layer} from the table in docs/ARCHITECTURE.md (rows "| 3 | `search/space.py` | ... |")."""
    rows = re.findall(r"^\| (\d+) \| `([\w/]+\.py)` \|", (ROOT / "docs" / "ARCHITECTURE.md").read_text(), re.M)
    table: dict[str, int] = {}
    for layer, path in rows:
        assert path not in table, f"{path} is listed twice in docs/ARCHITECTURE.md"
        table[path] = int(layer)
    return table


def package_modules() -> dict[str, Path]:
    """Every module of the package by its path under afm_ray/, but the subpackages' __init__.py files."""
    return {
        module_path(module_name(p)) if p.name != "__main__.py" else str(p.relative_to(PACKAGE)): p
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" or p.parent == PACKAGE
    }


def test_every_module_is_in_the_layer_table_and_nothing_else():
    assert set(layer_table()) == set(package_modules())


def test_imports_follow_the_layer_table():
    """A module imports only modules of a lower layer: the table is the rule."""
    table, graph = layer_table(), import_graph()
    by_path = {module_path(name): name for name in graph}
    broken = [
        f"{path} (layer {table[path]}) imports {module_path(dep)} (layer {table[module_path(dep)]})"
        for path, name in sorted(by_path.items())
        if path in table
        for dep in sorted(graph[name])
        if module_path(dep) in table and table[module_path(dep)] >= table[path]
    ]
    assert not broken, "imports against docs/ARCHITECTURE.md's layer table:\n" + "\n".join(broken)


def test_commands_sit_on_top_and_nothing_below_imports_them():
    graph = import_graph()
    commands = {name for name in graph if name.endswith(".__main__")}
    assert {c.split(".")[1] for c in commands} == {"train", "teacher", "evaluate", "sweep", "pareto", "export", "final"}
    for name, deps in graph.items():
        assert not deps & commands, f"{name} imports a command: {deps & commands}"
        if "afm_ray.cli" in deps:
            assert name in commands, f"{name} imports afm_ray.cli; only commands may"


def test_subpackage_inits_hold_only_their_docstring():
    for init in PACKAGE.rglob("__init__.py"):
        if init.parent != PACKAGE:
            body = ast.parse(init.read_text()).body
            assert len(body) == 1 and isinstance(body[0], ast.Expr), f"{init} holds more than a docstring"


def readme_layout() -> set[str]:
    """Module paths README.md's Layout block names: a line "  sweep/  driver.py plan.py ..." lists
    sweep/driver.py and sweep/plan.py; "  names.py errors.py" lists top-level modules."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    listed = set()
    for line in block.splitlines():
        if not line.startswith("  ") or line.startswith("   "):
            continue  # the package's own lines are indented by two spaces
        words = line.split()
        prefix = words[0] if words[0].endswith("/") else ""
        listed |= {prefix + word for word in words if word.endswith(".py")}
    return listed


def test_readme_layout_lists_every_module():
    assert readme_layout() == set(package_modules())


def test_names_module_imports_only_the_standard_library_and_errors():
    tree = ast.parse((PACKAGE / "names.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "os", "dataclasses", "pathlib", "collections.abc", "afm_ray.errors"}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_small(path):
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES


def test_no_benchmark_code_in_the_package():
    names = {p.stem for p in PACKAGE.rglob("*.py")}
    assert not names & {"bench", "fidelity", "search_bench"}
    for path in PACKAGE.rglob("*.py"):
        assert "benchmarks" not in package_imports(path, {"benchmarks"}), path


def test_every_cited_document_is_in_the_repository():
    """Documents named like README.md / ARCHITECTURE.md, or by a docs/ path, exist in the repository
    (output files a test writes, like bench.md in a tmp folder, are neither)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    names = {Path(f).name for f in tracked}
    cited: dict[str, str] = {}
    for file in tracked:
        if Path(file).suffix in (".py", ".md", ".yaml", ".toml") and (ROOT / file).is_file():
            text = (ROOT / file).read_text(errors="replace")
            for doc in re.findall(r"\b(?:docs/[\w.-]+\.md|[A-Z][A-Za-z_]+\.md)\b", text):
                cited.setdefault(doc, file)
    missing = {
        doc: where
        for doc, where in cited.items()
        if (doc not in tracked if doc.startswith("docs/") else doc not in names)
    }
    assert not missing, f"documents cited but not in the repository: {missing}"


def test_every_console_script_names_a_command_main():
    """pyproject's [project.scripts] point at the `main` of a command's `__main__` (a renamed or moved
    command would otherwise install a script that fails on import), and every command has one."""
    import importlib
    import importlib.util

    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    commands = {p.parent.name for p in PACKAGE.glob("*/__main__.py")}
    assert {name.removeprefix("afm-ray-") for name in scripts} == commands
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert module == f"afm_ray.{name.removeprefix('afm-ray-')}.__main__" and attr == "main", (name, target)
        assert callable(getattr(importlib.import_module(module), attr)), target


def test_every_name_imported_from_the_package_exists():
    """Every `from afm_ray.x import y`, at module level or inside a function (the lazy imports that keep
    Ray and torch off a command's start-up), names something that exists: a merge that moves or removes
    a function otherwise breaks only the code path that imports it, at run time."""
    import importlib
    import importlib.util

    missing = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("afm_ray"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if (
                        not hasattr(module, alias.name)
                        and importlib.util.find_spec(f"{node.module}.{alias.name}") is None
                    ):
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{alias.name}")
    assert not missing, missing


def test_no_library_module_runs_as_a_script():
    """Only a command's __main__.py runs as a script; a guard elsewhere is a second entry point to keep."""
    guarded = [
        str(p.relative_to(ROOT))
        for p in PACKAGE.rglob("*.py")
        if p.name != "__main__.py" and re.search(r"^if __name__ == .__main__.:", p.read_text(), flags=re.M)
    ]
    assert not guarded, guarded
