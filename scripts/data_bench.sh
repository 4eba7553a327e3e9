#!/usr/bin/env bash
# Training throughput from token shards against the same corpus as a text file (tokenized once
# into the token cache): `prepare` writes the corpus's shards, then pairs of short training runs,
# text then shards, alternate in rounds so both see the same machine noise. Prints each run's
# median tokens/s over its steps after the first 5 (the first steps warm caches and pages up).
#
#   bash scripts/data_bench.sh [--rounds 3] [--steps 40] [--corpus data/gutenberg_en.txt] [--model tiny]
#
# The same model, batch, seed and sampler in both; only `data` (and `val_data`) differ. Record
# `lscpu`'s model name with the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 steps=40 corpus=data/gutenberg_en.txt model=tiny
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        --corpus) corpus="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        *) echo "data_bench.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -s "$corpus" ] || { echo "data_bench.sh: $corpus is missing (scripts/get_data.sh --gutenberg)" >&2; exit 1; }
BIN=${GPT_PRETRAIN_BIN:-target/release/gpt-pretrain}
[ -x "$BIN" ] || cargo build --release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tok=(--tokenizer gpt2 --tokenizer-path data/gpt2/tokenizer.json)
"$BIN" prepare "$corpus" --out "$work/shards" --name corpus "${tok[@]}" --val-tokens 1000000 --quiet
common=(--set model=\"$model\" --set tokenizer=\"gpt2\" --set tokenizer_path=\"data/gpt2/tokenizer.json\"
        --set max_steps="$steps" --set warmup_steps=1 --set eval_interval=1000000 --set log_interval=1
        --set cache_dir=\"$work/cache\" --set seed=1 --quiet)
median_tok_s() {
    python3 - "$1/metrics.jsonl" <<'PY'
import json, statistics, sys
r = [json.loads(l) for l in open(sys.argv[1])]
print(f'{statistics.median(x["tok_per_s"] for x in r if x.get("split") == "train" and x["step"] > 5):.0f}')
PY
}
# Tokenize the text once, outside the rounds.
"$BIN" train "${common[@]}" --set data=\"$corpus\" --set max_steps=1 --out "$work/warm" > /dev/null
for round in $(seq 1 "$rounds"); do
    "$BIN" train "${common[@]}" --set data=\"$corpus\" --out "$work/text-$round"
    "$BIN" train "${common[@]}" --set data=\"$work/shards/corpus_train_*.bin\" \
        --set val_data=\"$work/shards/corpus_val_000000.bin\" --out "$work/shards-$round"
    text=$(median_tok_s "$work/text-$round") shards=$(median_tok_s "$work/shards-$round")
    echo "round $round: text (token cache) $text tokens/s, shards $shards tokens/s, ratio $(python3 -c "print(f'{$shards / $text:.3f}')")"
done
