"""The project's own files agree with each other."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch", "ray": "ray-default"}  # PyPI name -> conda-forge name, where they differ


def _split(requirement: str) -> tuple[str, str]:
    name, spec = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", requirement).groups()
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
