#!/usr/bin/env bash
# Build an offline wheelhouse for a GPU node that already has torch (make wheelhouse).
#
#   tools/wheelhouse.sh --python .venv/bin/python --out DIR [--py 3.12] [--platform TAG]...
#
# DIR gets what such a node lacks, every file checked into MANIFEST.txt (size, sha256;
# tools/wheelhouse_manifest.sh, which also lists prebuilt MinkowskiEngine wheels a
# previous tools/prebuild_minkowski.sh put there, and keeps them):
#   * MinkowskiEngine's source tarball (pip download, sha256 checked by build.sh);
#   * wheels of spark_me's dependencies that are not part of a typical torch install
#     (hydra-core, omegaconf, wandb, their dependencies), of pytest and pytest-timeout for
#     the GPU test phase, and of the build tools (setuptools, wheel, ninja), at the
#     versions of requirements/lock.txt, for the target Python and platform;
#   * scipy-openblas32, an OpenBLAS in a wheel (headers and library) for MinkowskiEngine's
#     CPU kernels, since the node may have no BLAS headers.
# The node is assumed to have torch, triton, timm, numpy, pillow, tqdm and matplotlib;
# anything it lacks beyond that comes from here (`pip install --no-index`).
# --python is a Python with torch (make install's venv): pip runs MinkowskiEngine's setup.py
# to download its source. Fails if DIR ends up over WHEELHOUSE_MAX_MIB (default 60).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$REPO/requirements/lock.txt"
SCIPY_OPENBLAS_VERSION=0.3.34.481.3

python=""
out=""
py=3.12
platforms=()
die() { echo "wheelhouse.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --python) python="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --py) py="$2"; shift 2 ;;
    --platform) platforms+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$python" ] && [ -n "$out" ] || die "--python and --out are required (see --help)"
[[ "$py" =~ ^3\.[0-9]+$ ]] || die "--py must look like 3.12, got '$py'"
[ ${#platforms[@]} -gt 0 ] || platforms=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
case "$python" in /*) ;; */*) python="$PWD/$python" ;; esac

pin() {  # NAME: its version in the lock file
  local v
  v=$(grep -i -m1 "^$1==" "$LOCK" | cut -d= -f3) || true
  [ -n "$v" ] || die "$1 is not pinned in $LOCK"
  printf '%s\n' "$v"
}

mkdir -p "$out"
start=$(date +%s)
"$REPO/docker/minkowski/build.sh" --python "$python" --download-source "$out"

abi="cp${py/./}"
platform_args=()
for p in "${platforms[@]}"; do platform_args+=(--platform "$p"); done
# antlr4-python3-runtime (hydra-core's parser runtime) is published as a source archive
# only: build its pure-Python wheel here, then let the download below find it.
pip_q=("$python" -m pip --disable-pip-version-check)
"${pip_q[@]}" wheel --quiet --no-deps -w "$out" "antlr4-python3-runtime==$(pin antlr4-python3-runtime)"
"${pip_q[@]}" download --quiet --only-binary :all: --python-version "$py" --implementation cp --abi "$abi" \
  "${platform_args[@]}" --platform any --find-links "$out" -d "$out" \
  "hydra-core==$(pin hydra-core)" "omegaconf==$(pin omegaconf)" "wandb==$(pin wandb)" \
  "pytest==$(pin pytest)" "pytest-timeout==$(pin pytest-timeout)" \
  "setuptools==$(pin setuptools)" "wheel==$(pin wheel)" "ninja==$(pin ninja)" \
  "scipy-openblas32==$SCIPY_OPENBLAS_VERSION"

echo "wheelhouse.sh: fetched for Python $py in $(( $(date +%s) - start )) s"
"$REPO/tools/wheelhouse_manifest.sh" "$out"
