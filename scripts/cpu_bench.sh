#!/usr/bin/env bash
# Side-by-side CPU throughput: gpt-pretrain's `bench` against PyTorch's reference GPT
# (torch_gpt_bench.py, named by TORCH_BENCH) on the same shapes, interleaved in rounds so both see the
# same machine noise. Optional extra binaries (an older build, say) run in the same rounds.
#
#   bash scripts/cpu_bench.sh [--rounds N] [--presets "tiny baby"] [--threads "1 2"]
#                             [--torch "eager compile bf16"] [--dtypes "f32 bf16"] [BINARY ...]
#
# --dtypes: our precisions to run in every round (default f32); bf16 rows are named BINARY@bf16.
# --torch: the PyTorch variants to run in every round: `eager`, `compile` (torch.compile) and
# `bf16` (torch.autocast("cpu", bfloat16) around the forward, PyTorch's CPU mixed precision).
#
# TORCH_PYTHON: a python with torch (default python3; PyTorch is skipped when it has none).
# TORCH_BENCH: the reference script torch_gpt_bench.py (default: bench/torch_gpt_bench.py beside
# DATA_MIRROR's folder, where the data mirror keeps it).
# Prints one line per measurement, then a markdown table of medians over the rounds, with
# each binary's ratio to PyTorch in the same rounds, both MFUs (against the matmul peak our bench
# measures) and peak resident memory (PyTorch's includes the interpreter and torch itself).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
presets="tiny baby"
threads_list="1 2"
torch_variants="eager compile bf16"
dtypes="f32"
binaries=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --presets) presets="$2"; shift 2 ;;
        --threads) threads_list="$2"; shift 2 ;;
        --torch) torch_variants="$2"; shift 2 ;;
        --dtypes) dtypes="$2"; shift 2 ;;
        -*) echo "cpu_bench.sh: unknown option $1" >&2; exit 2 ;;
        *) binaries+=("$1"); shift ;;
    esac
done
[ ${#binaries[@]} -gt 0 ] || binaries=(target/release/gpt-pretrain)
for b in "${binaries[@]}"; do
    [ -x "$b" ] || { echo "cpu_bench.sh: $b is not an executable (cargo build --release first)" >&2; exit 1; }
done
torch_python="${TORCH_PYTHON:-python3}"
torch_bench="${TORCH_BENCH:-${DATA_MIRROR:-data}/../bench/torch_gpt_bench.py}"
have_torch=0
if [ -f "$torch_bench" ] && "$torch_python" -c "import torch" 2>/dev/null; then
    have_torch=1
else
    echo "cpu_bench.sh: no PyTorch ($torch_python) or no $torch_bench: gpt-pretrain only" >&2
fi

# One measurement as a line: tokens/s, the step's parts, MFU (ours only), peak memory.
describe() {
    python3 -c '
import json, sys
r = json.loads(sys.argv[1])
mfu = ", MFU %.0f%%" % (100 * r["mfu"]) if "mfu" in r else ""
print("%.0f tok/s, fwd %.1f ms, bwd %.1f ms, opt %.2f ms%s, %.0f MB"
      % (r["tokens_per_s"], r["fwd_ms"], r["bwd_ms"], r["opt_ms"], mfu, r["peak_rss_mb"]))' "$1"
}

results=$(mktemp)
trap 'rm -f "$results"' EXIT
for round in $(seq 1 "$rounds"); do
    for preset in $presets; do
        for threads in $threads_list; do
            for b in "${binaries[@]}"; do
                for dtype in $dtypes; do
                    who=$b
                    [ "$dtype" = f32 ] || who="$b@$dtype"
                    if ! line=$("$b" bench --preset "$preset" --threads "$threads" --dtype "$dtype" --json 2>/dev/null | tail -n 1); then
                        echo "round $round $preset ${threads}t $who: bench failed (an older binary without this preset or dtype?)"
                        continue
                    fi
                    echo "$round $preset $threads $who $line" >> "$results"
                    echo "round $round $preset ${threads}t $who: $(describe "$line")"
                done
            done
            if [ "$have_torch" = 1 ]; then
                case "$preset" in baby) steps=12 ;; tiny) steps=30 ;; *) steps=10 ;; esac
                for variant in $torch_variants; do
                    case "$variant" in
                        eager) flags=() ;;
                        compile) flags=(--compile) ;;
                        bf16) flags=(--bf16) ;;
                        *) echo "cpu_bench.sh: unknown PyTorch variant $variant" >&2; exit 2 ;;
                    esac
                    # Peak RSS of the PyTorch process from /proc at exit (python3 reports it itself).
                    line=$("$torch_python" -c '
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
' "$torch_bench" --config "$preset" --threads "$threads" --steps "$steps" "${flags[@]}" 2>/dev/null \
                        | python3 -c '
import json, sys
r, rss = None, None
for l in sys.stdin:
    if l.startswith("RESULT "): r = json.loads(l[7:])
    if l.startswith("RSS_MB "): rss = float(l.split()[1])
print(json.dumps({"tokens_per_s": r["tok_per_s_median"], "fwd_ms": 1e3 * r["fwd_s"]["median"],
                  "bwd_ms": 1e3 * r["bwd_s"]["median"], "opt_ms": 1e3 * r["opt_s"]["median"],
                  "peak_rss_mb": rss, "torch": r["torch"]}))') || {
                        echo "round $round $preset ${threads}t pytorch-$variant: failed"
                        continue
                    }
                    echo "$round $preset $threads pytorch-$variant $line" >> "$results"
                    echo "round $round $preset ${threads}t pytorch-$variant: $(describe "$line")"
                done
            fi
        done
    done
