#!/usr/bin/env bash
# Installs nvcc, the CUDA runtime and cuBLAS from NVIDIA's PyPI wheels (13.0, the device's
# version) into CUDA_HOME, unless $CUDA_HOME/bin/nvcc is already there. libcuda.so is a link-time
# stub (the real driver library is on the device). No GPU is needed. Used by build-cuda-here.sh
# (whole libraries) and scripts/ci/cuda-compile.sh (the translation units our patches touch).
#
#   scripts/gpu/install-nvcc.sh [CUDA_HOME]     (default: $CUDA_HOME, else /opt/cuda13)
set -euo pipefail
cuda=${1:-${CUDA_HOME:-/opt/cuda13}}
[ -x "$cuda/bin/nvcc" ] && exit 0

echo "installing nvcc 13.0 from PyPI into $cuda" >&2
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --no-cache-dir -d "$tmp" "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*"
for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$tmp/x"; done
rm -f "$tmp"/*.whl
chmod +x "$tmp/x/nvidia/cu13"/bin/* "$tmp/x/nvidia/cu13"/nvvm/bin/*
ln -sfn lib "$tmp/x/nvidia/cu13/lib64"
(cd "$tmp/x/nvidia/cu13/lib" && ln -sf libcudart.so.13 libcudart.so && ln -sf libcublas.so.13 libcublas.so && ln -sf libcublasLt.so.13 libcublasLt.so)
mkdir -p "$tmp/x/nvidia/cu13/lib/stubs"
echo 'void kvtuner_libcuda_stub(void) {}' > "$tmp/stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tmp/x/nvidia/cu13/lib/stubs/libcuda.so" "$tmp/stub.c"
# moved into place last, so that an interrupted install is not taken for a finished one
mkdir -p "$(dirname "$cuda")" && rm -rf "$cuda" && mv "$tmp/x/nvidia/cu13" "$cuda"
"$cuda/bin/nvcc" --version | tail -2 >&2
