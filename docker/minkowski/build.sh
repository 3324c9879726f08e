#!/usr/bin/env bash
# Build (or reuse) a MinkowskiEngine 0.5.4 wheel patched for current Python/torch/CUDA,
# and install it into the given Python. The one build script for every target: `make
# install` (cpu), the CUDA compile check, the offline GPU install and the Docker images.
#
#   docker/minkowski/build.sh --python .venv/bin/python --target cpu|cuda \
#       [--cache DIR] [--sdist FILE] [--no-install] [--wheel-dir DIR] [--blas auto|system|wheel]
#       [--prebuilt DIR] [--prebuilt-out DIR] [--print-key]
#   docker/minkowski/build.sh --python .venv/bin/python --download-source DIR
#
# The wheel is cached under DIR (default $SPARK_ME_CACHE/wheels, SPARK_ME_CACHE defaulting
# to ~/.cache/spark_me) keyed by the torch version, Python tag, target and a hash of the
# patch set, so a second run takes seconds. The source tarball comes from --sdist, else
# the cache, else `pip download` (the user's index, mirror and proxy settings apply), and
# is always checked against its sha256. --download-source only fetches and checks it into
# DIR (for offline machines and Docker builds), then exits.
# Prebuilt wheels (a GPU node's wheel compiled on another machine, tools/prebuild_minkowski.sh):
# --prebuilt DIR uses DIR/<key>/*.whl where one matches this build's key exactly (torch
# version, Python tag, target, patches, BLAS, nvcc release, architectures), instead of
# compiling; --prebuilt-out DIR copies the wheel to DIR/<key>/; --print-key prints the key
# (BLAS and CUDA detection included) and exits.
# BLAS (for ME's CPU kernels, both targets): `system` is OpenBLAS from the OS
# (libopenblas-dev); `wheel` is the scipy-openblas32 wheel installed in --python's
# environment (no root needed; used by the offline GPU install); `auto` (default) takes
# the system's when its headers are there, else the wheel's.
# Environment: MAX_JOBS (compile jobs, default nproc), TORCH_CUDA_ARCH_LIST (cuda target,
# default "8.0;8.6;8.9;9.0" plus 10.0/12.0 where the toolkit supports them),
# CUDA_HOME (cuda target, default /usr/local/cuda). Relative paths are taken from the
# directory the script is called from.
set -euo pipefail

ME_VERSION=0.5.4
ME_SHA256=b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94
ME_SDIST="MinkowskiEngine-${ME_VERSION}.tar.gz"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

python=python3
target=cpu
cache="${SPARK_ME_CACHE:-$HOME/.cache/spark_me}/wheels"
sdist=""
install=1
wheel_dir=""
source_dir=""
blas=auto
prebuilt=""
prebuilt_out=""
print_key=0

die() { echo "build.sh: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --python) python="$2"; shift 2 ;;
    --target) target="$2"; shift 2 ;;
    --cache) cache="$2"; shift 2 ;;
    --sdist) sdist="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    --wheel-dir) wheel_dir="$2"; shift 2 ;;
    --download-source) source_dir="$2"; shift 2 ;;
    --blas) blas="$2"; shift 2 ;;
    --prebuilt) prebuilt="$2"; shift 2 ;;
    --prebuilt-out) prebuilt_out="$2"; shift 2 ;;
    --print-key) print_key=1; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case "$target" in cpu|cuda) ;; *) die "--target must be 'cpu' or 'cuda', got '$target'" ;; esac
case "$blas" in auto|system|wheel) ;; *) die "--blas must be auto, system or wheel, got '$blas'" ;; esac

