#!/usr/bin/env bash
# The CUDA check: the GPU tests (tests/cuda.rs), `bench --device cuda --preset gpt2` in f32 and
# bf16, and a short report. Written for GPU machines that have a driver, PyTorch and CUDA 13 but no
# Rust toolchain and no network: build here, copy one folder there, run it there.
#
#   scripts/gpu_check.sh build [DIR]  on a build machine (Rust, pip, no GPU needed): installs the
#                                     CUDA toolchain (scripts/cuda_toolchain.sh), builds the binary
#                                     and the GPU test binary with --features cuda, and fills DIR
#                                     (default dist/gpu-check) with everything the run needs.
#   DIR/gpu_check.sh run [DIR]        on the GPU machine: runs the tests and the benchmarks and
#                                     writes DIR/report.md (and DIR/logs/).
#   scripts/gpu_check.sh              both, on a machine that has Rust and a GPU.
#
# With GPU_CHECK_NCCL=1, `build` also builds bin/gpt-pretrain-nccl (--features cuda,mpi,nccl, in
# its own target folder), and `run` checks that one rank under `mpirun -np 1`, its gradients summed
# by NCCL, ends bitwise equal to the plain CUDA binary's run. That binary needs OpenMPI
# (libmpi.so.40, mpirun) and NCCL (libnccl.so.2; PyTorch's wheels ship it under
# site-packages/nvidia/nccl/lib) on the GPU machine; without them the report says it was skipped.
# NCCL cannot put two ranks on one GPU, so a one-GPU machine checks world size 1 only; with 2 or
# more GPUs `run` also compares 2 ranks against 1 rank with grad_accum 2 (equal to within
# rounding, not bitwise: NCCL sums in its own order).
#
# What travels (DIR, 120 MB; DIR.tar.xz, 16 MB): bin/gpt-pretrain, bin/cuda-tests (the test binary), gpu_check.sh,
# scripts/torch_gpu_bench.py, tests/fixtures/optim/*.json (PyTorch optimizer fixtures) and
# data/tinyshakespeare.txt. What the GPU machine must have: an NVIDIA driver for CUDA >= 13.0
# (libcuda.so.1) and the CUDA 13 runtime libraries libcudart.so.13, libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10 and libnvrtc.so.13 — PyTorch's cu130 wheels install them under
# site-packages/nvidia/cu13/lib, which `run` finds; or set LD_LIBRARY_PATH yourself.
set -euo pipefail

mode=${1:-all}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

build() {
    local dir=$1
    local root
    root=$(cd "$here/.." && pwd)
    cd "$root"
    eval "$(bash scripts/cuda_toolchain.sh)"
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/cuda}
    cargo build --release --features cuda --bin gpt-pretrain
    local test_bin
    test_bin=$(cargo test --release --features cuda --test cuda --no-run --message-format=json |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
    rm -rf "$dir"
    mkdir -p "$dir/bin" "$dir/tests/fixtures" "$dir/data" "$dir/scripts"
    cp "$CARGO_TARGET_DIR/release/gpt-pretrain" "$dir/bin/"
    cp "$test_bin" "$dir/bin/cuda-tests"
    strip --strip-debug "$dir/bin/"* 2>/dev/null || true
    cp -r tests/fixtures/optim "$dir/tests/fixtures/"
    local data=${DATA_MIRROR:-data}
    cp "$data/tinyshakespeare.txt" "$dir/data/"
    cp scripts/gpu_check.sh "$dir/"
    cp scripts/torch_gpu_bench.py "$dir/scripts/"
    if [[ ${GPU_CHECK_NCCL:-0} == 1 ]]; then
        CARGO_TARGET_DIR=$CARGO_TARGET_DIR-nccl cargo build --release --features cuda,mpi,nccl --bin gpt-pretrain
        cp "$CARGO_TARGET_DIR-nccl/release/gpt-pretrain" "$dir/bin/gpt-pretrain-nccl"
        strip --strip-debug "$dir/bin/gpt-pretrain-nccl" 2>/dev/null || true
    fi
    git rev-parse HEAD >"$dir/COMMIT" 2>/dev/null || echo unknown >"$dir/COMMIT"
    tar -C "$(dirname "$dir")" -cJf "$dir.tar.xz" "$(basename "$dir")"
    du -sh "$dir" "$dir.tar.xz" >&2
    echo "built $dir ($dir.tar.xz): copy it to the GPU machine, unpack, run gpu-check/gpu_check.sh run" >&2
}

