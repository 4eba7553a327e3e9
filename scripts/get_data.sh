#!/usr/bin/env bash
# Puts Tiny Shakespeare and GPT-2's tokenizer.json into data/ (git-ignored).
#
# From the directory named by $DATA_MIRROR when set (a copy of ../shared/data, say), else by
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
# The Hub's tokenizer.json and ../shared/data's differ in formatting, not in ids; check that it
# parses and has GPT-2's vocabulary size instead of a byte hash.
python3 - <<'PY'
import json
t = json.load(open("data/gpt2/tokenizer.json"))
n = len(t["model"]["vocab"])
assert n == 50257, f"data/gpt2/tokenizer.json has {n} tokens, expected 50257"
PY
echo "data/ ready: tinyshakespeare.txt, gpt2/tokenizer.json"
