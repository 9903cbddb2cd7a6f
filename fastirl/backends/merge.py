"""Statistics of a vocabulary cut into parts, combined exactly.

A backend gives the statistics of one block of columns; the statistics of the
whole row follow from those of its parts (vocabulary shards of vocabulary
parallelism, vocabulary slabs of the "slabs" memory plan).  With V_k the soft
value of part k:

    V = tau log sum_k exp(V_k / tau)          w_k = exp((V_k - V) / tau)
    q = sum_k q_k                             (one part holds the target)
    S = sum_k S_k                             (logit sums)
    H = sum_k w_k (H_k - (V_k - V) / tau)     (w_k is part k's policy mass)
    argmax: of the first part holding the largest max logit
"""

from __future__ import annotations

import torch

from .base import RowStats

__all__ = ["combine"]


def _sum(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.stack(parts).sum(dim=0)


def combine(parts: list[RowStats], tau: float) -> RowStats:
    """The statistics of the concatenated columns of ``parts`` (in column order;
    each part's ``argmax`` already a column id of the whole)."""
    if len(parts) == 1:
        return parts[0]
    vk = torch.stack([p.value for p in parts])
    m = vk.amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    ek = torch.exp((vk - m) / tau)
    s = ek.sum(dim=0)
    value = m + tau * torch.log(s)
    entropy = None
    if parts[0].entropy is not None:
        hk = torch.stack([p.entropy for p in parts])
        entropy = (ek / s * (hk - (vk - value) / tau)).sum(dim=0)
    argmax = max_logit = None
    if parts[0].max_logit is not None:
        mk = torch.stack([p.max_logit for p in parts])
        max_logit = mk.amax(dim=0)
        first = (mk == max_logit).to(torch.int8).argmax(dim=0)     # first part holding it
        ids = torch.stack([p.argmax for p in parts])
        argmax = ids.gather(0, first.unsqueeze(0)).squeeze(0)
    return RowStats(value, _sum([p.target_logit for p in parts]), entropy, argmax, max_logit,
                    logit_sum=_sum([p.logit_sum for p in parts]))
