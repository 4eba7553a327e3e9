#!/usr/bin/env bash
# Data parallel on one machine: 2 MPI ranks × 1 thread against 1 process × 2 threads, training the
# same global batch, interleaved in rounds so every variant sees the same machine noise.
#
#   bash scripts/dp_bench.sh [--rounds N] [--steps N] [--presets "baby tiny50k"] [BINARY]
#
# Variants per preset (batch B, block T as `bench`'s presets: baby 8 × 256 with byte tokens,
# tiny50k 16 × 128 with GPT-2's 50,257 tokens):
#   ranks2x1    mpirun -np 2, RAYON_NUM_THREADS=1, batch B, grad_accum 1
#   proc1x2acc  1 process, RAYON_NUM_THREADS=2, batch B, grad_accum 2 (bitwise the same run)
#   proc1x2     1 process, RAYON_NUM_THREADS=2, batch 2B, grad_accum 1 (the same tokens per step
#               in one micro-batch: what one would run without ranks)
# Reports the median tokens/s over steps 6..N of each run, and for the ranks the median time of
# the loss and gradient exchange per step (`reduce_ms` in metrics.jsonl; waiting for the slower
# rank included) and its share of the step. BINARY must be built with --features mpi.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
steps=30
presets="baby tiny50k"
binary=target/release/gpt-pretrain
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        --presets) presets="$2"; shift 2 ;;
        -*) echo "dp_bench.sh: unknown option $1" >&2; exit 2 ;;
        *) binary="$1"; shift ;;
    esac
done
[ -x "$binary" ] || { echo "dp_bench.sh: $binary is not an executable" >&2; exit 1; }
command -v mpirun > /dev/null || { echo "dp_bench.sh: no mpirun (bash scripts/setup.sh --mpi)" >&2; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
data_dir="${DATA_MIRROR:-data}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# preset → config keys
keys() {
    case "$1" in
        baby) echo "model = \"baby\"
tokenizer = \"byte\"
batch_size = 8" ;;
        tiny50k) echo "model = \"tiny\"
tokenizer = \"gpt2\"
tokenizer_path = \"$data_dir/gpt2/tokenizer.json\"
block_size = 128
batch_size = 16" ;;
        *) echo "dp_bench.sh: preset must be baby or tiny50k, got $1" >&2; exit 2 ;;
    esac
}

# Median tok/s and reduce_ms (if logged) of a run's steps after the fifth.
summarize() {
    python3 -c '
import json, statistics, sys
ev = [json.loads(l) for l in open(sys.argv[1])]
tr = [e for e in ev if e.get("split") == "train" and e["step"] > 5]
tok = statistics.median(e["tok_per_s"] for e in tr)
ms = statistics.median(e["ms"] for e in tr)
red = [e["reduce_ms"] for e in tr if "reduce_ms" in e]
out = {"tok_per_s": tok, "step_ms": ms}
if red:
    out["reduce_ms"] = statistics.median(red)
print(json.dumps(out))' "$1"
}

echo "host: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(mpirun --version | head -1)"
results="$work/results.jsonl"
for round in $(seq 1 "$rounds"); do
    for preset in $presets; do
        cfg="$work/$preset.toml"
        {
            keys "$preset"
            echo "data = \"$data_dir/tinyshakespeare.txt\""
            echo "cache_dir = \"$work/cache\""
            echo "max_steps = $steps"
            echo "lr_decay_steps = $steps"
            echo "warmup_steps = 5"
            echo "eval_interval = $((steps * 10))"
            echo "eval_iters = 1"
            echo "keep_last = 1"
        } > "$cfg"
        batch=$(sed -n 's/^batch_size = //p' "$cfg")
        for variant in ranks2x1 proc1x2acc proc1x2; do
            out="$work/$preset-$variant-$round"
            case "$variant" in
                ranks2x1) mpirun --oversubscribe --bind-to none -np 2 -x RAYON_NUM_THREADS=1 \
                    "$binary" train --quiet --config "$cfg" --out "$out" ;;
                proc1x2acc) RAYON_NUM_THREADS=2 "$binary" train --quiet --config "$cfg" --out "$out" \
                    --set grad_accum=2 ;;
                proc1x2) RAYON_NUM_THREADS=2 "$binary" train --quiet --config "$cfg" --out "$out" \
                    --set batch_size=$((batch * 2)) ;;
            esac
            line=$(summarize "$out/metrics.jsonl")
            echo "round $round $preset $variant: $line"
            echo "{\"preset\": \"$preset\", \"variant\": \"$variant\", \"m\": $line}" >> "$results"
            rm -rf "$out"
        done
    done
done
python3 - "$results" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("\n| preset | variant | tok/s (median of rounds) | range | ratio to proc1x2acc | reduce ms | share of step |")
print("|---|---|---:|---:|---:|---:|---:|")
for preset in dict.fromkeys(r["preset"] for r in rows):
    base = [r["m"]["tok_per_s"] for r in rows if r["preset"] == preset and r["variant"] == "proc1x2acc"]
    for variant in ["ranks2x1", "proc1x2acc", "proc1x2"]:
        ms = [r["m"] for r in rows if r["preset"] == preset and r["variant"] == variant]
        tok = [m["tok_per_s"] for m in ms]
        ratios = [t / b for t, b in zip(tok, base)]
        red = [m["reduce_ms"] for m in ms if "reduce_ms" in m]
        share = [m["reduce_ms"] / m["step_ms"] for m in ms if "reduce_ms" in m]
        print("| %s | %s | %.0f | %.0f-%.0f | %.2f-%.2fx | %s | %s |" % (
            preset, variant, statistics.median(tok), min(tok), max(tok), min(ratios), max(ratios),
            "%.1f" % statistics.median(red) if red else "",
            "%.0f%%" % (100 * statistics.median(share)) if share else ""))
EOF
