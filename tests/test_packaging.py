"""The install surfaces agree: pyproject extras, environment.yml, constraints.txt, Makefile, CI entry."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the course itself supports 3.10

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CPU_EXTRAS = ["course", "qlora", "zero3", "real", "dev"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()


def _env_pip() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    return [line.strip()[2:] for line in lines[start + 1:] if line.strip().startswith("- ")]


def test_environment_yml_mirrors_pyproject():
    expected = PYPROJECT["project"]["dependencies"] + sum(
        (PYPROJECT["project"]["optional-dependencies"][extra] for extra in CPU_EXTRAS), [])
    pip = [r for r in _env_pip() if r != "-e ."]
    by_name = {_name(r): r for r in pip}
    assert by_name.pop("torch") == "torch==2.13.0", "environment.yml pins the CPU torch the Makefile installs"
    assert sorted(by_name.values()) == sorted(r for r in expected if _name(r) != "torch")
    assert "-e ." in _env_pip()


def test_gpu_extra_is_never_installed_on_cpu():
    assert "gpu" not in CPU_EXTRAS
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^EXTRAS\s*:=\s*(.+)$", makefile, re.M).group(1).split(",") == CPU_EXTRAS
    assert "flash-attn" not in " ".join(_env_pip())


@pytest.mark.parametrize("extra", CPU_EXTRAS)
def test_every_direct_requirement_is_pinned_in_constraints(extra):
    pinned = {_name(line) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    for requirement in PYPROJECT["project"]["optional-dependencies"][extra]:
        assert _name(requirement) in pinned, f"{requirement} ({extra}) has no pin in constraints.txt"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci/run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
