"""The eager computation of one call, after its options were parsed and its
tensors checked (:mod:`fastirl.functional`): the value checks, the row plan,
the engine, and the outputs.  The traced op (:mod:`fastirl.traced`) runs the
same function inside its body.

Data flows one way: functional -> (traced) -> compute -> engine -> backends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _validate as check
from . import engine
from . import objective as obj
from .backends.base import Backend, acc_dtype
from .options import IQOptions, RunOptions

__all__ = ["Call", "Result", "compute", "METRICS"]

# The metrics of return_metrics=True, in this order (the traced op returns them stacked).
METRICS = obj.METRICS


@dataclass
class Call:
    """Everything one call of an entry point needs.

    entry: "linear" (main = hidden states), "logits" (main = logits) or
        "rewards" (hidden states, no loss).
    main: (B, T, X) or (N, X); targets (B, T) or (N,) and the sequence tensors alike.
    compute_dtype: dtype of the GEMMs (the autocast dtype under autocast, else
        main's); statistics and weight gradients accumulate in float32.
    vocab: the vocabulary size (the global one under vocabulary parallelism).
    backend: ``run.backend``, or the vocabulary-parallel wrapper around it.
    """

    entry: str
    main: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    targets: torch.Tensor
    position_ids: torch.Tensor | None
    done: torch.Tensor | None
    is_expert: torch.Tensor | None
    num_items: torch.Tensor | float | None
    iq: IQOptions
    run: RunOptions
    metrics: bool = False
    predictions: bool = False
    compute_dtype: torch.dtype | None = None
    vocab: int = 0
    backend: str | Backend | None = None


@dataclass
class Result:
    """loss: scalar, or the targets' shape for reduction="none" (float32);
    rows: the engine's per-row tensors; plan: the row plan; flat: 1-d targets."""

    loss: torch.Tensor
    rows: dict
    plan: obj.RowPlan
    flat: bool

    def rewards(self) -> torch.Tensor:
        """Implicit rewards, the targets' shape, 0 on non-action rows."""
        r = self.rows["reward"]
        return self._shape(self.plan.scatter(torch.where(self.plan.action, r,
                                                         torch.zeros_like(r))))

    def metrics(self, iq: IQOptions) -> dict[str, torch.Tensor]:
        r = self.rows
        return obj.metrics(r["target_logit"], r["value"], r["reward"], r["entropy"],
                           r["argmax"], self.plan, iq)

    def predictions(self, ignore_index: int) -> torch.Tensor:
        """argmax of the logits on action rows, ``ignore_index`` elsewhere."""
        a = self.rows["argmax"]
        a = torch.where(self.plan.action, a, torch.full_like(a, ignore_index))
        out = self.plan.scatter(a, fill=ignore_index)
        return self._shape(out)

    def _shape(self, t: torch.Tensor) -> torch.Tensor:
        return t.squeeze(0) if self.flat else t


def compute(call: Call) -> Result:
    """The loss (and per-row tensors) of ``call``; autograd connects the loss to
    main, weight and bias.  Runs with autocast off: the GEMM dtype is
    ``call.compute_dtype``, decided by the caller."""
    flat = call.targets.dim() == 1
    as_rows = (lambda t: None if t is None else t.unsqueeze(0)) if flat else (lambda t: t)
    targets = as_rows(call.targets).long()
    position_ids, done = as_rows(call.position_ids), as_rows(call.done)
    iq = call.iq
    want_stats = call.metrics or call.predictions
    plan = obj.plan_rows(targets, iq, position_ids=position_ids, done=done,
                         is_expert=call.is_expert, num_items_in_batch=call.num_items,
                         dtype=acc_dtype(call.main.dtype), vocab=call.vocab,
                         check=check.targets_and_positions)
    run = dict(backend=call.backend if call.backend is not None else call.run.backend,
               run=call.run, want_metrics=want_stats, logit_sum=iq.label_smoothing > 0)
    with torch.autocast(call.main.device.type, enabled=False):
        main = call.main.reshape(-1, call.main.shape[-1])
        if call.entry == "logits":
            loss, rows = engine.run_logits(main, plan, iq, **run)
        else:
            loss, rows = engine.run_linear(main, call.weight, call.bias, plan, iq,
                                           compute_dtype=call.compute_dtype, **run)
    if iq.reduction == "none":
        loss = plan.scatter(loss)
        loss = loss.squeeze(0) if flat else loss
    return Result(loss, rows, plan, flat)
