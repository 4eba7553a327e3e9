#!/usr/bin/env python3
"""Writes tests/fixtures/hf/: a tiny randomly initialised transformers.GPT2LMHeadModel saved with
save_pretrained (safetensors) in tiny-gpt2/, and tiny-gpt2-logits.json with its logits on a fixed
input, for gpt-pretrain's loader and exporter tests.

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch transformers
    /tmp/torchenv/bin/python scripts/hf_fixtures.py
"""
import json
import os

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf")


def main():
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).eval()
    # Random biases and LayerNorm parameters too, so a loader that drops one is caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model_dir = os.path.join(OUT, "tiny-gpt2")
    model.save_pretrained(model_dir, safe_serialization=True)
    input_ids = [[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100], [84, 111, 32, 98, 101, 32, 111, 114, 32, 110, 111, 116]]
    with torch.no_grad():
        logits = model(torch.tensor(input_ids)).logits
    with open(os.path.join(OUT, "tiny-gpt2-logits.json"), "w") as f:
        json.dump(
            {
                "input_ids": input_ids,
                "logits": logits.tolist(),
                "source": f"transformers {transformers.__version__}, torch {torch.__version__}, GPT2LMHeadModel, seed 0",
            },
            f,
        )
        f.write("\n")
    print(f"wrote {model_dir} and tiny-gpt2-logits.json")


if __name__ == "__main__":
    main()
