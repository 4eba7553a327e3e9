#!/usr/bin/env python3
"""Times one optimizer step of PyTorch's Adam / AdamW (each implementation: single tensor
"forloop", "foreach", "fused") and torch-adopt's ADOPT over the same parameter shapes as
`cargo bench --bench optim` (the baby and gpt2 models), in fp32 on CPU, median of N steps; and
torch.optim.Muon (PyTorch 2.9+, its Newton-Schulz iteration in bf16) over the blocks' matrices,
as the benchmark's Muon cases.

    /tmp/torchenv/bin/python scripts/torch_optim_bench.py --threads 2
"""
import argparse
import statistics
import time

import torch


def shapes(n_layer, n_embd, block, vocab):
    c = n_embd
    out = [(vocab, c), (block, c), (c,), (c,)]
    for _ in range(n_layer):
        out += [(c,), (c,), (3 * c, c), (3 * c,), (c, c), (c,), (c,), (c,), (4 * c, c), (4 * c,), (c, 4 * c), (c,)]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--presets", default="baby,gpt2", help="comma-separated: baby, gpt2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        from adopt import ADOPT
    except ImportError:
        ADOPT = None
    for name, (n_layer, n_embd, block, vocab) in [("baby", (6, 384, 256, 128)), ("gpt2", (12, 768, 1024, 50304))]:
        if name not in args.presets.split(","):
            continue
        params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes(n_layer, n_embd, block, vocab)]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        n = sum(p.numel() for p in params)
        print(f"{name}: {n / 1e6:.1f}M parameters, {args.threads} threads")
        variants = []
        for impl in ["forloop", "foreach", "fused"]:
            kw = {"foreach": impl == "foreach", "fused": impl == "fused"}
            variants.append((f"Adam {impl}", lambda kw=kw: torch.optim.Adam(params, **kw)))
            variants.append((f"AdamW {impl}", lambda kw=kw: torch.optim.AdamW(params, weight_decay=0.1, **kw)))
        if ADOPT is not None:
            for impl in ["forloop", "foreach"]:
                variants.append((f"ADOPT {impl}", lambda impl=impl: ADOPT(params, weight_decay=0.1, decouple=True, foreach=impl == "foreach")))
        if hasattr(torch.optim, "Muon"):
            # The blocks' attention and MLP matrices: the 2-D shapes after the two embeddings.
            matrices = [p for p, s in zip(params, shapes(n_layer, n_embd, block, vocab)) if len(s) == 2][2:]
            count = sum(p.numel() for p in matrices)
            print(f"  Muon over {len(matrices)} block matrices ({count / 1e6:.1f}M parameters)")
            variants.append(("Muon bf16", lambda m=matrices: torch.optim.Muon(m, lr=1e-4)))
        for label, make in variants:
            opt = make()
            opt.step()
            opt.step()
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t)
            print(f"  {label:<16} {statistics.median(times) * 1e3:8.2f} ms")
            del opt


if __name__ == "__main__":
    main()
