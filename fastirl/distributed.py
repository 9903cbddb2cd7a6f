"""Distributed training with the fused IQ-Learn loss.

1. Vocabulary (tensor) parallelism
----------------------------------
``fastirl.iq_loss(hidden, weight_shard, targets, process_group=tp_group)``:
each rank holds a contiguous shard of the LM head's rows and the same batch;
see :mod:`fastirl.vocab_parallel` for how, and what every rank must pass.
:class:`VocabParallelBackend`, :func:`vocab_parallel` and
:func:`check_same_batch` are re-exported here.

2. Data parallelism: ``num_items_in_batch``
-------------------------------------------
:func:`global_num_items` all-reduces the action-token count over a
data-parallel group.  With gradient *averaging* over W ranks (DDP, FSDP2's
default) pass ``num_items_in_batch = global count / W`` (the default,
``grads_averaged=True``): every rank then computes ``sum_rank l / (N / W)``
and the averaged gradient is that of ``sum_all l / N``, the token mean of the
whole global batch, however unevenly the tokens fall on the ranks.  With
gradients *summed* over ranks, pass the global count itself
(``grads_averaged=False``).  For gradient accumulation give it the targets of
all micro-batches of the optimizer step.  In vocab + data parallelism use the
data-parallel group here (not the vocabulary group).  The same value goes to a
Hugging Face model patched by ``apply_fastirl`` (``labels[..., 1:]``:
HF labels are token-aligned); the loss is used as it comes, never multiplied by
the world size.

3. Sharded parameters (FSDP2, DeepSpeed ZeRO-3)
-----------------------------------------------
The fused loss needs the full LM-head weight in the loss call.  Supported ways:

* :class:`FusedLMHeadLoss` (recommended): a module that owns the ``lm_head``
  and computes the loss in its ``forward``.  Make it part of the model and call
  it through ``__call__`` so the sharding framework's hooks run::

      class Policy(nn.Module):
          def __init__(self, backbone, lm_head):
              super().__init__()
              self.backbone = backbone
              self.head = fastirl.distributed.FusedLMHeadLoss(lm_head, td_weight=0.1)
          def forward(self, input_ids, targets, **per_batch):
              return self.head(self.backbone(input_ids), targets, **per_batch)

      for block in model.backbone.layers:
          fully_shard(block)
      fully_shard(model.head, reshard_after_forward=False)   # backward follows at once
      fully_shard(model)

  FSDP2 all-gathers the head in its pre-forward hook and reduce-scatters its
  gradient after backward.  (If the head's weight is tied to the input
  embedding, both must be in the same FSDP unit, e.g. the root: then
  don't ``fully_shard(model.head)`` separately.)  DeepSpeed ZeRO-3 gathers a
  submodule's parameters the same way (module pre-forward hooks) and partitions
  their gradients: the same structure is the way there too (``engine(input_ids,
  targets)``, then ``engine.backward(loss)``).

* :func:`gathered_lm_head`: a context manager for a loss computed *outside*
  any forward, e.g. right after the model returned hidden states::

      hidden = model(input_ids)                       # model.lm_head: own FSDP unit
      with gathered_lm_head(model.lm_head) as head:
          loss = fastirl.iq_loss(hidden, head.weight, targets, bias=head.bias)
      loss.backward()

  It calls ``FSDPModule.unshard()``; FSDP's post-backward callback (run by the
  root after every backward) reduce-scatters the head's gradient and reshards
  it.  Without gradients (or when the loss is not differentiated) it reshards
  on exit.  A module that is not an ``FSDPModule`` (plain, DDP, or a head that
  belongs to the root unit, which FSDP2 keeps unsharded after the root's
  forward) is yielded as is.  Not for DeepSpeed ZeRO-3: its
  ``GatheredParameters`` re-partitions on exit, before the backward pass, which
  then fails; use :class:`FusedLMHeadLoss` there.

Verified by ``tests/test_distributed.py`` on CPU with gloo (2 and 3 ranks):
vocab parallelism against the float64 reference and the single-process loss
for every objective option, uneven shards, errors instead of hangs; FSDP2
(``fully_shard``) training steps with both ways above (and a head in the root
unit) against an unsharded model; DDP with :func:`global_num_items`; DeepSpeed
ZeRO-3 with :class:`FusedLMHeadLoss` (an optional slow test, needs deepspeed).
Not verified: NCCL / GPUs (see ``docs/distributed.md``).
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .functional import iq_loss
from .options import module_options
from .vocab_parallel import (VocabParallelBackend, _all_reduce_sum, check_same_batch,
                             vocab_parallel)

__all__ = ["vocab_parallel", "vocab_parallel_iq_loss", "VocabParallelBackend",
           "check_same_batch", "global_num_items", "FusedLMHeadLoss", "gathered_lm_head"]


def vocab_parallel_iq_loss(hidden: torch.Tensor, weight_shard: torch.Tensor,
                           targets: torch.Tensor, *, process_group, **options):
    """:func:`fastirl.iq_loss` with ``weight_shard`` (and ``bias=`` shard) the
    rank's vocabulary shard.  ``iq_loss(process_group=...)`` sends a fingerprint of
    the batch with its first all-gather, so a batch that differs between ranks
    raises on every rank instead of hanging.  Same options and return value as
    :func:`fastirl.iq_loss`."""
    return iq_loss(hidden, weight_shard, targets, process_group=process_group, **options)


# --------------------------------------------------------------------------- data parallel

def global_num_items(targets: "torch.Tensor | Iterable[torch.Tensor]", ignore_index: int = -100,
                     group=None, *, grads_averaged: bool = True) -> torch.Tensor:
    """The value to pass as ``num_items_in_batch`` under data parallelism.

    ``targets``: this rank's aligned targets (for Hugging Face ``labels``,
    ``labels[..., 1:]``), or an iterable of them (all micro-batches of one
    optimizer step).  Counts the action rows (``!= ignore_index``), sums
    the count over the data-parallel ``group`` (default: the world), and returns
    it divided by the group size when ``grads_averaged`` (DDP, FSDP2 by default
    average gradients: then the update is that of the token mean over the whole
    global batch), or the global count itself when gradients are summed.  Give
    every micro-batch's loss call this value and use the loss as it comes (no
    rescaling by the world size or the accumulation steps);
    ``fastirl.integrations.global_num_items`` is this function.  A float64
    scalar tensor on the targets' device; a global count of 0 counts as 1 (the
    loss is 0 then anyway).  Without an initialized process group it is the local
    count.  Online mode (``is_expert``): note that num_items_in_batch replaces
    both normalisers N_all and N_E.
    """
    parts = [targets] if isinstance(targets, torch.Tensor) else list(targets)
    if not parts:
        raise ValueError("global_num_items needs at least one targets tensor")
    device = parts[0].device
    count = torch.zeros((), dtype=torch.float64, device=device)
    for t in parts:
        count += (t != ignore_index).sum().to(device=device, dtype=torch.float64)
    world = 1
    if dist.is_available() and dist.is_initialized():
        count = _all_reduce_sum(count, group)
        world = dist.get_world_size(group)
    count = count.clamp(min=1)
    return count / world if grads_averaged else count


# --------------------------------------------------------------------------- sharded params

class FusedLMHeadLoss(nn.Module):
    """The LM head and the fused IQ-Learn loss as one module:
    ``FusedLMHeadLoss(lm_head, **options)(hidden, targets, **per_batch)``.

    ``lm_head`` is a module with ``weight`` (V, H) and optionally ``bias``
    (e.g. ``nn.Linear``); it becomes a submodule, so a sharding wrapper applied
    to this module (FSDP2 ``fully_shard``) or to an ancestor (DeepSpeed ZeRO-3)
    gathers its parameters for the loss and reduces their gradients.  Options
    are those of :func:`fastirl.iq_loss` (``process_group`` included, for a
    vocabulary-sharded head); per-batch tensors (position_ids, done, is_expert,
    num_items_in_batch) go to ``forward``.  ``logits(hidden)`` gives the logits
    for generation / evaluation."""

    def __init__(self, lm_head: nn.Module, *, process_group=None, **options):
        super().__init__()
        if not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
            raise TypeError("lm_head must be a module with a (vocab, hidden) weight, "
                            f"got {type(lm_head).__name__}")
        self.lm_head = lm_head
        self.options = module_options(options, "FusedLMHeadLoss")
        if process_group is not None:
            self.options["process_group"] = process_group

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, **per_batch):
        bias = getattr(self.lm_head, "bias", None)
        return iq_loss(hidden, self.lm_head.weight, targets, bias=bias,
                       **{**self.options, **per_batch})

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def _is_fsdp2(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gathered_lm_head(module: nn.Module):
    """Yields ``module`` with its parameters unsharded, for a loss computed
    outside of any forward (see the module docstring).

    FSDP2 (``fully_shard``-ed module): calls ``module.unshard()`` on entry.
    Inside, ``module.weight`` / ``module.bias`` are the full tensors.  If the
    block ran with gradients enabled and any of the module's parameters
    requires grad, they stay unsharded until FSDP's post-backward callback
    (run after ``loss.backward()``) reduce-scatters their gradients and
    reshards them; otherwise they are resharded on exit.  Any other module is
    yielded unchanged."""
    if not _is_fsdp2(module):
        yield module
        return
    grad = torch.is_grad_enabled()
    module.unshard()
    ok = False
    try:
        yield module
        ok = True
    finally:
        trains = grad and any(p.requires_grad for p in module.parameters())
        if not (ok and trains):
            module.reshard()
