#!/usr/bin/env bash
# A fresh machine's setup: oneDNN's runtime for the CPU matmuls, TensorBoard (for the tests and
# for watching runs), then the data (scripts/get_data.sh).
#
# gpt-pretrain loads oneDNN 2.x (libdnnl.so.2) at run time for its CPU matmuls: AMX and
# AVX512-BF16 kernels for `dtype = "bf16"`, AVX-512 for f32. Without it training still runs, in
# f32 on gemm, and `dtype = "bf16"` on CPU is refused; the tests need it. On Debian and Ubuntu it
# is the package libdnnl2 (Debian 12: oneDNN 2.6; installed with apt-get when we are root or have
# password-less sudo). Elsewhere, put any oneDNN 2.x libdnnl.so.2 on the library path.
#
# `--mpi` also installs what data-parallel training needs (`cargo build --release --features mpi`,
# then `mpirun -np N`): OpenMPI (openmpi-bin, libopenmpi-dev) and libclang-dev for the bindings.
set -euo pipefail
cd "$(dirname "$0")/.."

with_mpi=false
for arg in "$@"; do
    case "$arg" in
        --mpi) with_mpi=true ;;
        *) echo "setup: unknown argument '$arg' (known: --mpi)" >&2; exit 2 ;;
    esac
done

have_onednn() { ldconfig -p 2>/dev/null | grep -q 'libdnnl\.so\.2 '; }

# apt_install PACKAGE...: with apt-get when we are root or have password-less sudo; false otherwise.
apt_install() {
    local sudo=()
    if [[ $(id -u) != 0 ]] && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    fi
    command -v apt-get > /dev/null && { [[ $(id -u) == 0 ]] || ((${#sudo[@]})); } || return 1
    "${sudo[@]}" apt-get install -y -q "$@" > /dev/null 2>&1 ||
        { "${sudo[@]}" apt-get update -q > /dev/null && "${sudo[@]}" apt-get install -y -q "$@" > /dev/null; }
}

if ! have_onednn; then
    echo "setup: installing oneDNN (libdnnl2) with apt-get" >&2
    apt_install libdnnl2 || true
fi
if have_onednn; then
    echo "setup: oneDNN found ($(ldconfig -p | grep -m1 'libdnnl\.so\.2 ' | sed 's/.*=> //'))" >&2
else
    echo "setup: oneDNN (libdnnl.so.2) not found and not installable here: CPU matmuls will use gemm, in f32 only; install libdnnl2 for bf16 and for the tests" >&2
fi
# The tests read the TensorBoard files runs write with TensorBoard's own reader: a virtual
# environment with the tensorboard package (from PyPI), which `tensorboard --logdir runs/` can
# also serve from.
if [[ ! -x .venv-tensorboard/bin/python ]] || ! .venv-tensorboard/bin/python -c "import tensorboard" 2> /dev/null; then
    echo "setup: installing tensorboard into .venv-tensorboard (pip)" >&2
    if python3 -m venv .venv-tensorboard && .venv-tensorboard/bin/pip install -q tensorboard; then
        echo "setup: tensorboard ready (.venv-tensorboard/bin/tensorboard --logdir runs/)" >&2
    else
        echo "setup: could not install tensorboard (needs python3-venv and PyPI): the TensorBoard test will fail until TENSORBOARD_PYTHON names a python that has it" >&2
    fi
fi
if $with_mpi; then
    if ! command -v mpirun > /dev/null || ! command -v mpicc > /dev/null || ! ldconfig -p | grep -q 'libclang'; then
        echo "setup: installing OpenMPI and libclang (openmpi-bin libopenmpi-dev libclang-dev) with apt-get" >&2
        apt_install openmpi-bin libopenmpi-dev libclang-dev ||
            { echo "setup: cannot install OpenMPI here: install an MPI library and libclang, then build with --features mpi" >&2; exit 1; }
    fi
    echo "setup: $(mpirun --version 2>&1 | head -1)" >&2
fi
bash scripts/get_data.sh
