"""The install surfaces agree: pyproject extras, environment.yml, constraints.txt, Makefile, CI entry."""

import os
import re
import shutil
import subprocess
import sys
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
    extras = PYPROJECT["project"]["optional-dependencies"]
    holders = sorted(name for name, requirements in extras.items() if "flash-attn" in map(_name, requirements))
    assert holders == ["gpu"], "flash-attn (it builds only against a CUDA torch) belongs in the gpu extra alone"
    installed = re.search(r"^EXTRAS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split(",")
    assert "gpu" not in installed and installed == CPU_EXTRAS
    assert "flash-attn" not in map(_name, _env_pip())


def _make_setup(tmp_path, *variables: str) -> list[str]:
    """The commands `make setup` would run for a fresh venv (make -n: printed, not run)."""
    result = subprocess.run(["make", "-n", "-W", "pyproject.toml", "setup", f"VENV={tmp_path / 'venv'}", *variables],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_setup_takes_torch_from_the_cpu_index_then_falls_back(tmp_path):
    pin = next(r for r in _env_pip() if _name(r) == "torch")
    lines = _make_setup(tmp_path)
    torch_line = next(i for i, line in enumerate(lines) if pin in line)
    package_line = next(i for i, line in enumerate(lines) if "-e \".[" in line)
    assert torch_line < package_line, "torch must be installed before the package, or pip picks its own torch"
    first, _, fallback = lines[torch_line].partition("||")
    assert f"--index-url https://download.pytorch.org/whl/cpu --timeout 10 --retries 0 {pin}" in first
    assert f"pip install -q {pin}" in fallback and "--index-url" not in fallback
    plain = _make_setup(tmp_path, "TORCH_INDEX=")
    assert [line for line in plain if pin in line] == [f"{tmp_path / 'venv'}/bin/python -m pip install -q {pin}"]


def test_plain_pytest_works_without_nbval():
    """No nbval flag in addopts: with plugins not auto-loaded (as when nbval is not installed) pytest still runs."""
    assert "nbval" not in PYPROJECT["tool"]["pytest"]["ini_options"]["addopts"]
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_packaging.py"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.parametrize("extra", CPU_EXTRAS)
def test_every_direct_requirement_is_pinned_in_constraints(extra):
    pinned = {_name(line) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    for requirement in PYPROJECT["project"]["optional-dependencies"][extra]:
        assert _name(requirement) in pinned, f"{requirement} ({extra}) has no pin in constraints.txt"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci/run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
