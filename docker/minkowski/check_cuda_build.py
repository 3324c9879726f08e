"""Check a CUDA build of MinkowskiEngine without a GPU: the extension loads with every
symbol resolved against torch's libraries, was compiled with CUDA, exposes the GPU
kernels, and embeds device code for the requested architectures.

    PYTHONPATH=<dir with the installed wheel> python docker/minkowski/check_cuda_build.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch  # first: loads libc10/libtorch/cudart that the extension links against


def main() -> int:
    import MinkowskiEngineBackend._C as backend  # dlopen with RTLD_NOW: unresolved symbols fail here

    so = backend.__file__
    print(f"check: loaded {so} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    if not backend.is_cuda_available():
        print("check: FAILED: the extension was compiled without CUDA (CPU_ONLY)")
        return 1
    gpu_ops = [n for n in dir(backend) if n.endswith("GPU")]
    if not any(n.startswith("ConvolutionForward") for n in gpu_ops):
        print(f"check: FAILED: no GPU convolution kernels exported (found {gpu_ops[:5]})")
        return 1
    print(f"check: compiled with CUDA; {len(gpu_ops)} GPU entry points (e.g. {', '.join(sorted(gpu_ops)[:3])})")
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):  # torch's triton ships one
        try:
            import triton

            cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        except ImportError:
            pass
    if os.path.exists(cuobjdump):
        out = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True).stdout
        archs = sorted({line.rsplit(".", 2)[-2] for line in out.splitlines() if ".sm_" in line})
        print(f"check: device code for {', '.join(archs) or 'none found'}")
        if not archs:
            return 1
    else:
        print("check: cuobjdump not found: compiled architectures not listed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
