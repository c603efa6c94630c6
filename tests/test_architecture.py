"""The house rules, checked on the source: the import contracts, no private names across modules, small files.

The contracts live in pyproject.toml ([tool.importlinter]) and are what `make lint` runs; here
they run in `make test` too, and a deliberate violation is shown to break them.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("keel", "serving", "assets", "sensors", "resources", "pipelines")
# A module longer than this mixes jobs; split it by responsibility (docs/ARCHITECTURE.md).
MAX_LINES = 460
SIZED = ("keel", "serving", "assets")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the project at ``root`` (its pyproject.toml and packages), without a cache."""
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(root)}
    )


def test_the_import_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
    assert result.stdout.count(" KEPT") == 4, result.stdout


def copy_project(dest: Path) -> Path:
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("keel/lakehouse/wap.py", "import dagster", "The engine (keel) never imports Dagster or the Dagster layer"),
        ("serving/app.py", "import assets", "Serving never imports Dagster or the Dagster layer"),
        (
            "keel/lakehouse/tables.py",
            "import keel.monitoring.drift",
            "The engine's subsystems are layered: each imports only those below it",
        ),
        ("keel/dsl/primitives.py", "import keel.dsl.sources", "No import cycles between the modules of any package"),
    ],
)
def test_a_deliberate_violation_breaks_its_contract_by_name(tmp_path, module, line, contract):
    project = copy_project(tmp_path)
    path = project / module
    path.write_text(path.read_text() + f"\n{line}  # a deliberate violation\n")
    result = lint_imports(project)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout, result.stdout


def python_files(*roots: str):
    for root in roots:
        yield from sorted(p for p in (ROOT / root).rglob("*.py") if "__pycache__" not in p.parts)


def private_imports(path: Path) -> list[str]:
    """``from our.module import _name`` and ``our_module._name`` where the module is another of ours."""
    tree = ast.parse(path.read_text())
    ours = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES + ("tests",):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {alias.name}")
                ours[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    ours[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in ours
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_private_name_is_used_from_another_module():
    found = [hit for path in python_files(*PACKAGES, "bench", "tests") for hit in private_imports(path)]
    assert not found, "private names used across modules (make them public or move the code):\n" + "\n".join(found)


def test_no_module_mixes_jobs_by_being_long():
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for path in python_files(*SIZED)
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility):\n" + "\n".join(long)
