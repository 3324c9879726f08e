#!/usr/bin/env bash
# Compile a GPU node's MinkowskiEngine wheel on this machine, into a wheelhouse (make
# wheelhouse-minkowski), so the node installs it in seconds instead of compiling.
#
#   tools/prebuild_minkowski.sh --wheelhouse DIR --python python3.12 --torch 2.11.0+cu130 [--archs 9.0] [--venv DIR]
#
# The wheel must match the node exactly, which docker/minkowski/build.sh's cache key
# guarantees: the same Python minor version (--python: an interpreter of the node's
# version on this machine), the same torch release and CUDA build (--torch: installed here
# from the package index, with its CUDA libraries, into build/prebuild/<py>-torch<ver>/ or
# --venv; an existing one whose torch imports is kept),
# the same nvcc release (this machine's CUDA_HOME against the node's), the same patches
# and BLAS (the wheelhouse's scipy-openblas32), and the node's GPU architectures (--archs,
# TORCH_CUDA_ARCH_LIST; the node computes it from its GPUs, "9.0" for H100 and H200).
# The node's install (tools/install_offline.sh) uses DIR/prebuilt/<key>/*.whl where the
# key it computes matches, and compiles otherwise (it says which keys it found).
# No GPU is needed here. Compiling took 20 minutes with 2 jobs (MAX_JOBS, default
# nproc); an interrupted build resumes. The wheelhouse's MANIFEST.txt is rewritten.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCIPY_OPENBLAS_VERSION=0.3.34.481.3  # as tools/wheelhouse.sh puts into the wheelhouse

wheelhouse=""
python=""
torch_version=""
archs=9.0
venv=""
die() { echo "prebuild_minkowski.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) wheelhouse="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --torch) torch_version="$2"; shift 2 ;;
    --archs) archs="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$wheelhouse" ] && [ -n "$python" ] && [ -n "$torch_version" ] \
  || die "--wheelhouse, --python and --torch are required (see --help)"
[[ "$torch_version" =~ ^[0-9]+\.[0-9]+\.[0-9]+(\+[a-z0-9]+)?$ ]] \
  || die "--torch must be the node's torch.__version__, like 2.11.0+cu130 (or a release, 2.11.0), got '$torch_version'"
release=${torch_version%%+*}
case "$wheelhouse" in /*) ;; *) wheelhouse="$PWD/$wheelhouse" ;; esac
[ -f "$wheelhouse/MANIFEST.txt" ] || die "$wheelhouse has no MANIFEST.txt: make the wheelhouse first (make wheelhouse)"
sdist="$wheelhouse/MinkowskiEngine-0.5.4.tar.gz"
[ -f "$sdist" ] || die "$sdist is missing from the wheelhouse"
py=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null) \
  || die "--python '$python' does not run here: this needs an interpreter of the node's Python version (with pyenv: its full path, e.g. ~/.pyenv/versions/3.12.1/bin/python3.12)"

[ -n "$venv" ] || venv="$REPO/build/prebuild/py$py-torch$release"
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  echo "prebuild_minkowski.sh: installing torch $release (a CUDA build, several GB) into $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip --disable-pip-version-check install --quiet \
    "torch==$release" numpy wheel ninja "scipy-openblas32==$SCIPY_OPENBLAS_VERSION"
fi
read -r have cuda < <("$venv/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda)')
[ "$cuda" != None ] || die "the index gave a CPU-only torch ($have); the node's wheel needs its CUDA build"
[ "$torch_version" = "$release" ] || [ "$have" = "$torch_version" ] \
  || die "$venv has torch $have, the node $torch_version: another CUDA build. Install the node's build there (e.g. $venv/bin/pip install torch==$release --index-url https://download.pytorch.org/whl/${torch_version#*+}), then rerun"
echo "prebuild_minkowski.sh: torch $have (CUDA $cuda), Python $py, TORCH_CUDA_ARCH_LIST=$archs"

TORCH_CUDA_ARCH_LIST="$archs" "$REPO/docker/minkowski/build.sh" --python "$venv/bin/python" --target cuda \
  --blas wheel --sdist "$sdist" --no-install --prebuilt-out "$wheelhouse/prebuilt"
"$REPO/tools/wheelhouse_manifest.sh" "$wheelhouse"