# Every path is made absolute before anything changes directory (the compile runs inside
# the unpacked source tree).
absolute() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
case "$python" in
  */*) python=$(absolute "$python") ;;
  *) found=$(command -v "$python") || die "--python '$python' is not on PATH"; python=$found ;;
esac
cache=$(absolute "$cache")
[ -z "$sdist" ] || sdist=$(absolute "$sdist")
[ -z "$wheel_dir" ] || wheel_dir=$(absolute "$wheel_dir")
[ -z "$source_dir" ] || source_dir=$(absolute "$source_dir")
[ -z "$prebuilt" ] || prebuilt=$(absolute "$prebuilt")
[ -z "$prebuilt_out" ] || prebuilt_out=$(absolute "$prebuilt_out")
[ -x "$python" ] || die "--python '$python' is not an executable file"
"$python" -c 'import torch' 2>/dev/null \
  || die "torch is not importable by '$python': install torch first (make install does)"

check_sdist() {  # FILE: die unless it is MinkowskiEngine ${ME_VERSION}'s published source
  [ -f "$1" ] || die "source tarball '$1' not found"
  echo "$ME_SHA256  $1" | sha256sum -c --quiet - 2>/dev/null \
    || die "sha256 of '$1' does not match MinkowskiEngine ${ME_VERSION}'s source ($ME_SHA256); delete it and retry, or pass the right file with --sdist"
}

# Fetch the source through pip into $cache, so the user's index, mirror and proxy settings
# apply. pip prepares the package's metadata, which runs MinkowskiEngine's unpatched
# setup.py with this Python: it imports torch, finds BLAS through numpy.distutils (needs
# SETUPTOOLS_USE_DISTUTILS=stdlib, and Python <= 3.11), and calls `pip uninstall
# MinkowskiEngine -y` with whatever pip is first on PATH. That last side effect is
# contained by putting a do-nothing `pip` first on PATH for this one command.
fetch_sdist() {
  local dest="$cache/$ME_SDIST" scratch
  [ -f "$dest" ] && { echo "$dest"; return; }
  mkdir -p "$cache"
  scratch=$(mktemp -d "$cache/download.XXXXXX")
  mkdir -p "$scratch/guard" "$scratch/dist"
  printf '#!/bin/sh\nexit 0\n' > "$scratch/guard/pip"
  chmod +x "$scratch/guard/pip"
  echo "build.sh: downloading MinkowskiEngine ${ME_VERSION} source with pip" >&2
  if ! (cd "$scratch" && PATH="$scratch/guard:$PATH" SETUPTOOLS_USE_DISTUTILS=stdlib \
        "$python" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
        -d "$scratch/dist" "MinkowskiEngine==${ME_VERSION}") >&2; then
    rm -rf "$scratch"
    die "pip could not download MinkowskiEngine ${ME_VERSION}'s source (see pip's output above). pip must be able to run its setup.py: Python <= 3.11 with numpy, and BLAS headers (apt-get install libopenblas-dev). Otherwise fetch $ME_SDIST on such a machine (build.sh --download-source DIR, or make wheelhouse) and pass --sdist FILE"
  fi
  mv "$scratch/dist/$ME_SDIST" "$dest"
  rm -rf "$scratch"
  echo "$dest"
}

if [ -n "$source_dir" ]; then
  [ -n "$sdist" ] || sdist=$(fetch_sdist)
  check_sdist "$sdist"
  mkdir -p "$source_dir"
  [ "$sdist" -ef "$source_dir/$ME_SDIST" ] || cp "$sdist" "$source_dir/$ME_SDIST"
  echo "build.sh: MinkowskiEngine ${ME_VERSION} source (sha256 checked) in $source_dir/$ME_SDIST"
  exit 0
fi

torch_version=$("$python" -c 'import torch; print(torch.__version__)')
py_tag=$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
# Patches in common/ apply to every target, cuda/ only to the CUDA build; the cache key
# hashes exactly the patches applied, so editing a CUDA patch keeps the CPU wheel.
patches=("$HERE"/patches/common/*.patch)
[ "$target" = cpu ] || patches+=("$HERE"/patches/cuda/*.patch)
patch_hash=$(cat "${patches[@]}" | sha256sum | cut -c1-12)
key="me${ME_VERSION}-torch${torch_version//+/_}-${py_tag}-${target}-p${patch_hash}"

system_cblas=""
for h in /usr/include/x86_64-linux-gnu/cblas.h /usr/include/aarch64-linux-gnu/cblas.h /usr/include/cblas.h; do
  [ -f "$h" ] && { system_cblas=$h; break; }
done
wheel_blas=$("$python" -c 'import scipy_openblas32 as s; print(s.get_include_dir(), s.get_lib_dir())' 2>/dev/null || true)
if [ "$blas" = auto ]; then
  if [ -n "$system_cblas" ]; then blas=system; elif [ -n "$wheel_blas" ]; then blas=wheel; fi
fi
case "$blas" in
  system) [ -n "$system_cblas" ] || die "OpenBLAS headers missing: apt-get install libopenblas-dev (or --blas wheel with scipy-openblas32 installed)" ;;
  wheel) [ -n "$wheel_blas" ] || die "--blas wheel: scipy-openblas32 is not importable by '$python' (pip install scipy-openblas32)" ;;
  auto) die "no BLAS found: apt-get install libopenblas-dev, or pip install scipy-openblas32 into '$python''s environment" ;;
esac
# The wheel's OpenBLAS is a different library file, so it gets its own cache slot.
[ "$blas" = system ] || key="$key-blaswheel3"  # 3: linked by path, found by a relative rpath (see below)
if [ "$target" = cuda ]; then
  # The CUDA wheel also depends on the toolkit and the architectures compiled for.
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  [ -x "$CUDA_HOME/bin/nvcc" ] || die "nvcc not found under CUDA_HOME=$CUDA_HOME"
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    archs="8.0;8.6;8.9;9.0"
    supported=$("$CUDA_HOME/bin/nvcc" --list-gpu-arch 2>/dev/null || true)
    for a in 100 120; do
      echo "$supported" | grep -q "compute_$a" && archs="$archs;${a:0:-1}.${a: -1}"
    done
    export TORCH_CUDA_ARCH_LIST="$archs"
  fi
  nvcc_version=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  # An architecture-specific target (9.0a, 10.0f) builds the same MinkowskiEngine code as
  # the plain one: its kernels use no such instructions. Both share a key, so a wheel built
  # for 9.0 serves a node whose environment asks for 9.0a (the sixth GPU run compiled for
  # 150 s instead, docs/gpu.md).
  arch_tag=$(echo "$TORCH_CUDA_ARCH_LIST" | sed -E 's/([0-9])[af]([+; ]|$)/\1\2/g' | tr -d '.+' | tr '; ' '__')
  key="$key-nvcc${nvcc_version}-sm${arch_tag}"
fi
[ "$print_key" = 0 ] || { echo "$key"; exit 0; }
slot="$cache/$key"
mkdir -p "$slot"

wheel=$(ls "$slot"/*.whl 2>/dev/null | head -n1 || true)
if [ -n "$prebuilt" ] && [ -z "$wheel" ]; then
  # Used from where it lies, not copied into the cache: if it fails to import, a rerun
  # without --prebuilt compiles.
  wheel=$(ls "$prebuilt/$key"/*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$wheel" ]; then
    echo "build.sh: using the prebuilt wheel $wheel"
  else
    echo "build.sh: no prebuilt wheel for $key in $prebuilt (it has: $(ls "$prebuilt" 2>/dev/null | tr '\n' ' ')); compiling"
  fi
fi
if [ -n "$wheel" ]; then
  { [ -n "$prebuilt" ] && [[ "$wheel" == "$prebuilt"/* ]]; } || echo "build.sh: using cached wheel $wheel"
else
  start=$(date +%s)
  # The build tree is kept until the wheel is built, so an interrupted build resumes
  # (ninja recompiles only what is missing).
  work="$slot/build"
  if [ ! -f "$work/.prepared" ]; then
    rm -rf "$work"
    mkdir -p "$work"
    [ -n "$sdist" ] || sdist=$(fetch_sdist)
    check_sdist "$sdist"
    tar -xzf "$sdist" -C "$work"
    for p in "${patches[@]}"; do
      echo "build.sh: applying $(basename "$(dirname "$p")")/$(basename "$p")"
      patch -s -p1 -d "$work/MinkowskiEngine-${ME_VERSION}" < "$p"
    done
    touch "$work/.prepared"
  else
    echo "build.sh: resuming the build in $work"
  fi
  src="$work/MinkowskiEngine-${ME_VERSION}"

  if [ "$blas" = wheel ]; then
    # scipy-openblas32 exports its CBLAS functions with a scipy_ prefix. MinkowskiEngine
    # includes <cblas.h> and calls cblas_{s,d}gemm and cblas_{s,d}axpy: a cblas.h found
    # first on CPATH includes the wheel's header and maps those four names; -lopenblas
    # resolves through a symlink, and an rpath finds the library at run time.
    read -r blas_include blas_lib <<<"$wheel_blas"
    mkdir -p "$work/blas/include" "$work/blas/lib"
    {
      echo "/* spark_me build: CBLAS from the scipy-openblas32 wheel (prefixed symbols). */"
      echo "#include \"$blas_include/cblas.h\""
      for f in sgemm dgemm saxpy daxpy; do echo "#define cblas_$f scipy_cblas_$f"; done
    } > "$work/blas/include/cblas.h"
    ln -sf "$blas_lib/libscipy_openblas.so" "$work/blas/lib/libopenblas.so"
    export CPATH="$work/blas/include${CPATH:+:$CPATH}"
    export LIBRARY_PATH="$work/blas/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
    # -lopenblas alone is not enough: where another libopenblas.so comes first on the
    # linker's path (as on a CUDA node), the linker picks that one, finds none of the
    # scipy_ symbols in it and (--as-needed) drops it, leaving them undefined at import.
    # Naming the wheel's library by path, outside --as-needed, always links it. The first
    # rpath finds it beside the extension in any site-packages that has both wheels (a
    # wheel built on one machine and installed on another, as the GPU node's prebuilt
    # one); the second in the environment it was built in. (The link runs without a
    # shell: '$ORIGIN' reaches the linker as written.)
    export LDFLAGS="${LDFLAGS:+$LDFLAGS }-Wl,--push-state,--no-as-needed $blas_lib/libscipy_openblas.so -Wl,--pop-state"
    LDFLAGS="$LDFLAGS -Wl,-rpath,\$ORIGIN/../scipy_openblas32/lib -Wl,-rpath,$blas_lib"
    echo "build.sh: BLAS from scipy-openblas32 in $blas_lib"
  else
    echo "build.sh: BLAS from the system ($system_cblas)"
  fi

  flags=()
  if [ "$target" = cpu ]; then
    flags=(--cpu_only --blas=openblas)
  else
    "$python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' \
      || die "torch in '$python' is a CPU-only build; --target cuda needs a CUDA build of torch"
    # CUDA >= 13 keeps thrust/cub under include/cccl: nvcc finds them, the host compiler
    # (for the .cpp sources) does not.
    [ ! -d "$CUDA_HOME/include/cccl" ] || export CPATH="$CUDA_HOME/include/cccl${CPATH:+:$CPATH}"
    # A bare toolkit may lack the cuBLAS/cuSPARSE headers and libraries (and cuSOLVER's
    # headers, which torch's ATen/cuda headers include); torch's CUDA wheels ship them
    # (CUDA 13: site-packages/nvidia/cu13/, all libraries in one root; CUDA 12: one root
    # per library, nvidia/cusparse/, nvidia/cublas/, nvidia/cusolver/), with versioned
    # library names only, so link through unversioned symlinks. At run time `import torch`
    # has loaded them.
    if [ ! -f "$CUDA_HOME/include/cusparse.h" ]; then
      nv=$("$python" - <<'PY'
import glob, os, site, sys
sites = dict.fromkeys(site.getsitepackages() + [p for p in sys.path if p.endswith("-packages")])
dirs = [p for s in sites for p in sorted(glob.glob(os.path.join(s, "nvidia", "*")))]
for lib, header in (("cusparse", "cusparse.h"), ("cublas", "cublas_v2.h"), ("cusolver", "cusolverDn.h")):
    roots = [p for p in dirs if os.path.isfile(os.path.join(p, "include", header))
             and glob.glob(os.path.join(p, "lib", f"lib{lib}.so.*"))]
    if roots:
        print(lib, roots[0])
PY
)
      [ "$(grep -c . <<<"$nv")" = 3 ] || die "cuSPARSE/cuBLAS/cuSOLVER headers and libraries are in neither $CUDA_HOME nor torch's nvidia wheels: install the toolkit's cuBLAS/cuSPARSE/cuSOLVER dev packages"
      mkdir -p "$work/nvlib"
      while read -r l root; do
        so=$(ls "$root/lib/lib$l.so."* | head -n1)
        ln -sf "$so" "$work/nvlib/lib$l.so"
        echo "build.sh: using $l from $root"
        case ":${CPATH:-}:" in *":$root/include:"*) ;; *)
          export CPATH="$root/include${CPATH:+:$CPATH}"
          export LIBRARY_PATH="$root/lib${LIBRARY_PATH:+:$LIBRARY_PATH}" ;;
        esac
      done <<<"$nv"
      export LIBRARY_PATH="$work/nvlib:$LIBRARY_PATH"
    fi
    echo "build.sh: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
    flags=(--force_cuda --blas=openblas "--cuda_home=$CUDA_HOME")
  fi
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  echo "build.sh: compiling MinkowskiEngine ${ME_VERSION} ($target, torch $torch_version, $MAX_JOBS jobs)"
  (cd "$src" && "$python" setup.py -q bdist_wheel -d "$work/dist" "${flags[@]}") \
    || die "MinkowskiEngine build failed (see the compiler output above)"
  cp "$work"/dist/*.whl "$slot/"
  rm -rf "$work"
  wheel=$(ls "$slot"/*.whl | head -n1)
  echo "build.sh: built $wheel in $(( $(date +%s) - start )) s"
fi

[ -z "$wheel_dir" ] || { mkdir -p "$wheel_dir"; cp "$wheel" "$wheel_dir/"; }
if [ -n "$prebuilt_out" ]; then
  rm -rf "${prebuilt_out:?}/$key"
  mkdir -p "$prebuilt_out/$key"
  cp "$wheel" "$prebuilt_out/$key/"
  echo "build.sh: prebuilt wheel in $prebuilt_out/$key/"
fi
if [ "$install" = 1 ]; then
  "$python" -m pip install -q --no-deps --force-reinstall "$wheel"
  "$python" -c 'import MinkowskiEngine as ME; print("build.sh: MinkowskiEngine", ME.__version__, "imports")'
fi