done

python3 - "$results" <<'EOF'
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(dict)  # (preset, threads, who) -> {round: result}
for line in open(sys.argv[1]):
    rnd, preset, threads, who, js = line.split(" ", 4)
    runs[(preset, int(threads), who)][int(rnd)] = json.loads(js)
order = list(dict.fromkeys(p for p, _, _ in runs))  # presets in the order they ran
keys = sorted({(p, t) for p, t, _ in runs}, key=lambda k: (order.index(k[0]), k[1]))
whos = [w for w in dict.fromkeys(w for *_, w in runs) if not w.startswith("pytorch-")]
med = statistics.median
print()
print("PyTorch f32 = the better of eager and torch.compile in each round; MFU is against the matmul")
print("peak our bench measured in the same round; ratios are ours / PyTorch, one per round.")
print()
print("| preset | threads | binary | tokens/s | fwd ms | bwd ms | opt ms | MFU | peak RSS "
      "| PyTorch eager | torch.compile | PyTorch bf16 | PyTorch f32 MFU | ratio to PyTorch f32 | ratio to PyTorch bf16 |")
print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
for preset, threads in keys:
    torch = {v: runs.get((preset, threads, f"pytorch-{v}"), {}) for v in ("eager", "compile", "bf16")}
    for who in whos:
        ours = runs.get((preset, threads, who))
        if not ours:
            continue
        f = lambda k: med([r[k] for r in ours.values()])
        tok = lambda v: f"{med([r['tokens_per_s'] for r in torch[v].values()]):,.0f}" if torch[v] else "-"
        best_f32 = {r: max(torch[v][r]["tokens_per_s"] for v in ("eager", "compile") if r in torch[v])
                    for r in ours if r in torch["eager"] or r in torch["compile"]}
        bf16 = {r: torch["bf16"][r]["tokens_per_s"] for r in ours if r in torch["bf16"]}
        ratios = lambda ref: " / ".join(f"{ours[r]['tokens_per_s'] / ref[r]:.2f}x" for r in sorted(ref)) or "-"
        # PyTorch's MFU on the same footing: its tokens/s times the model's FLOPs per token
        # (ours, same shapes), against the matmul peak our bench measured in the same round.
        t_mfu = [best_f32[r] * ours[r]["gflops"] / ours[r]["tokens_per_s"] / ours[r]["matmul_peak_gflops"]
                 for r in sorted(best_f32)]
        t_mfu = f"{100 * med(t_mfu):.0f}%" if t_mfu else "-"
        print(f"| {preset} | {threads} | {who} | {f('tokens_per_s'):,.0f} | {f('fwd_ms'):.1f} | {f('bwd_ms'):.1f} | "
              f"{f('opt_ms'):.2f} | {100 * f('mfu'):.0f}% | {f('peak_rss_mb'):,.0f} MB | {tok('eager')} | "
              f"{tok('compile')} | {tok('bf16')} | {t_mfu} | {ratios(best_f32)} | {ratios(bf16)} |")
EOF
