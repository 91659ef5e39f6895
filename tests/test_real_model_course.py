"""The model switch is real: notebooks 00, 04 and 05 run end to end on SmolLM2-135M-Instruct.

    make real-model-course    # = make real-model, then LORAKIT_MODEL=smollm2 pytest -m real_model this file

Not part of `make test` (marker real_model; a CPU run of the three takes minutes, see README). The stored outputs and
nbval stay on the embedded tiny model; here each notebook is executed top to bottom with LORAKIT_MODEL=smollm2 and
must finish without an error (every notebook's closing cell asserts its claims, adapted to the model it ran on).
"""

import os

import pytest

from lorakit.course import NOTEBOOKS, execute
from lorakit.models import MODELS

pytestmark = pytest.mark.real_model


@pytest.fixture(autouse=True)
def smollm2(monkeypatch):
    if not (MODELS["smollm2"] / "config.json").exists():
        pytest.skip("SmolLM2 is not converted yet: make real-model")
    monkeypatch.setenv("LORAKIT_MODEL", "smollm2")


@pytest.mark.parametrize("name", ["00_start_here.ipynb", "04_peft_wrapping.ipynb", "05_trainer_run.ipynb"])
def test_notebook_runs_on_smollm2(name):
    nb, seconds = execute(NOTEBOOKS / name, timeout=1800)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "smollm2" in text.lower() or "SmolLM2" in text, f"{name} did not say which model it ran on"
    print(f"{name} on SmolLM2: {seconds:.0f} s ({os.cpu_count()} cores)")