# Adds the CUDA 13 runtime libraries PyTorch's wheels ship to LD_LIBRARY_PATH, when not found.
find_cuda_libs() {
    if ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.13'; then
        return
    fi
    local py=${PYTHON:-python3} libdir
    for libdir in $("$py" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | tr ' ' '\n' | sed 's|$|/nvidia/cu13/lib|') /usr/local/cuda/lib64; do
        if [[ -e "$libdir/libcublas.so.13" ]]; then
            export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            return
        fi
    done
    echo "gpu_check.sh: no libcublas.so.13 found; set LD_LIBRARY_PATH to the CUDA 13 libraries" >&2
}

run() {
    local dir
    dir=$(cd "$1" && pwd)
    cd "$dir"
    find_cuda_libs
    mkdir -p logs
    export GPT_PRETRAIN_ROOT=$dir GPT_PRETRAIN_BIN=$dir/bin/gpt-pretrain DATA_MIRROR=$dir/data
    local report=$dir/report.md status=0
    {
        echo "# gpt-pretrain GPU check"
        echo
        echo "- commit: $(cat COMMIT 2>/dev/null || echo unknown)"
        echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
        echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi failed')"
        echo
        echo "## Tests (tests/cuda.rs)"
        echo
    } >"$report"
    if bin/cuda-tests --test-threads 1 --nocapture >logs/tests.log 2>&1; then
        echo "All passed." >>"$report"
    else
        status=1
        echo "**FAILED** (logs/tests.log)." >>"$report"
    fi
    {
        echo
        echo '```'
        grep -E '^test |skipped|differ from|validation losses|resumed run|test result' logs/tests.log || true
        echo '```'
        echo
        echo "## bench --device cuda --preset gpt2 (124M, block 1024)"
        echo
        echo "| dtype | batch | tokens/s | fwd ms | bwd ms | opt ms | MFU (measured peak) | MFU (data sheet) |"
        echo "|---|---|---|---|---|---|---|---|"
    } >>"$report"
    local dtype batch bench_row
    bench_row='import json, sys
r = json.loads(sys.stdin.read())
def pct(mfu, peak):
    return "n/a" if mfu is None else "%.1f%% of %.0f TFLOP/s" % (100 * mfu, peak / 1e3)
print("| %s | %d | %s | %.1f | %.1f | %.2f | %s | %s |" % (
    r["dtype"], r["batch_size"], format(round(r["tokens_per_s"]), ","), r["fwd_ms"], r["bwd_ms"],
    r["opt_ms"], pct(r["mfu"], r["matmul_peak_gflops"]),
    pct(r["mfu_nominal"], r["nominal_peak_gflops"] or 0)))'
    for dtype in bf16 f32; do
        for batch in 8 16; do
            if bin/gpt-pretrain bench --device cuda --preset gpt2 --block-size 1024 \
                --batch-size "$batch" --dtype "$dtype" --steps 10 --json >"logs/bench-$dtype-$batch.log" 2>&1; then
                tail -1 "logs/bench-$dtype-$batch.log" | python3 -c "$bench_row" >>"$report" || status=1
            else
                status=1
                echo "| $dtype | $batch | failed: $(tail -1 "logs/bench-$dtype-$batch.log") | | | | | |" >>"$report"
            fi
        done
    done
    if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
        {
            echo
            echo "## PyTorch on the same GPU (scripts/torch_gpu_bench.py: same model and batch, fused AdamW)"
            echo
            echo "| dtype | batch | attention | tokens/s | fwd ms | bwd ms | opt ms |"
            echo "|---|---|---|---|---|---|---|"
        } >>"$report"
        for dtype in bf16 f32; do
            for batch in 8 16; do
                python3 scripts/torch_gpu_bench.py --dtype "$dtype" --batch-size "$batch" \
                    >"logs/torch-$dtype-$batch.log" 2>&1 || status=1
                grep '^|' "logs/torch-$dtype-$batch.log" >>"$report" || true
            done
        done
    fi
    nccl_check >>"$report" || status=1
    cat "$report"
    return $status
}

