#!/usr/bin/env python3
"""Writes tests/fixtures/optim/*.json: reference trajectories of torch.optim.Adam, torch.optim.AdamW
and the ADOPT authors' adopt.ADOPT (PyPI torch-adopt 0.1.0), in float64.

Each fixture is the input layout of `gpt-pretrain optim replay` plus the parameters PyTorch produced:
  {"optimizer", "hyperparameters": {"lr", "betas", "eps", "weight_decay", "decouple", "clip_exponent"},
   "dtype": "f64", "params": {name: nested list}, "grads": [{name: nested list}, ...],
   "expected": {"steps": [{name: nested list}, ...]}, "source": "..."}

The gradient of each step is taken by autograd from a quadratic loss (so it depends on the current
parameters) plus seeded noise, with a 50x spike at step 6 that makes ADOPT's clipping act.

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy torch-adopt==0.1.0
    /tmp/torchenv/bin/python scripts/optim_fixtures.py
"""
import json
import os
import sys

import torch
from adopt import ADOPT

STEPS = 12
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "optim")

CASES = [
    ("adam-defaults", "adam", {}),
    ("adam-l2", "adam", {"lr": 1e-2, "weight_decay": 0.1}),
    ("adamw-defaults", "adamw", {}),
    ("adamw-decay", "adamw", {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}),
    ("adopt-defaults", "adopt", {}),
    ("adopt-coupled-decay", "adopt", {"lr": 1e-2, "weight_decay": 0.1}),
    ("adopt-decoupled", "adopt", {"weight_decay": 0.1, "decouple": True}),
    ("adopt-no-clip", "adopt", {"clip_lambda": None, "betas": (0.8, 0.99)}),
]


def build(kind, params, kw):
    if kind == "adam":
        return torch.optim.Adam(params, **kw)
    if kind == "adamw":
        return torch.optim.AdamW(params, **kw)
    return ADOPT(params, **kw)


def hyperparameters(opt, kind, kw):
    g = opt.param_groups[0]
    h = {"lr": g["lr"], "betas": list(g["betas"]), "eps": g["eps"], "weight_decay": g["weight_decay"]}
    if kind == "adopt":
        h["decouple"] = g["decouple"]
        h["clip_exponent"] = None if "clip_lambda" in kw and kw["clip_lambda"] is None else 0.25
    return h


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, kind, kw in CASES:
        gen = torch.Generator().manual_seed(1234)
        params = {
            "b": torch.empty(4, dtype=torch.float64).uniform_(-1, 1, generator=gen),
            "w": torch.empty(3, 4, dtype=torch.float64).uniform_(-1, 1, generator=gen),
        }
        initial = {k: v.tolist() for k, v in params.items()}
        targets = {k: torch.sin(torch.arange(v.numel(), dtype=torch.float64) * 0.7).reshape(v.shape) for k, v in params.items()}
        curvature = {k: (0.5 + 0.25 * torch.arange(v.numel(), dtype=torch.float64)).reshape(v.shape) for k, v in params.items()}
        tensors = [p.requires_grad_() for p in params.values()]
        opt = build(kind, tensors, kw)
        grads, steps = [], []
        for t in range(1, STEPS + 1):
            opt.zero_grad()
            loss = sum((0.5 * curvature[k] * (p - targets[k]) ** 2).sum() for k, p in params.items())
            loss.backward()
            with torch.no_grad():
                for k, p in params.items():
                    p.grad.add_(torch.empty_like(p).uniform_(-0.3, 0.3, generator=gen))
                    if t == 6:
                        p.grad.view(-1)[::3] *= 50.0
            grads.append({k: p.grad.tolist() for k, p in params.items()})
            opt.step()
            steps.append({k: p.detach().tolist() for k, p in params.items()})
        fixture = {
            "optimizer": kind,
            "hyperparameters": hyperparameters(opt, kind, kw),
            "dtype": "f64",
            "params": initial,
            "grads": grads,
            "expected": {"steps": steps},
            "source": f"torch {torch.__version__}"
            + (f", torch-adopt 0.1.0 (adopt.ADOPT)" if kind == "adopt" else f", torch.optim.{'Adam' if kind == 'adam' else 'AdamW'}"),
        }
        path = os.path.join(OUT, f"{name}.json")
        with open(path, "w") as f:
            json.dump(fixture, f, indent=1)
            f.write("\n")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
