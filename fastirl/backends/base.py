"""The contract between the loss engine and a compute backend.

A backend knows nothing about IQ-Learn. For a block of rows it computes, from
the logits ``z = x @ W.T (+ b)`` (optionally soft-capped, ``z <- c*tanh(z/c)``),
per-row statistics (:class:`RowStats`) in float32, and later turns two per-row
coefficients (three with ``grad_sum``) into gradients:

    dL/dz[v] = grad_value * p[v] + grad_target * [v == target] + grad_sum
    p        = softmax(z / temperature) = exp((z - value) / temperature)

(times the soft-cap derivative ``1 - (z/c)**2`` at the capped logit), followed by
``dx = dz @ W``, ``dW += dz.T @ x``, ``db += dz.sum(0)`` with dW/db accumulated in
float32.  Targets are int64 with ``-1`` for rows without an action (they have
``target_logit == 0`` and no one-hot term).  GEMMs run in the inputs' dtype
(x, weight and bias share it) with float32 accumulation; every reduction and
the dW/db accumulators are float32 whatever that dtype (float64 for float64
inputs, see :func:`acc_dtype`; "float32" below means that dtype).

The same contract exists for callers that hold logits already
(``logits_forward`` / ``logits_backward``), where ``x`` *is* the logits block.

``logit_sum`` / ``grad_sum`` (label smoothing, whose smoothed target needs the
row mean of the logits): the statistic is the row *sum* ``S = sum_v z[v]`` of
the (capped) logits over the columns the backend was given, and ``grad_sum``
is the coefficient of ``dL/dS``, added to every column of that block.  Sums
(not means) because the engine may call a backend on a vocabulary shard or
slab: shard sums add up, and the uniform coefficient stays per column; the
engine divides by V itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["LogitSpec", "RowStats", "Backend", "acc_dtype", "KERNEL_DTYPES", "ALL_DTYPES"]

# The input dtypes a kernel backend computes in (its ``dtypes``); the PyTorch
# backend takes float64 too.
KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
ALL_DTYPES = KERNEL_DTYPES | {torch.float64}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float32, or float64 for float64
    inputs (so float64 runs are exact enough for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class LogitSpec:
    """How logits are formed and reduced; identical for every backend.

    temperature: tau > 0; statistics are taken of z / tau.
    softcap: c > 0 or None; z <- c * tanh(z / c) before anything else.
    deterministic: no atomics whose order depends on scheduling (bitwise
        reproducible dW / db).
    entropy: also compute the policy entropy H(softmax(z / tau)).
    argmax: also compute the argmax of z and the max logit.
    logit_sum: also compute the row sum of the (capped) logits.
    """

    temperature: float = 1.0
    softcap: float | None = None
    deterministic: bool = True
    entropy: bool = False
    argmax: bool = False
    logit_sum: bool = False


@dataclass
class RowStats:
    """Per-row statistics of a block of n rows (float32 unless noted).

    value:        V = tau * logsumexp(z / tau)                      (n,)
    target_logit: q = z[target], 0 where target == -1               (n,)
    entropy:      H = -sum_v p_v log p_v                   (n,) or None
    argmax:       argmax_v z (int64)                      (n,) or None
    max_logit:    max_v z                                 (n,) or None
    logit_sum:    sum_v z over the block's columns        (n,) or None

    z is the logit after the soft cap (when one is set) and before the
    temperature.  A row holding a NaN logit has NaN value, max logit and
    logit sum (see the NaN policy of the kernels).
    """

    value: torch.Tensor
    target_logit: torch.Tensor
    entropy: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    max_logit: torch.Tensor | None = None
    logit_sum: torch.Tensor | None = None


class Backend(Protocol):
    """What the engine calls. ``state`` is opaque: a backend may keep the logits
    block of ``forward(..., keep=True)`` to turn it into the gradient in place
    (single-pass mode); a backend that keeps nothing returns None and
    recomputes in ``backward``."""

    name: str
    # The input dtypes it computes in.  :func:`fastirl.backends.resolve_backend`
    # runs any other (float64) on the PyTorch backend instead, so a backend
    # chosen by name never sees one (an object passed in is used as it is).
    dtypes: frozenset[torch.dtype]

    def supports(self, device: torch.device) -> bool: ...

    def rows_per_chunk(self, n: int, vocab: int, hidden: int, dtype: torch.dtype,
                       chunk_size: int | None) -> int:
        """How many rows one ``forward``/``backward`` call should take."""
        ...

    def block_itemsize(self, dtype: torch.dtype) -> int:
        """Bytes per element of the logits block a chunk of ``dtype`` inputs
        holds (what the memory planner charges per logit)."""
        ...

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, spec: LogitSpec, *, keep: bool) -> tuple[RowStats, Any]:
        """x (n, H), weight (V, H), bias (V,) or None, targets (n,) int64."""
        ...

    def backward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor, value: torch.Tensor, grad_value: torch.Tensor,
                 grad_target: torch.Tensor, spec: LogitSpec, state: Any, *,
                 need_x: bool, dweight: torch.Tensor | None,
                 dbias: torch.Tensor | None,
                 grad_sum: torch.Tensor | None = None) -> torch.Tensor | None:
        """Returns dx (n, H) in x's dtype (or None if not need_x); accumulates into
        the float32 buffers dweight (V, H) and dbias (V,) when they are given.
        grad_sum (n,) float32 or None (zero, at no cost): a coefficient added to
        every column of dL/dz (before the soft-cap derivative)."""
        ...

    def logits_forward(self, logits: torch.Tensor, targets: torch.Tensor,
                       spec: LogitSpec) -> RowStats:
        """logits (n, V) in any float dtype."""
        ...

    def logits_backward(self, logits: torch.Tensor, targets: torch.Tensor, value: torch.Tensor,
                        grad_value: torch.Tensor, grad_target: torch.Tensor, spec: LogitSpec,
                        out: torch.Tensor, *, grad_sum: torch.Tensor | None = None) -> None:
        """Writes dL/dlogits (n, V) into ``out`` (may alias ``logits``); grad_sum
        as in :meth:`backward`."""
        ...
