# lorakit — every target sets up .venv on demand (torch 2.13.0 CPU first, then the package with its CPU extras).
# Fresh machine: `make test` or `make lab` is all you need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lorakit-installed
EXTRAS := course,qlora,zero3,real,dev
# torch comes first, from PyTorch's CPU wheel index: on Linux, PyPI's torch is the CUDA build (a 527 MB wheel plus
# nvidia-* and triton wheels, GBs in all), the CPU index's is one ~190 MB wheel. `make TORCH_INDEX= setup` uses pip's
# default index instead. An unreachable CPU index fails fast (--timeout 10 --retries 0), then the default index is used.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH       := torch==2.13.0
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/lorakit/torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: setup lab test quick lint notebooks course bench experiments student real-model real-model-course setup-gpu base task clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install -q --index-url $(TORCH_INDEX) --timeout 10 --retries 0 $(TORCH) || \
	  { echo "$(TORCH) not installed from $(TORCH_INDEX); trying the default index (on Linux: the CUDA build, GBs)"; \
	    $(PY) -m pip install -q $(TORCH); },$(PY) -m pip install -q $(TORCH))
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (lorakit)" >/dev/null
	touch $(STAMP)

# JupyterLab refuses to start as root (containers, CI boxes) without --allow-root.
# Kernels inherit PYTHONWARNINGS: yours, plus the library warnings the stored outputs were made without (lorakit.course).
lab: setup
	PYTHONWARNINGS="$$($(PY) -m lorakit.course warnings)" $(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# Everything: ruff, unit tests, every notebook under nbval (conftest.py adds nbval's flags).
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Seconds-scale tests only: no multi-process runs, no notebooks (the `slow` marker).
quick: setup
	$(PY) -m pytest -m "not slow and not real_model" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

notebooks: setup
	$(PY) -m lorakit.course run $(NB)

course: setup
	$(PY) -m lorakit.course table

bench: setup
	$(PY) -m lorakit.bench $(BENCH_ARGS)

# The LoRA study (notebook 09): every grid row x 3 seeds, one run at a time, niced; rewrites data/experiments/grid.json.
experiments: setup
	nice -n 10 $(PY) -m lorakit.experiments $(EXPERIMENTS_ARGS)

student: setup
	$(PY) -m lorakit.course student

base: setup
	$(PY) -m lorakit.models build

task: setup
	$(PY) -m lorakit.models task

real-model: setup
	$(PY) -m lorakit.models smollm2

# Notebooks 00, 04 and 05 executed end to end on SmolLM2-135M-Instruct (LORAKIT_MODEL=smollm2); minutes on a CPU.
real-model-course: real-model
	LORAKIT_MODEL=smollm2 $(PY) -m pytest -m real_model -s tests/test_real_model_course.py $(PYTEST_ARGS)

# CUDA machines only: a CUDA build of torch, flash-attn (compiles against it), bitsandbytes' CUDA kernels.
setup-gpu: setup
	$(PY) -m pip install -q --upgrade "torch>=2.6,<2.15" --index-url https://download.pytorch.org/whl/cu128
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-build-isolation "flash-attn>=2.6"

clean:
	rm -rf $(VENV) student .pytest_cache
