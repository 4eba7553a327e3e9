#!/usr/bin/env python3
"""PyTorch reference for `gpt-pretrain bench --device cuda --preset gpt2`: nanoGPT's GPT-2 124M
(vocab 50304, block 1024, tied lm_head) on random tokens, eager mode, fused AdamW, f32 or bf16
autocast, timed as our bench times it (forward to the loss, backward, optimizer step; medians of
10 steps after 3 warm-ups). Two attention implementations: `manual` (the softmax(QKᵀ)V that
gpt-pretrain computes, T×T matrices in memory) and `sdpa` (PyTorch's flash attention).

Prints one markdown table row per attention kind (scripts/gpu_check.sh collects them) and a JSON
line per row.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, n_head, manual):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.c_attn, self.attn_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.c_fc, self.mlp_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.n_head, self.manual = n_head, manual

    def attn(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.manual:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf")).float().softmax(dim=-1).to(v.dtype)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, block, n_layer, n_head, c, manual):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, c), nn.Embedding(block, c)
        self.h = nn.ModuleList(Block(c, n_head, manual) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(c)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="bf16")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--attn", choices=["manual", "sdpa", "both"], default="both")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # f32 means f32, as in candle
    dev = "cuda"
    b, t, vocab = a.batch_size, a.block_size, 50304
    for attn in ["manual", "sdpa"] if a.attn == "both" else [a.attn]:
        torch.manual_seed(0)
        model = GPT(vocab, 1024, 12, 12, 768, attn == "manual").to(dev)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-4, betas=(0.9, 0.95), fused=True,
        )
        ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.dtype == "bf16")
        fwd, bwd, upd = [], [], []
        for i in range(a.steps + 3):
            ids = torch.randint(0, vocab, (b, t + 1), device=dev)
            x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with ctx:
                loss = model(x, y)
            loss.item()
            t1 = time.perf_counter()
            loss.backward()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            if i >= 3:
                fwd.append(t1 - t0), bwd.append(t2 - t1), upd.append(t3 - t2)
        step = statistics.median([f + g + h for f, g, h in zip(fwd, bwd, upd)])
        r = dict(dtype=a.dtype, batch_size=b, attn=attn, tokens_per_s=b * t / step,
                 fwd_ms=1e3 * statistics.median(fwd), bwd_ms=1e3 * statistics.median(bwd),
                 opt_ms=1e3 * statistics.median(upd), torch=torch.__version__,
                 peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9)
        print(f"| {a.dtype} | {b} | {attn} | {r['tokens_per_s']:,.0f} | {r['fwd_ms']:.1f} | "
              f"{r['bwd_ms']:.1f} | {r['opt_ms']:.2f} |")
        print(json.dumps(r))
        del model, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
