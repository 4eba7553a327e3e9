#!/usr/bin/env bash
# Puts Tiny Shakespeare and GPT-2's tokenizer.json into data/ (git-ignored).
#
# From the directory named by $DATA_MIRROR when set (a local copy of the data folder), else by
# download from their public homes: the char-rnn repository for Tiny Shakespeare and the
# Hugging Face Hub for the tokenizer. Every file is checked against its known SHA-256.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p data/gpt2

SHAKESPEARE_SHA=86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed
SHAKESPEARE_URL=https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
TOKENIZER_URL=https://huggingface.co/openai-community/gpt2/resolve/main/tokenizer.json

fetch() { # fetch RELATIVE_PATH URL
    local rel=$1 url=$2 dest=data/$1
    if [[ -s $dest ]]; then
        return
    fi
    if [[ -n ${DATA_MIRROR:-} ]]; then
        if [[ ! -f $DATA_MIRROR/$rel ]]; then
            echo "error: $DATA_MIRROR/$rel not found (DATA_MIRROR=$DATA_MIRROR)" >&2
            exit 1
        fi
        cp "$DATA_MIRROR/$rel" "$dest.part"
    else
        echo "downloading $url"
        curl -fsSL --retry 3 -o "$dest.part" "$url"
    fi
    mv "$dest.part" "$dest"
}

fetch tinyshakespeare.txt "$SHAKESPEARE_URL"
fetch gpt2/tokenizer.json "$TOKENIZER_URL"

actual=$(sha256sum data/tinyshakespeare.txt | cut -d' ' -f1)
if [[ $actual != "$SHAKESPEARE_SHA" ]]; then
    echo "error: data/tinyshakespeare.txt has sha256 $actual, expected $SHAKESPEARE_SHA" >&2
    exit 1
fi
# The Hub's tokenizer.json and the data folder's differ in formatting, not in ids; check that it
# parses and has GPT-2's vocabulary size instead of a byte hash.
python3 - <<'PY'
import json
t = json.load(open("data/gpt2/tokenizer.json"))
n = len(t["model"]["vocab"])
assert n == 50257, f"data/gpt2/tokenizer.json has {n} tokens, expected 50257"
PY
echo "data/ ready: tinyshakespeare.txt, gpt2/tokenizer.json"

# The ADOPT-vs-Adam study (scripts/study.sh) trains on the Gutenberg corpus (70 MB, 18.7M GPT-2
# tokens). It has no public single-file home, so it comes only from $DATA_MIRROR, and only with
# --gutenberg (CI and the tests do not need it).
if [[ ${1:-} == "--gutenberg" ]]; then
    GUTENBERG_SHA=b2d5fb6f8685351b8b7f33d1238d04be17b7d3ba211068107dc14225bed0c668
    if [[ ! -s data/gutenberg_en.txt ]]; then
        if [[ -z ${DATA_MIRROR:-} || ! -f $DATA_MIRROR/gutenberg_en.txt ]]; then
            echo "error: data/gutenberg_en.txt is missing; set DATA_MIRROR to a folder holding gutenberg_en.txt" >&2
            exit 1
        fi
        cp "$DATA_MIRROR/gutenberg_en.txt" data/gutenberg_en.txt.part
        mv data/gutenberg_en.txt.part data/gutenberg_en.txt
    fi
    actual=$(sha256sum data/gutenberg_en.txt | cut -d' ' -f1)
    if [[ $actual != "$GUTENBERG_SHA" ]]; then
        echo "error: data/gutenberg_en.txt has sha256 $actual, expected $GUTENBERG_SHA" >&2
        exit 1
    fi
    echo "data/ ready: gutenberg_en.txt"
fi
