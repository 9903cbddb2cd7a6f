"""Random IQ problems shared by the test modules."""

from __future__ import annotations

import torch


def make_batch(B=3, T=9, H=12, V=37, *, dtype=torch.float64, seed=0, ignore_frac=0.25,
               prompt=2, pad_last=True, bias=False, packed=False, requires_grad=True):
    """hidden, weight, bias, targets (+ position_ids when packed) with a masked prompt,
    ragged lengths (right padding) and random ignored rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < ignore_frac] = -100
    targets[:, :prompt] = -100
    if pad_last and B > 1:
        targets[-1, T // 2:] = -100
    out = {"hidden": hidden.requires_grad_(requires_grad),
           "weight": weight.requires_grad_(requires_grad), "targets": targets}
    if b is not None:
        out["bias"] = b.requires_grad_(requires_grad)
    if packed:
        pos = torch.zeros(B, T, dtype=torch.long)
        for i in range(B):
            cut = int(torch.randint(1, T, (1,), generator=g))
            pos[i, :cut] = torch.arange(cut)
            pos[i, cut:] = torch.arange(T - cut)
        out["position_ids"] = pos
    return out


def grads(loss, tensors, upstream=None):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, tensors, upstream, allow_unused=True)


def use_op_path(monkeypatch):
    """Route eager calls through the torch.library op of the traced path
    (fastirl.traced), as torch.compile and meta / fake tensors do."""
    from fastirl import functional
    monkeypatch.setattr(functional, "_traced", lambda backend, *t: isinstance(backend, str))
