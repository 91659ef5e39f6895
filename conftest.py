"""Test-run settings (root conftest, so they apply to `pytest notebooks/NN.ipynb` too) shared by the unit tests and the
nbval notebook kernels (which inherit this environment).

- Warnings: the library warnings in lorakit.course.QUIET are hidden, in this process (pytest's filterwarnings) and in
  every kernel and subprocess (PYTHONWARNINGS); nothing else is, so a warning from your own code still shows.
- Notebooks: when nbval is installed (the course extra), every notebook is run and its outputs compared strictly
  (--nbval with the sanitize file, the current environment's kernel, a 900 s cell timeout), as if those flags were
  given; without nbval, pytest runs the unit tests and says in its header that the notebooks were not run.
  `-p no:nbval` skips them on purpose, and `--nbval-lax` on the command line is kept.
- `slow`: multi-process tests are marked by hand, every notebook cell here; `-m "not slow"` (make quick) leaves them out.
"""

import importlib.util
import os
import re
from pathlib import Path

import pytest

from lorakit.course import QUIET, warnings_env

ROOT = Path(__file__).resolve().parent
SANITIZE = ROOT / "tests" / "nbval_sanitize.cfg"
CELL_TIMEOUT = 900  # a notebook cell that trains (05, 07) takes ~40-90 s idle; a loaded 2-core CI box can take 5x

# The same settings `make notebooks` uses (lorakit.course.execute): a stored output never depends on whether the
# notebook was executed through make or through pytest.
os.environ["PYTHONWARNINGS"] = warnings_env()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def module_pattern(module: str) -> str:
    """A regular expression for exactly this module, as a dotted name or as the path without .py that warnings derive
    from the file name (pytest.warns re-emits the warnings it did not expect that way)."""
    return r"(.*[/\\])?" + r"[./\\]".join(map(re.escape, module.split("."))) + r"\Z"


def pytest_configure(config: pytest.Config) -> None:
    for entry in QUIET:  # pytest's filterwarnings takes a regular expression for the module (and splits at ":")
        action, message, category, module = (entry.split(":") + [""] * 4)[:4]
        config.addinivalue_line("filterwarnings", f"{action}:{message}:{category}:{module_pattern(module)}")
    if config.pluginmanager.hasplugin("nbval"):
        option = config.option
        if not (option.nbval or option.nbval_lax):
            option.nbval = True
        option.nbval_current_env = True
        if option.nbval_sanitize_with is None:
            option.nbval_sanitize_with = str(SANITIZE)
        if option.nbval_cell_timeout == 2000:  # nbval's default: nobody chose another
            option.nbval_cell_timeout = CELL_TIMEOUT


def pytest_report_header(config: pytest.Config) -> str:
    if config.pluginmanager.hasplugin("nbval"):
        return f"notebooks: nbval, outputs compared (sanitized by {SANITIZE.relative_to(ROOT)})"
    if importlib.util.find_spec("nbval") is None:
        return "notebooks: NOT run (nbval is not installed: pip install -e '.[course]', or make test)"
    return "notebooks: NOT run (nbval is installed but not loaded: -p no:nbval or PYTEST_DISABLE_PLUGIN_AUTOLOAD)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb":  # a notebook runs for seconds to a minute: slow, next to the unit tests
            item.add_marker(pytest.mark.slow)
