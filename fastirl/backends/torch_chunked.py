"""Pure-PyTorch backend: rows in chunks, the logits of one chunk at a time.

Per chunk of c rows it holds one float32 (c, V) block (two with soft-capping and
entropy), sized by :mod:`.chunking`, never the (N, V) logits.  Statistics use a
max-shifted exponential computed in place:

    e = exp((z - max z) / tau),  S = sum_v e,  V = max z + tau * log S
    H = log S - sum_v e log e / S          (entropy, from e alone)

and the gradient reuses e when the block is kept (single-pass mode):

    dz = (grad_value / S) * e + grad_target * onehot(target) (+ grad_sum)
                                                             (* (1 - (z/c)^2))

The row sum of the (capped) logits (``spec.logit_sum``) is one more reduction
of the block before e overwrites it.

In recompute mode (``state is None``) the block is recomputed and
e / S = exp((z - V) / tau) directly.  Device-agnostic; the CPU default until a
native backend is built.
"""

from __future__ import annotations

from typing import Any

import torch

from . import chunking
from .base import ALL_DTYPES, LogitSpec, RowStats, acc_dtype


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            spec: LogitSpec) -> torch.Tensor:
    """Float32 (n, V) logits of a chunk, soft-capped."""
    z = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    z = z.to(acc_dtype(x.dtype))
    if spec.softcap is not None:
        z.div_(spec.softcap).tanh_().mul_(spec.softcap)
    return z


def _target_logit(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    has = targets >= 0
    q = z.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(has, q, torch.zeros_like(q))


def _stats_inplace(z: torch.Tensor, targets: torch.Tensor, spec: LogitSpec,
                   keep_z: bool) -> tuple[RowStats, torch.Tensor, torch.Tensor]:
    """Statistics of float32 logits z (n, V).  Overwrites z with e unless keep_z
    (then e is a new tensor).  Returns (stats, e, S)."""
    q = _target_logit(z, targets)
    zsum = z.sum(dim=1) if spec.logit_sum else None     # before e overwrites z
    argmax = max_logit = None
    if spec.argmax:
        max_logit, argmax = z.max(dim=1)
    m = max_logit if max_logit is not None else z.amax(dim=1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf rows stay NaN-free
    tau = spec.temperature
    e = torch.sub(z, m.unsqueeze(1), out=None if keep_z else z)
    if tau != 1.0:
        e.mul_(1.0 / tau)
    e.exp_()
    s = e.sum(dim=1)
    value = m + tau * torch.log(s)
    entropy = None
    if spec.entropy:
        entropy = torch.log(s) - torch.xlogy(e, e).sum(dim=1) / s
    return RowStats(value, q, entropy, argmax, max_logit, zsum), e, s


def _grad_inplace(p_or_e: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor,
                  grad_target: torch.Tensor, capped: torch.Tensor | None,
                  spec: LogitSpec, grad_sum: torch.Tensor | None = None) -> torch.Tensor:
    """dz = scale * e + grad_target * onehot (+ grad_sum), in place over e (n, V)."""
    dz = p_or_e.mul_(scale.unsqueeze(1))
    has = targets >= 0
    rows = torch.arange(dz.shape[0], device=dz.device)
    dz.index_put_((rows[has], targets[has]), grad_target[has].to(dz.dtype), accumulate=True)
    if grad_sum is not None:
        dz.add_(grad_sum.to(dz.dtype).unsqueeze(1))
    if spec.softcap is not None:
        c = spec.softcap
        dz.mul_(1.0 - (capped / c).square_())
    return dz


class TorchChunkedBackend:
    name = "torch"
    dtypes = ALL_DTYPES         # float64 too (float64 accumulation, for gradcheck)

    def supports(self, device: torch.device) -> bool:
        return True

    def rows_per_chunk(self, n: int, vocab: int, hidden: int, dtype: torch.dtype,
                       chunk_size: int | None) -> int:
        # on CUDA when a device is present
        device = "cuda" if torch.cuda.is_available() and dtype != torch.float64 else "cpu"
        return chunking.rows_per_chunk(n, vocab, hidden, dtype, device=device,
                                       chunk_size=chunk_size,
                                       block_itemsize=self.block_itemsize(dtype))

    def block_itemsize(self, dtype: torch.dtype) -> int:
        # float32 (float64) blocks: the logits are upcast to the accumulation dtype
        return acc_dtype(dtype).itemsize

    def forward(self, x, weight, bias, targets, spec: LogitSpec, *, keep: bool):
        z = _logits(x, weight, bias, spec)
        capped = z if spec.softcap is not None and keep else None
        stats, e, s = _stats_inplace(z, targets, spec, keep_z=capped is not None)
        state = (e, s, capped) if keep else None
        return stats, state

    def backward(self, x, weight, bias, targets, value, grad_value, grad_target,
                 spec: LogitSpec, state: Any, *, need_x, dweight, dbias, grad_sum=None):
        if state is None:
            capped = _logits(x, weight, bias, spec)
            z = capped.clone() if spec.softcap is not None else capped
            e = z.sub_(value.unsqueeze(1))
            if spec.temperature != 1.0:
                e.mul_(1.0 / spec.temperature)
            e.exp_()
            scale = grad_value
        else:
            e, s, capped = state
            scale = grad_value / s
        dz = _grad_inplace(e, scale, targets, grad_target, capped, spec, grad_sum)
        if dbias is not None:
            dbias.add_(dz.sum(dim=0))
        if dweight is not None:   # (addmm with out=: an op FlopCounterMode counts)
            torch.addmm(dweight, dz.t(), x.to(dweight.dtype), out=dweight)
        if not need_x:
            return None
        return dz.to(weight.dtype) @ weight

    def logits_forward(self, logits, targets, spec: LogitSpec) -> RowStats:
        z = logits.to(acc_dtype(logits.dtype), copy=True)
        if spec.softcap is not None:
            z.div_(spec.softcap).tanh_().mul_(spec.softcap)
        return _stats_inplace(z, targets, spec, keep_z=False)[0]

    def logits_backward(self, logits, targets, value, grad_value, grad_target,
                        spec: LogitSpec, out: torch.Tensor, *, grad_sum=None) -> None:
        capped = logits.to(acc_dtype(logits.dtype))
        if spec.softcap is not None:
            capped = torch.tanh(capped / spec.softcap).mul_(spec.softcap)
        e = torch.sub(capped, value.unsqueeze(1))
        if spec.temperature != 1.0:
            e.mul_(1.0 / spec.temperature)
        e.exp_()
        out.copy_(_grad_inplace(e, grad_value, targets, grad_target, capped, spec, grad_sum))


def load() -> TorchChunkedBackend:
    return TorchChunkedBackend()
