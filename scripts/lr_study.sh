#!/usr/bin/env bash
# The ADOPT-vs-Adam lr study (design, fixed before its first run, and its β2 addendum:
# reports/adopt-vs-adam/DESIGN.md).
#
# Six arms (configs/lr-study/*.toml: Adam and ADOPT at β2 = 0.95, 0.999 and 0.9999) × two batch
# sizes with the same tokens per run:
#   1. grid:  each arm at each batch size over the lr grid, seed 0; where an arm's best lr (lowest
#             final validation loss) is at an edge of its grid, the grid grows past that edge by
#             factors of 2 (at most MAX_EXTEND times) until the best is inside;
#   2. seeds: seeds 1-4 at each arm's best lr at each batch size (seed 0 is the grid's run).
# Every run is a resumable `sweep` run under runs/lr-study/; re-running the script skips finished
# runs and resumes unfinished ones, so it can be stopped (SIGTERM) and continued at any point. A run
# that diverges (training stops it on a non-finite loss) is recorded in its directory's FAILED file
# and counted, not retried; any other error stops the study unrecorded.
#
# Every run of the study trains with one binary, built from commit $STUDY_COMMIT with
# $STUDY_PATCH applied into runs/bin/gpt-pretrain-study (in a git worktree, on the first run on a
# machine), so that code changes after the design cannot reach its runs; GPT_PRETRAIN_BIN names
# another binary. The patch touches only CPUs where oneDNN has no bf16 matmul (no AVX-512): there
# the bf16 operands are widened to f32 (exact) and multiplied by gemm, where the unpatched binary
# stops at its first matmul; elsewhere the binary runs exactly as built from the commit.
#
#   scripts/lr_study.sh            the study (needs data/gutenberg_en.txt: bash scripts/get_data.sh --gutenberg)
#   scripts/lr_study.sh --quick    a minutes-long version (tiny model, Tiny Shakespeare, bytes, the
#                                  current build) into runs/lr-study-quick/; CI runs it
#   scripts/lr_study.sh --plan     print the runs of phase 1 and stop
#   scripts/lr_study.sh --report   no training: `compare` the finished runs into the report folder
#                                  (reports/adopt-vs-adam/); also after the last run
#
# Each run that finishes is copied (config.toml, run.json, metrics.jsonl, HOSTS) into the report
# folder's runs/ at once. Those copies are the study's record: a run found there is finished and
# is never trained again, so the study continues on a machine that has only the committed
# report, without the run directories and their checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
STUDY_COMMIT=c910f613e7d671c9739f9ee06bbce81a1f08694e
STUDY_PATCH=scripts/lr_study_binary.patch
# The report is drawn by the current build whichever binary trains: the study's own binary
# predates the lr-sensitivity and β2 plots.
COMPARE_BIN=target/release/gpt-pretrain
ARMS=(adam-b095 adopt-b095 adam-b0999 adopt-b0999 adam-b09999 adopt)
MAX_EXTEND=2
quick=0 mode="" report_only=0
for arg in "$@"; do
    case $arg in
        --quick) quick=1 ;;
        --plan) mode=--plan ;;
        --report) report_only=1 ;;
        *) echo "lr_study.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

