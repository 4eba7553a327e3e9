#!/usr/bin/env python3
"""Writes tests/fixtures/optim/muon-*.json: reference trajectories of torch.optim.Muon (PyTorch
2.9 or later) on 2-D parameters, in the input layout of `gpt-pretrain optim replay`.

    {"optimizer": "muon",
     "hyperparameters": {"lr", "momentum", "nesterov", "weight_decay", "ns_steps",
                         "ns_coefficients", "eps", "adjust_lr", "newton_schulz_dtype"},
     "dtype": "f64", "params": {name: nested list}, "grads": [{name: nested list}, ...],
     "expected": {"steps": [{name: nested list}, ...]}, "source": "..."}

torch.optim.Muon runs its Newton-Schulz iteration in bfloat16. For the "f64" fixtures this script
replaces torch.optim._muon._zeropower_via_newtonschulz by the same function with float64 in place
of bfloat16 (the copy below is torch's, line for line, with the dtype a parameter), so the
fixture pins every other part of torch's step (momentum lerps, Nesterov, weight decay, lr
adjustment, transposes) to f64 rounding. The "bf16" fixtures use torch's function unchanged.

Gradients are taken by autograd from a quadratic loss plus seeded noise, so they depend on the
parameters; one matrix is tall (rows > columns: the iteration runs on its transpose), one wide.

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy
    /tmp/torchenv/bin/python scripts/muon_fixtures.py
"""
import json
import os

import torch
import torch.optim._muon as muon_module

STEPS = 12
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "optim")
TORCH_NEWTON_SCHULZ = muon_module._zeropower_via_newtonschulz

CASES = [
    ("muon-f64-defaults", "f64", {}),
    ("muon-f64-plain-momentum", "f64",
     {"lr": 2e-2, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
      "adjust_lr_fn": "spectral_unclamped"}),
    ("muon-f64-match-rms", "f64",
     {"lr": 5e-3, "weight_decay": 0.05, "ns_steps": 3, "ns_coefficients": (3.0, -3.2, 1.2),
      "eps": 1e-6, "adjust_lr_fn": "match_rms_adamw"}),
    ("muon-bf16-defaults", "bf16", {"lr": 2e-2}),
]


def newton_schulz_in(dtype):
    """torch's _zeropower_via_newtonschulz with `dtype` in place of torch.bfloat16."""

    def zeropower(grad, ns_coefficients, ns_steps, eps):
        if ns_steps >= 100:
            raise ValueError("Number of steps must be less than 100 for computational efficiency")
        if len(grad.shape) != 2:
            raise ValueError("Input tensor gradient must be a 2D matrix")
        if len(ns_coefficients) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        a, b, c = ns_coefficients
        ortho_grad = grad.to(dtype=dtype, copy=True)
        if grad.size(0) > grad.size(1):
            ortho_grad = ortho_grad.T
        ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
        for _ in range(ns_steps):
            gram_matrix = ortho_grad @ ortho_grad.T
            gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
            ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
        if grad.size(0) > grad.size(1):
            ortho_grad = ortho_grad.T
        return ortho_grad

    return zeropower


def hyperparameters(opt, ns_dtype):
    g = opt.param_groups[0]
    return {
        "lr": g["lr"],
        "momentum": g["momentum"],
        "nesterov": g["nesterov"],
        "weight_decay": g["weight_decay"],
        "ns_steps": g["ns_steps"],
        "ns_coefficients": list(g["ns_coefficients"]),
        "eps": g["eps"],
        "adjust_lr": g["adjust_lr_fn"] or "original",
        "newton_schulz_dtype": ns_dtype,
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, ns_dtype, kw in CASES:
        muon_module._zeropower_via_newtonschulz = (
            newton_schulz_in(torch.float64) if ns_dtype == "f64" else TORCH_NEWTON_SCHULZ
        )
        gen = torch.Generator().manual_seed(4321)
        params = {
            "tall": torch.empty(12, 5, dtype=torch.float64).uniform_(-1, 1, generator=gen),
            "wide": torch.empty(4, 9, dtype=torch.float64).uniform_(-1, 1, generator=gen),
        }
        targets = {k: torch.empty_like(v).uniform_(-1, 1, generator=gen) for k, v in params.items()}
        tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        opt = torch.optim.Muon(list(tensors.values()), **kw)
        grads, steps = [], []
        for step in range(STEPS):
            loss = sum(((tensors[k] - targets[k]) ** 2).sum() for k in tensors)
            opt.zero_grad()
            loss.backward()
            for k, t in tensors.items():
                t.grad.add_(0.1 * torch.randn(t.shape, dtype=torch.float64, generator=gen))
            grads.append({k: t.grad.tolist() for k, t in tensors.items()})
            opt.step()
            steps.append({k: t.detach().tolist() for k, t in tensors.items()})
        fixture = {
            "optimizer": "muon",
            "hyperparameters": hyperparameters(opt, ns_dtype),
            "dtype": "f64",
            "params": {k: v.tolist() for k, v in params.items()},
            "grads": grads,
            "expected": {"steps": steps},
            "source": f"torch.optim.Muon, torch {torch.__version__}, scripts/muon_fixtures.py"
            + ("" if ns_dtype == "bf16" else " (Newton-Schulz in float64)"),
        }
        with open(os.path.join(OUT, f"{name}.json"), "w") as f:
            json.dump(fixture, f)
        print(f"wrote {name}.json")
    muon_module._zeropower_via_newtonschulz = TORCH_NEWTON_SCHULZ


if __name__ == "__main__":
    main()
