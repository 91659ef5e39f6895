"""Test-run settings (root conftest, so they apply to `pytest notebooks/NN.ipynb` too) shared by unit tests and the nbval notebook kernels (which inherit this environment)."""

import os

# The same settings `make` exports: notebook kernels started by nbval inherit them, so a stored output never depends
# on whether the notebook was executed through make or through pytest directly.
os.environ.setdefault("PYTHONWARNINGS", "ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
