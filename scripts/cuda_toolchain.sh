#!/usr/bin/env bash
# Installs a CUDA toolchain from PyPI (no root, no NVIDIA apt repository) into a folder and prints
# the environment that `cargo build --features cuda` needs, so that
#
#     eval "$(bash scripts/cuda_toolchain.sh)"
#     cargo build --release --features cuda
#
# builds for Hopper (CUDA_COMPUTE_CAP=90) on a machine with no GPU and no CUDA install.
#
# What it installs (CUDA 13.0 by default, the version of the driver on the GPU machines this project
# runs on: PTX from a newer nvcc may not load on an older driver):
#   nvidia-cuda-nvcc (nvcc, ptxas, fatbinary), nvidia-nvvm (cicc, libdevice), nvidia-cuda-crt and
#   nvidia-cuda-runtime (headers, libcudart), nvidia-cuda-cccl (CCCL headers), and for linking only:
#   nvidia-cublas, nvidia-curand, nvidia-cuda-nvrtc, and NCCL (nvidia-nccl-cu13, for the
#   `nccl` feature's data parallel on GPUs). The driver library libcuda.so is not on PyPI; a
#   stub with the driver API's symbol names is generated for the linker (as the CUDA toolkit's own
#   lib/stubs/libcuda.so), and the real driver's libcuda.so.1 is loaded at run time.
#
# Usage: scripts/cuda_toolchain.sh [DIR]
#   DIR defaults to $CUDA_TOOLCHAIN_DIR or ~/.cache/gpt-pretrain/cuda-$CUDA_TOOLCHAIN_VERSION.
#   CUDA_TOOLCHAIN_VERSION: 13.0 (default). CUDA_COMPUTE_CAP: printed as given, else 90.
# Progress goes to stderr; stdout carries only `export` lines.
set -euo pipefail

version=${CUDA_TOOLCHAIN_VERSION:-13.0}
case "$version" in
13.0)
    packages=(
        nvidia-cuda-nvcc==13.0.88
        nvidia-nvvm==13.0.88
        nvidia-cuda-crt==13.0.88
        nvidia-cuda-runtime==13.0.96
        nvidia-cuda-cccl==13.0.85
        nvidia-cuda-nvrtc==13.0.88
        nvidia-curand==10.4.0.35
        nvidia-cublas==13.0.2.14
        nvidia-nccl-cu13==2.32.3
    )
    ;;
*)
    echo "cuda_toolchain.sh: CUDA_TOOLCHAIN_VERSION=$version is not one this script pins (13.0)" >&2
    exit 2
    ;;
esac

dir=${1:-${CUDA_TOOLCHAIN_DIR:-$HOME/.cache/gpt-pretrain/cuda-$version}}
root="$dir/site/nvidia/cu13"
stamp="$dir/.installed"
python=${PYTHON:-python3}

if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "${packages[*]}" ]]; then
    echo "cuda_toolchain.sh: installing CUDA $version from PyPI into $dir" >&2
    rm -rf "$dir/site"
    mkdir -p "$dir"
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --target "$dir/site" "${packages[@]}" >&2

    # nvcc.profile looks for headers and libraries under targets/x86_64-linux, where a toolkit
    # install keeps them; the wheels put them at the top.
    mkdir -p "$root/targets"
    ln -sfn .. "$root/targets/x86_64-linux"

    # The linker wants unversioned names; the wheels ship only the versioned ones.
    for lib in cudart cublas cublasLt curand nvrtc; do
        versioned=$(cd "$root/lib" && ls "lib$lib.so."* | grep -v alt | sort | head -1)
        ln -sfn "$versioned" "$root/lib/lib$lib.so"
    done

    # NCCL's wheel keeps its own folder.
    ln -sfn "$(cd "$dir/site/nvidia/nccl/lib" && ls libnccl.so.* | sort | head -1)" "$dir/site/nvidia/nccl/lib/libnccl.so"

    # A link-time stub of the driver library: every cu* name cuda.h declares or #defines to, as an
    # empty function, under the driver's soname. Never loaded at run time.
    mkdir -p "$root/lib/stubs"
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$root/include/cuda.h" | sort -u |
        sed 's/.*/void &(void) {}/' >"$dir/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$dir/libcuda_stub.c"

    echo "${packages[*]}" >"$stamp"
fi

"$root/bin/nvcc" --version | tail -2 >&2

cat <<EOF
export CUDA_ROOT="$root"
export CUDA_PATH="$root"
export CUDA_HOME="$root"
export PATH="$root/bin:\$PATH"
export LIBRARY_PATH="$root/lib:$root/lib/stubs:$dir/site/nvidia/nccl/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
EOF
