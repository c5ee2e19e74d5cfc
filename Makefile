# Two commands do all the set-up (README): `make run` and `make test`.
# Each creates the venv, installs the pinned requirements (again only when they change), installs
# Debian's Fashion-MNIST package where apt is available, and makes sure DVC is initialised.

VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.rcg-installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# Telemetry off: nothing may wait on the network.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup run test test-all bench clean-outputs help
help:
	@echo "make run       run the whole pipeline on the embedded default (dvc repro)"
	@echo "make test      run the test suite (CPU, offline; slow tests excluded)"
	@echo "make test-all  run every test, the slow ones too"
	@echo "make bench     run the benchmarks (each prints its ratio last)"

# The stamp depends on the requirement files, so a change to them reinstalls and nothing else does.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e .
	@touch $@

$(FMNIST):
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
		sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST not found at $(FMNIST) and apt is not available:"; \
		echo "install Debian's dataset-fashion-mnist, or set shard.fashion_mnist_dir in params.yaml"; \
		exit 1; \
	fi

setup: $(STAMP) $(FMNIST)
	@test -d .dvc || $(BIN)/dvc init -q
	@$(BIN)/dvc config core.analytics false

run: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ""

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
