#!/usr/bin/env bash
# Install spark_me on an air-gapped machine from a wheelhouse (make install-offline).
#
#   tools/install_offline.sh --wheelhouse DIR [--python python3] [--venv .venv]
#
# Creates VENV over the machine's own torch (--system-site-packages), installs what the
# wheelhouse brings with `pip --no-index` (nothing is fetched), builds MinkowskiEngine with
# docker/minkowski/build.sh from the wheelhouse's source tarball, for CUDA when torch sees
# GPUs (TORCH_CUDA_ARCH_LIST from their compute capabilities unless set; MAX_JOBS = cores
# unless set) and for the CPU otherwise, with the usual wheel cache and OpenBLAS from the
# wheelhouse, then installs spark_me editable. Prints the compile time. A wheel the
# wheelhouse brings prebuilt (prebuilt/<key>/, tools/prebuild_minkowski.sh) is installed
# instead of compiling when its key matches this machine exactly; if it does not import,
# MinkowskiEngine is compiled after all.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python=python3
venv="$REPO/.venv"
wheelhouse=""
die() { echo "install_offline.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) wheelhouse="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$wheelhouse" ] || die "--wheelhouse DIR is required (make it with 'make wheelhouse' on a connected machine)"
case "$wheelhouse" in /*) ;; *) wheelhouse="$PWD/$wheelhouse" ;; esac
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
[ -f "$wheelhouse/MANIFEST.txt" ] || die "$wheelhouse has no MANIFEST.txt: not a wheelhouse from 'make wheelhouse'"
sdist="$wheelhouse/MinkowskiEngine-0.5.4.tar.gz"
[ -f "$sdist" ] || die "$sdist is missing from the wheelhouse"
(cd "$wheelhouse" && while read -r sum _ f; do echo "$sum  $f"; done < MANIFEST.txt | sha256sum -c --quiet -) \
  || die "files in $wheelhouse do not match its MANIFEST.txt (damaged copy?)"

"$python" -c 'import torch' 2>/dev/null || die "'$python' cannot import torch: this install builds on the machine's own torch"
if [ ! -x "$venv/bin/python" ]; then
  echo "install_offline.sh: creating $venv over $("$python" -c 'import sys; print(sys.executable)')'s packages"
  "$python" -m venv --system-site-packages "$venv"
  # When that Python is itself a virtual environment (GPU images often ship torch in one),
  # --system-site-packages reaches only its base interpreter: a .pth file adds the
  # environment's own site-packages behind the new venv's.
  if "$python" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    site_dir=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$python" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site_dir/_spark_me_base_env.pth"
    echo "install_offline.sh: $python is a virtual environment; its packages are reached through $site_dir/_spark_me_base_env.pth"
  fi
fi
vpy="$venv/bin/python"
"$vpy" -c 'import torch' || die "$venv cannot see the machine's torch (was it created without --system-site-packages?)"

pip_offline=("$vpy" -m pip --disable-pip-version-check install --quiet --no-index --find-links "$wheelhouse")
# Build tools first (the build below and the editable install use them).
"${pip_offline[@]}" setuptools wheel ninja
"${pip_offline[@]}" hydra-core omegaconf wandb pytest pytest-timeout scipy-openblas32

read -r target archs < <("$vpy" - <<'PY'
import torch
if torch.cuda.is_available() and torch.cuda.device_count() > 0:
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    print("cuda", ";".join(f"{a}.{b}" for a, b in caps))
else:
    print("cpu", "-")
PY
)
if [ "$target" = cuda ]; then
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$archs}"
  echo "install_offline.sh: GPUs of compute capability $archs: building MinkowskiEngine for CUDA (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
else
  echo "install_offline.sh: torch sees no CUDA device: building MinkowskiEngine for the CPU (a rehearsal of the GPU install)"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
start=$(date +%s)
# BLAS from the wheelhouse's scipy-openblas32, whatever the machine has: no headers needed.
build=("$REPO/docker/minkowski/build.sh" --python "$vpy" --target "$target" --sdist "$sdist" --blas wheel)
if [ -d "$wheelhouse/prebuilt" ]; then
  "${build[@]}" --prebuilt "$wheelhouse/prebuilt" \
    || { echo "install_offline.sh: the prebuilt MinkowskiEngine did not install or import (above); compiling it"; "${build[@]}"; }
else
  "${build[@]}"
fi
echo "install_offline.sh: MinkowskiEngine ready in $(( $(date +%s) - start )) s ($target, $MAX_JOBS jobs)"

# --use-pep517: an editable install through setuptools' PEP 660 hook, in this process's
# setuptools. Without it pip falls back to `setup.py develop`, which recent setuptools
# turns into a second `pip install -e` without --no-index: it tries the network and fails
# (seen on the GPU node, whose setuptools is the image's).
"$vpy" -m pip --disable-pip-version-check install --quiet --no-index --no-deps --no-build-isolation --use-pep517 -e "$REPO"
"$vpy" -c "import spark_me, MinkowskiEngine as ME, torch; print('install_offline.sh: spark_me', spark_me.__version__, '| torch', torch.__version__, '| MinkowskiEngine', ME.__version__, '| CUDA', ME.is_cuda_available())"
