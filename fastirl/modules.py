"""``nn.Module`` wrappers that hold the loss options."""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import Unpack

from . import functional as F
from .options import ModuleOptions, module_options


class _Options(nn.Module):
    def __init__(self, *, return_metrics: bool = False, return_predictions: bool = False,
                 **options: Unpack[ModuleOptions]):
        super().__init__()
        # Validated now, so a bad option fails at construction, not mid-training.
        self.options = module_options(options, type(self).__name__)
        for name, flag in (("return_metrics", return_metrics),
                           ("return_predictions", return_predictions)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
            if flag:
                self.options[name] = True

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class IQLoss(_Options):
    """IQ-Learn loss from logits: ``IQLoss(**options)(logits, targets, **per_batch)``.

    Options are those of :func:`fastirl.iq_loss_from_logits`; per-batch tensors
    (position_ids, done, is_expert, num_items_in_batch) and output flags go to
    ``forward``."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, **per_batch):
        return F.iq_loss_from_logits(logits, targets, **self.options, **per_batch)


class LinearIQLoss(_Options):
    """Fused LM-head IQ-Learn loss: ``LinearIQLoss(**options)(hidden, weight, targets)``.

    Options are those of :func:`fastirl.iq_loss`; per-batch tensors (bias,
    position_ids, done, is_expert, num_items_in_batch) and output flags go to
    ``forward``."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                **per_batch):
        return F.iq_loss(hidden, weight, targets, **self.options, **per_batch)
