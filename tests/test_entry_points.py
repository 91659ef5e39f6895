"""Every `python -m lorakit.*` entry point answers a mistake it can explain with one error line and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args, fragment", [
    (["lorakit.models", "build", "--out", "/proc/lorakit-cannot-write"], "cannot write there"),
    (["lorakit.course", "run", "notebooks/no_such.ipynb"], "no such notebook: notebooks/no_such.ipynb"),
    (["lorakit.zero3_demo", "--out", "{tmp}/demo", "--config", "{tmp}/none.json"], "none.json: no such file"),
    (["lorakit.smollm2", "demo"], "python -m lorakit.models smollm2"),
])
def test_entry_point_mistake_is_one_error_line(tmp_path, monkeypatch, args, fragment):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "empty-cache"))  # smollm2 is then never converted
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "error:" in last and fragment.replace("{tmp}", str(tmp_path)) in last, last
