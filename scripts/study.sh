#!/usr/bin/env bash
# The ADOPT-vs-Adam study: every optimizer config in configs/study/ at a large and a 5x smaller
# batch, 3 seeds each, as resumable sweeps into runs/study/, then `compare` into
# reports/adopt-vs-adam/pilot/. Re-running skips finished runs and resumes unfinished ones. Seeds go
# round by round (every optimizer's seed 0 first), so a study cut short still compares all four.
# The full study trains on data/gutenberg_en.txt (bash scripts/get_data.sh --gutenberg).
#
#   scripts/study.sh            the study (configs/study/*.toml as they are)
#   scripts/study.sh --quick    a minutes-long version (tiny model, few steps, 2 seeds) into
#                               runs/study-quick/ and runs/study-quick/report/; CI runs it
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${GPT_PRETRAIN_BIN:-target/release/gpt-pretrain}
if [[ ! -x $BIN ]]; then
    cargo build --release
fi

if [[ ${1:-} == "--quick" ]]; then
    OUT=runs/study-quick
    REPORT=$OUT/report
    SEEDS=0,1
    BATCHES=8,2
    TARGET=()
    EXTRA=(--set data=\"data/tinyshakespeare.txt\" --set n_layer=2 --set n_embd=64 --set n_head=2
           --set block_size=32 --set max_steps=20 --set warmup_steps=4 --set eval_interval=5
           --set eval_iters=2 --set eval_batch_size=4)
else
    OUT=runs/study
    REPORT=reports/adopt-vs-adam/pilot
    SEEDS=0,1,2
    BATCHES=10,2
    # Fixed before any ADOPT run finished, from the first Adam run (batch 10 passes it near step
    # 100 of 300), so that both batch sizes can reach it.
    TARGET=(--target-loss 7.0)
    EXTRA=()
    if [[ ! -s data/gutenberg_en.txt ]]; then
        echo "error: data/gutenberg_en.txt is missing; set DATA_MIRROR to a folder holding gutenberg_en.txt and run bash scripts/get_data.sh --gutenberg" >&2
        exit 1
    fi
fi

for seed in ${SEEDS//,/ }; do
    for cfg in configs/study/*.toml; do
        name=$(basename "$cfg" .toml)
        "$BIN" sweep --quiet --config "$cfg" "${EXTRA[@]}" --grid "batch_size=$BATCHES" --seeds "$seed" --out "$OUT/$name"
    done
done
"$BIN" compare "$OUT"/* --out "$REPORT" "${TARGET[@]}"
if [[ $REPORT != "$OUT"/* ]]; then
    # The committed report carries each run's resolved config, header and metrics (no
    # checkpoints), so `gpt-pretrain compare $REPORT/runs/*` redraws it without the runs.
    for run in "$OUT"/*/*/; do
        dest=$REPORT/runs/${run#"$OUT"/}
        mkdir -p "$dest"
        cp "$run"config.toml "$run"run.json "$run"metrics.jsonl "$dest"
    done
fi
for f in report.md val_loss.png train_loss.png lr_grad_norm.png; do
    [[ -s $REPORT/$f ]] || { echo "error: $REPORT/$f was not written" >&2; exit 1; }
done
echo "study report: $REPORT/report.md"