if ((quick)); then
    OUT=runs/lr-study-quick
    BIN=${GPT_PRETRAIN_BIN:-$COMPARE_BIN}
    [[ -x $BIN ]] || cargo build --release
    SEEDS=(1 2)
    REPORT=$OUT/report
    GRID=(5e-4 1e-3 2e-3)
    # batch:steps:warmup:eval_interval, the same tokens per run at both batch sizes.
    BATCHES=(8:20:2:10 2:80:8:40)
    EXTRA=(--set data=\"data/tinyshakespeare.txt\" --set tokenizer=\"byte\" --set n_layer=2
           --set n_embd=64 --set n_head=2 --set block_size=32 --set eval_iters=2
           --set eval_batch_size=4 --set dtype=\"f32\")
else
    OUT=runs/lr-study
    BIN=${GPT_PRETRAIN_BIN:-runs/bin/gpt-pretrain-study}
    SEEDS=(1 2 3 4)
    REPORT=reports/adopt-vs-adam
    GRID=(3e-4 6e-4 1.2e-3 2.4e-3)
    # 3,840,000 tokens per run: 750 steps of 20 × 256 and 3,750 steps of 4 × 256; warm-up 10% of
    # the run; 10 evaluations.
    BATCHES=(20:750:75:75 4:3750:375:375)
    EXTRA=()
    if [[ ! -s data/gutenberg_en.txt ]] && ((!report_only)); then
        echo "error: data/gutenberg_en.txt is missing; set DATA_MIRROR to a folder holding gutenberg_en.txt and run bash scripts/get_data.sh --gutenberg" >&2
        exit 1
    fi
fi

# The study's binary, built once per machine from STUDY_COMMIT and STUDY_PATCH; the source it was
# built from is recorded beside it, and a binary from other source is rebuilt.
if [[ $BIN == runs/bin/gpt-pretrain-study ]] && ((!report_only)); then
    source_id="$STUDY_COMMIT + $STUDY_PATCH $(sha256sum < "$STUDY_PATCH" | cut -c1-16)"
    if [[ ! -x $BIN ]] || [[ "$(cat "$BIN.source" 2> /dev/null)" != "$source_id" ]]; then
        echo "lr_study: building the study's binary ($source_id) into $BIN" >&2
        tree=runs/bin/src-${STUDY_COMMIT:0:7}
        [[ -d $tree ]] || git worktree add --detach "$tree" "$STUDY_COMMIT" > /dev/null
        git -C "$tree" checkout --quiet -- .
        git -C "$tree" apply "$PWD/$STUDY_PATCH"
        (cd "$tree" && cargo build --release --bin gpt-pretrain)
        mkdir -p "$(dirname "$BIN")"
        cp "$tree/target/release/gpt-pretrain" "$BIN"
        echo "$source_id" > "$BIN.source"
    fi
fi

# One run (resumable): arm, batch spec, lr, seed.
run() {
    local arm=$1 spec=$2 lr=$3 seed=$4
    local batch steps warmup every
    IFS=: read -r batch steps warmup every <<< "$spec"
    local out=$OUT/batch-$batch/$arm
    local dir=$out/lr-${lr}_seed-$seed
    if [[ -e $dir/FAILED ]] || [[ -e $(archive_of "$dir")/FAILED ]] || archived "$dir"; then
        return
    fi
    if [[ $mode == "--plan" ]]; then
        echo "$dir"
        return
    fi
    local status=0 errors
    errors=$(mktemp)
    "$BIN" sweep --quiet --config "configs/lr-study/$arm.toml" "${EXTRA[@]}" \
        --set batch_size="$batch" --set max_steps="$steps" --set warmup_steps="$warmup" \
        --set eval_interval="$every" --grid lr="$lr" --seeds "$seed" --out "$out" 2> "$errors" || status=$?
    cat "$errors" >&2
    # Machines differ, and bf16 kernels between CPUs (AMX, AVX512-BF16, f32 gemm on widened
    # operands without AVX-512): each host a run trained on is recorded beside it (after `sweep`,
    # which restarts a run directory that has no checkpoint from nothing).
    if [[ -d $dir ]]; then
        local host
        # The model name alone is "AMD EPYC" on Zen 3, 4 and 5 alike: family and model tell them apart.
        host="$(lscpu | sed -n 's/^Model name: *//p' | head -n 1) (family $(lscpu | sed -n 's/^CPU family: *//p' | head -n 1) model $(lscpu | sed -n 's/^Model: *//p' | head -n 1)$(grep -qw avx512bw /proc/cpuinfo || echo ', no AVX-512: bf16 operands widened to f32')), $(date -u +%F)"
        grep -qxF "$host" "$dir/HOSTS" 2> /dev/null || echo "$host" >> "$dir/HOSTS"
    fi
    # A run diverged when training stopped it on a non-finite loss ("loss became …"); any other
    # error (a missing library, a bad config, a full disk) is the machine's, not the run's, and
    # stops the study without recording the run. SIGTERM (143) and SIGINT (130) stop it too.
    local diverged=0
    grep -q "loss became" "$errors" && diverged=1
    rm -f "$errors"
    if ((status == 0)); then
        archive_if_finished "$dir"
    else
        if ((status == 143 || status == 130)); then
            exit "$status"
        fi
        if ((!diverged)); then
            echo "lr_study: $dir stopped with an error (exit $status) that is not a divergence; fix it and run the study again" >&2
            exit "$status"
        fi
        mkdir -p "$dir"
        echo "exit status $status at $(date -u +%FT%TZ)" > "$dir/FAILED"
        echo "lr_study: $dir failed (exit $status); recorded in $dir/FAILED" >&2
        archive_run "$dir"
    fi
}

# A run's copy in the report folder: config.toml, run.json, metrics.jsonl and HOSTS of a run
# that finished. The copies outlive the run directories (checkpoints are not kept across
# machines), so a run archived there is finished and is never trained again.
archive_of() { echo "$REPORT/runs/${1#"$OUT"/}"; }
archived() { [[ -s $(archive_of "$1")/metrics.jsonl ]]; }

# The final validation loss of a run (inf when it failed or has none).
final_val() {
    local dir=$1
    if [[ -e $(archive_of "$dir")/FAILED ]] || archived "$dir"; then
        dir=$(archive_of "$dir")
    fi
    python3 - "$dir" <<'EOF'
import json, math, os, sys
d = sys.argv[1]
loss = math.inf
if not os.path.exists(os.path.join(d, "FAILED")) and os.path.exists(os.path.join(d, "metrics.jsonl")):
    for line in open(os.path.join(d, "metrics.jsonl")):
        r = json.loads(line)
        if r.get("split") == "val" and r.get("loss") is not None:
            loss = r["loss"] if math.isfinite(r["loss"]) else math.inf
print(loss)
EOF
}

# The grid of one arm at one batch size, grown past an edge that holds the best lr. Prints the
# best lr.
grid_and_best() {
    local arm=$1 spec=$2 batch=${2%%:*}
    local lrs=("${GRID[@]}") extended=0
    while :; do
        for lr in "${lrs[@]}"; do
            run "$arm" "$spec" "$lr" 0 >&2
        done
        [[ $mode == "--plan" ]] && return
        local best="" best_loss=inf
        for lr in "${lrs[@]}"; do
            local loss
            loss=$(final_val "$OUT/batch-$batch/$arm/lr-${lr}_seed-0")
            if python3 -c "import sys; sys.exit(0 if float('$loss') < float('$best_loss') else 1)"; then
                best=$lr best_loss=$loss
            fi
        done
        local sorted
        sorted=($(printf '%s\n' "${lrs[@]}" | sort -g))
        local edge=""
        if [[ $best == "${sorted[-1]}" ]]; then
            edge=$(python3 -c "print('%g' % (2 * float('$best')))")
        elif [[ $best == "${sorted[0]}" ]]; then
            edge=$(python3 -c "print('%g' % (float('$best') / 2))")
        fi
        if [[ -z $edge || $extended -ge $MAX_EXTEND || -z $best ]]; then
            echo "$best"
            return
        fi
        echo "lr_study: batch $batch $arm: best lr $best is at the grid's edge; adding $edge" >&2
        lrs+=("$edge")
        extended=$((extended + 1))
    done
}

# Copies a run's record (whichever of config.toml, run.json, metrics.jsonl, HOSTS and FAILED it
# has) into the report folder.
archive_run() {
    local dir=$1 dest f
    dest=$(archive_of "$dir")
    mkdir -p "$dest"
    for f in config.toml run.json metrics.jsonl HOSTS FAILED; do
        [[ ! -e $dir/$f ]] || cp "$dir/$f" "$dest"
    done
}

# Archives a run that has reached max_steps (its final checkpoint exists).
archive_if_finished() {
    local dir=$1 steps
    steps=$(sed -n 's/^max_steps = //p' "$dir/config.toml")
    [[ -d $dir/checkpoints/step-$(printf '%08d' "$steps") ]] || return 0
    archive_run "$dir"
}

# Every finished run (archived ones, and any not yet archived) compared into $REPORT.
report() {
    for metrics in "$OUT"/batch-*/*/*/metrics.jsonl; do
        if [[ -e $metrics ]]; then
            archive_if_finished "${metrics%/metrics.jsonl}"
        fi
    done
    local finished=()
    for metrics in "$REPORT"/runs/batch-*/*/*/metrics.jsonl; do
        local dir=${metrics%/metrics.jsonl}
        if [[ -e $dir/FAILED ]]; then
            echo "lr_study: $dir failed ($(cat "$dir/FAILED")); not compared" >&2
        elif [[ -e $metrics ]]; then
            finished+=("$dir")
        fi
    done
    if ((${#finished[@]} == 0)); then
        echo "lr_study: no finished runs in $OUT yet" >&2
        return
    fi
    [[ -x $COMPARE_BIN ]] || cargo build --release
    # Files older than this stamp were not rewritten by this compare (an older binary's compare,
    # the study's own, draws no lr_sensitivity.png and would leave a stale one in place).
    local stamp
    stamp=$(mktemp)
    "$COMPARE_BIN" compare "${finished[@]}" --out "$REPORT" --tests reports/adopt-vs-adam/tests.toml > /dev/null
    for f in report.md val_loss.png lr_sensitivity.png beta2.png; do
        if [[ ! -s $REPORT/$f ]] || [[ $stamp -nt $REPORT/$f ]]; then
            rm -f "$stamp"
            echo "error: $REPORT/$f was not written by $COMPARE_BIN compare" >&2
            exit 1
        fi
    done
    rm -f "$stamp"
    echo "lr_study: ${#finished[@]} finished runs compared into $REPORT" >&2
}
if ((report_only)); then
    report
    exit 0
fi

# Phase 1 for every arm and batch size, then phase 2; arms interleaved so that a study cut short
# has every arm at the same stage.
declare -A BEST
for spec in "${BATCHES[@]}"; do
    for arm in "${ARMS[@]}"; do
        BEST[$spec/$arm]=$(grid_and_best "$arm" "$spec")
    done
done
[[ $mode == "--plan" ]] && exit 0
for seed in "${SEEDS[@]}"; do
    for spec in "${BATCHES[@]}"; do
        for arm in "${ARMS[@]}"; do
            best=${BEST[$spec/$arm]}
            if [[ -n $best ]]; then
                run "$arm" "$spec" "$best" "$seed"
            fi
        done
    done
done
report
echo "lr_study: every run of $OUT is finished; best lr per batch size and arm:"
for spec in "${BATCHES[@]}"; do
    for arm in "${ARMS[@]}"; do
        echo "  batch ${spec%%:*} $arm: ${BEST[$spec/$arm]}"
    done
done