# Data parallel on GPUs through NCCL: 1 rank against the plain CUDA binary (bitwise), and 2 ranks
# against 1 rank with grad_accum 2 where there are 2 GPUs. Prints a report section.
nccl_check() {
    echo
    echo "## Data parallel through NCCL"
    echo
    if [[ ! -x bin/gpt-pretrain-nccl ]]; then
        echo "Skipped: no bin/gpt-pretrain-nccl (build with GPU_CHECK_NCCL=1)."
        return 0
    fi
    if ! command -v mpirun >/dev/null; then
        echo "Skipped: no mpirun on this machine."
        return 0
    fi
    local py=${PYTHON:-python3} libdir
    for libdir in $("$py" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | tr ' ' '\n' | sed 's|$|/nvidia/nccl/lib|'); do
        [[ -e "$libdir/libnccl.so.2" ]] && export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    local cfg=logs/nccl.toml
    printf 'model = "tiny"\ndata = "data/tinyshakespeare.txt"\ntokenizer = "byte"\ndevice = "cuda"\ncache_dir = "logs/cache"\nmax_steps = 30\nlr_decay_steps = 30\neval_interval = 10\nbatch_size = 8\n' >"$cfg"
    rm -rf logs/nccl-*
    local ok=1
    bin/gpt-pretrain train --quiet --config "$cfg" --out logs/nccl-plain >logs/nccl-plain.log 2>&1 || ok=0
    mpirun -np 1 bin/gpt-pretrain-nccl train --quiet --config "$cfg" --out logs/nccl-1rank >logs/nccl-1rank.log 2>&1 || ok=0
    if [[ $ok == 1 ]] && cmp -s logs/nccl-plain/checkpoints/step-00000030/model.safetensors logs/nccl-1rank/checkpoints/step-00000030/model.safetensors &&
        cmp -s logs/nccl-plain/checkpoints/step-00000030/optimizer.safetensors logs/nccl-1rank/checkpoints/step-00000030/optimizer.safetensors; then
        echo "- 1 rank through NCCL against the plain CUDA binary, 30 steps: model and optimizer state bitwise equal."
    else
        echo "- **1 rank through NCCL against the plain CUDA binary: FAILED or different** (logs/nccl-*.log)."
        return 1
    fi
    local gpus
    gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
    if ((gpus < 2)); then
        echo "- 2 ranks: not run ($gpus GPU; NCCL cannot put two ranks on one GPU)."
        return 0
    fi
    mpirun -np 2 bin/gpt-pretrain-nccl train --quiet --config "$cfg" --out logs/nccl-2ranks >logs/nccl-2ranks.log 2>&1 || ok=0
    mpirun -np 1 bin/gpt-pretrain-nccl train --quiet --config "$cfg" --set grad_accum=2 --out logs/nccl-accum2 >logs/nccl-accum2.log 2>&1 || ok=0
    if [[ $ok == 1 ]]; then
        python3 - logs/nccl-2ranks/metrics.jsonl logs/nccl-accum2/metrics.jsonl <<'PY'
import json, sys
a, b = ([json.loads(l) for l in open(p)] for p in sys.argv[1:])
va = [e["loss"] for e in a if e["split"] == "val"]
vb = [e["loss"] for e in b if e["split"] == "val"]
diff = max(abs(x - y) for x, y in zip(va, vb))
print("- 2 ranks against 1 rank with grad_accum 2, 30 steps: largest validation-loss difference %.2e (%s)"
      % (diff, "within 1e-3" if diff < 1e-3 else "**over 1e-3**"))
sys.exit(0 if diff < 1e-3 else 1)
PY
    else
        echo "- **2 ranks: FAILED** (logs/nccl-2ranks.log, logs/nccl-accum2.log)."
        return 1
    fi
}

case "$mode" in
build) build "${2:-dist/gpu-check}" ;;
run) run "${2:-$here}" ;;
all)
    build dist/gpu-check
    run dist/gpu-check
    ;;
*)
    echo "usage: scripts/gpu_check.sh [build [DIR] | run [DIR]]" >&2
    exit 2
    ;;
esac
