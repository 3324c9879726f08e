# spark_me developer entry points. `make install` then `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help install venv deps minkowski test demo clean

help:
	@echo "make install   create $(VENV), install torch/torchvision/timm/..., build MinkowskiEngine (cached), install spark_me"
	@echo "make demo      install, then a ~5 min CPU pre-training on built-in synthetic images (outputs/demo/<time>/)"
	@echo "make test      run the test suite in $(VENV)"

install: deps minkowski
	$(PY) -m pip install -q -e ".[dev]"
	@$(PY) -c "import spark_me, MinkowskiEngine, torch; print('spark_me', spark_me.__version__, '| torch', torch.__version__, '| MinkowskiEngine', MinkowskiEngine.__version__)"

venv:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)

# torch and torchvision come from the package registry as a matching pair (newest); a
# pinned torch could be served by a local CPU-only wheel that the registry's torchvision
# cannot load (see DESIGN.md).
deps: venv
	$(PY) -m pip install -q --upgrade pip "setuptools>=70" wheel
	$(PY) -m pip install -q torch torchvision timm numpy hydra-core wandb tqdm pillow pytest matplotlib
	@dpkg -s libopenblas-dev >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas-dev; \
	  else echo "libopenblas-dev is missing: run 'sudo apt-get install libopenblas-dev'"; exit 2; fi; }

minkowski: venv
	docker/minkowski/build.sh --python $(PY) --target cpu

# OMP_WAIT_POLICY=PASSIVE: MinkowskiEngine's and torch's OpenMP regions alternate; with
# busy-waiting threads on a loaded 2-core machine, float64 tests ran up to 30x slower.
test:
	@test -x $(PY) || { echo "$(VENV) not found: run 'make install' first"; exit 2; }
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m pytest $(PYTEST_ARGS)

demo: install
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VENV)/bin/spark-me-pretrain experiment=demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
