"""``nn.Module`` wrappers that hold the loss options."""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F


class _Options(nn.Module):
    def __init__(self, **options):
        super().__init__()
        # Validate eagerly so a bad option fails at construction, not mid-training.
        F.check_options(**options)
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class IQLoss(_Options):
    """IQ-Learn loss from logits: ``IQLoss(**options)(logits, targets, **per_batch)``.

    Options are those of :func:`fastirl.iq_loss_from_logits`; per-batch tensors
    (position_ids, done, is_expert, num_items_in_batch) go to ``forward``."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, **per_batch):
        return F.iq_loss_from_logits(logits, targets, **self.options, **per_batch)


class LinearIQLoss(_Options):
    """Fused LM-head IQ-Learn loss: ``LinearIQLoss(**options)(hidden, weight, targets)``.

    Options are those of :func:`fastirl.iq_loss`; per-batch tensors (bias,
    position_ids, done, is_expert, num_items_in_batch) go to ``forward``."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                **per_batch):
        return F.iq_loss(hidden, weight, targets, **self.options, **per_batch)
