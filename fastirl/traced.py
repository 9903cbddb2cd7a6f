"""The fused loss as one ``torch.library`` custom op: the traced path.

Under ``torch.compile`` (and with meta / fake tensors, which hold no values)
the public functions check types, shapes and devices in Python, as always, and
then call one opaque op, ``torch.ops.fastirl.iq_loss_fused``, instead of the
chunked engine:

* its fake implementation gives the outputs' shapes and dtypes without reading
  a value, so shape inference (FSDP meta-device initialisation) and tracing work;
* its real implementation is the eager computation (:func:`fastirl.compute.compute`):
  the value checks that need data (targets in range, ``position_ids >= 0``,
  ``num_items_in_batch > 0``, hyper-parameters given as 0-d tensors) run inside
  it, so the traced graph holds no host sync and ``fullgraph=True`` works;
* its autograd formula: for a scalar loss the op computes the gradients during
  its forward (the engine's single pass) and backward scales them by the
  upstream gradient; for ``reduction="none"`` a second op,
  ``fastirl::iq_loss_fused_backward``, recomputes the forward and backward with
  the upstream gradient.

The op's schema does not list the options: they travel as one JSON string
(those that are constants of the graph), one float64 tensor (the scalar
hyper-parameters, so that a 0-d tensor among them stays a graph input) and a
list of tensor options (:func:`fastirl.options.encode`).  A new option needs no
change here.

Outputs of ``iq_loss_fused`` (empty ``(0,)`` tensors where not asked for):
loss (scalar or the targets' shape, float32 / float64), rewards (targets'
shape: implicit_rewards), metrics (len(METRICS),), predicted tokens (targets'
shape, int64), and the gradients of ``main``, ``weight`` and ``bias``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor

from . import _validate as check
from .backends.base import acc_dtype
from .compute import METRICS, Call, compute
from .options import decode, encode

__all__ = ["call"]


@contextmanager
def _autograd_inside_op():
    """Autograd inside the op's implementation.  The dispatcher runs a custom op's
    kernel with the autograd keys excluded; the engine needs autograd over the
    per-row objective (and the gradients of the forward pass), so they are put
    back for the duration of the body."""
    C = torch._C
    excluded = C._dispatch_tls_local_exclude_set()
    for key in (C.DispatchKey.AutogradFunctionality, C.DispatchKey.AutogradOther,
                C.DispatchKey.AutogradNestedTensor):
        excluded = excluded.remove(key)
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), excluded):
        yield


def _run(main, weight, bias, targets, position_ids, done, is_expert, num_items, scalars,
         option_tensors, kw: dict, grads: list[bool], upstream: Tensor | None = None):
    """The eager computation behind both ops: (result, gradients)."""
    iq, run = decode(kw["static"], scalars, option_tensors)
    if num_items is not None:
        check.num_items(num_items)
    with _autograd_inside_op(), torch.enable_grad() if any(grads) else torch.no_grad():
        leaves = [None if t is None else t.detach().requires_grad_(g)
                  for t, g in zip((main, weight, bias), grads)]
        call = Call(kw["entry"], leaves[0], leaves[1], leaves[2], targets, position_ids, done,
                    is_expert, num_items, iq, run, metrics=kw["metrics"],
                    predictions=kw["predictions"], compute_dtype=kw["compute_dtype"],
                    vocab=kw["vocab"])
        result = compute(call)
        wanted = [t for t, g in zip(leaves, grads) if g]
        got = iter(torch.autograd.grad(result.loss, wanted, upstream, materialize_grads=True)
                   if wanted else ())
        out_grads = [next(got) if g else None for g in grads]
    return result, iq, out_grads


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


def _grad_like(t: Tensor, g: Tensor) -> Tensor:
    """The gradient of ``t`` with the strides of ``torch.empty_like(t)``, which the
    fake implementation promises (compiled code relies on them)."""
    out = torch.empty_like(t)
    if g.stride() == out.stride():
        return g
    return out.copy_(g)


def _outputs(main, targets, kw, grads, weight, bias, result=None, iq=None,
             d=(None, None, None)):
    """The op's seven outputs; allocated empty (fake mode) when there is no result."""
    acc = acc_dtype(main.dtype)
    lead = tuple(targets.shape)
    loss = rewards = predicted = None
    metrics = _empty(main, acc)
    if result is not None:
        loss, rewards = result.loss, None
        if kw["entry"] == "rewards":
            rewards = result.rewards()
        if kw["metrics"]:
            m = result.metrics(iq)
            metrics = torch.stack([m[k] for k in METRICS]).to(acc)
        if kw["predictions"]:
            predicted = result.predictions(iq.ignore_index)
    elif kw["metrics"]:
        metrics = main.new_empty((len(METRICS),), dtype=acc)
    if kw["entry"] == "rewards":
        loss = _empty(main, acc)
        rewards = main.new_empty(lead, dtype=acc) if rewards is None else rewards
    else:
        loss = main.new_empty(lead if kw["reduction_none"] else (), dtype=acc) \
            if loss is None else loss
        rewards = _empty(main, acc)
    if not kw["predictions"]:
        predicted = _empty(main, torch.int64)
    elif predicted is None:
        predicted = main.new_empty(lead, dtype=torch.int64)
    gs = []
    for t, g, got in zip((main, weight, bias), grads, d):
        gs.append(_empty(main) if not g else
                  (torch.empty_like(t) if got is None else _grad_like(t, got)))
    return (loss.detach().contiguous(), rewards.contiguous(), metrics, predicted.contiguous(),
            *gs)


@torch.library.custom_op("fastirl::iq_loss_fused", mutates_args=())
def _fused(main: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], targets: Tensor,
           position_ids: Optional[Tensor], done: Optional[Tensor], is_expert: Optional[Tensor],
           num_items: Optional[Tensor], scalars: Tensor, option_tensors: list[Optional[Tensor]],
           *, entry: str, static: str, metrics: bool, predictions: bool, reduction_none: bool,
           compute_dtype: torch.dtype, vocab: int, grads: list[bool]
           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    kw = dict(entry=entry, static=static, metrics=metrics, predictions=predictions,
              reduction_none=reduction_none, compute_dtype=compute_dtype, vocab=vocab)
    result, iq, d = _run(main, weight, bias, targets, position_ids, done, is_expert, num_items,
                         scalars, option_tensors, kw, grads)
    return _outputs(main, targets, kw, grads, weight, bias, result, iq, d)


@_fused.register_fake
def _fused_fake(main, weight, bias, targets, position_ids, done, is_expert, num_items, scalars,
                option_tensors, **kw):
    return _outputs(main, targets, kw, kw["grads"], weight, bias)


@torch.library.custom_op("fastirl::iq_loss_fused_backward", mutates_args=())
def _fused_backward(grad: Tensor, main: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    targets: Tensor, position_ids: Optional[Tensor], done: Optional[Tensor],
                    is_expert: Optional[Tensor], num_items: Optional[Tensor], scalars: Tensor,
                    option_tensors: list[Optional[Tensor]], *, entry: str, static: str,
                    metrics: bool, predictions: bool, reduction_none: bool,
                    compute_dtype: torch.dtype, vocab: int, grads: list[bool]
                    ) -> tuple[Tensor, Tensor, Tensor]:
    kw = dict(entry=entry, static=static, metrics=False, predictions=False,
              compute_dtype=compute_dtype, vocab=vocab)
    *_, d = _run(main, weight, bias, targets, position_ids, done, is_expert, num_items,
                 scalars, option_tensors, kw, grads, upstream=grad)
    return tuple(_empty(main) if g is None else _grad_like(t, g)
                 for t, g in zip((main, weight, bias), d))


@_fused_backward.register_fake
def _fused_backward_fake(grad, main, weight, bias, targets, position_ids, done, is_expert,
                         num_items, scalars, option_tensors, **kw):
    return tuple(torch.empty_like(t) if g else _empty(main)
                 for t, g in zip((main, weight, bias), kw["grads"]))


_N_INPUTS = 10          # positional inputs of iq_loss_fused


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    kw = dict(keyword_only_inputs)
    ctx.kw = kw
    ctx.precomputed = not kw["reduction_none"]
    # the gradient "of" the tensor-option list: a list where it holds a tensor, else None
    has = any(isinstance(t, Tensor) for t in inputs[9])
    ctx.option_grads = [None] * len(inputs[9]) if has else None
    ctx.mark_non_differentiable(*output[1:])
    if ctx.precomputed:          # gradients of the scalar loss, from the forward pass
        ctx.save_for_backward(*output[4:])
    else:
        ctx.option_tensors = inputs[9]
        ctx.save_for_backward(*inputs[:9])


def _backward(ctx, grad_loss, *unused):
    need = list(ctx.needs_input_grad[:3])
    if ctx.precomputed:
        out = [g * grad_loss.to(g.dtype) if n else None
               for g, n in zip(ctx.saved_tensors, need)]
    else:
        kw = dict(ctx.kw, grads=need)
        d = _fused_backward(grad_loss, *ctx.saved_tensors, ctx.option_tensors, **kw)
        out = [g if n else None for g, n in zip(d, need)]
    # no gradient for targets ... scalars, nor for the tensor options (a list)
    return (*out, *([None] * (_N_INPUTS - 4)), ctx.option_grads)


_fused.register_autograd(_backward, setup_context=_setup_context)


def call(c: Call):
    """Runs a checked call through the op.  Returns what the public function returns."""
    num_items = c.num_items
    if num_items is not None and not isinstance(num_items, Tensor):
        num_items = torch.tensor(float(num_items), dtype=torch.float64)
    differentiable = (c.entry != "rewards" and c.iq.reduction != "none"
                      and torch.is_grad_enabled())
    grads = [differentiable and t is not None and t.requires_grad
             for t in (c.main, c.weight, c.bias)]
    static, scalars, option_tensors = encode(c.iq, c.run)
    out = _fused(c.main, c.weight, c.bias, c.targets, c.position_ids, c.done, c.is_expert,
                 num_items, scalars, option_tensors, entry=c.entry, static=static,
                 metrics=c.metrics, predictions=c.predictions,
                 reduction_none=c.iq.reduction == "none",
                 compute_dtype=c.compute_dtype or c.main.dtype, vocab=c.vocab, grads=grads)
    loss, rewards, metrics, predicted = out[:4]
    if c.entry == "rewards":
        return rewards
    if not (c.metrics or c.predictions):
        return loss
    extras = dict(zip(METRICS, metrics.unbind())) if c.metrics else {}
    if c.predictions:
        extras["predicted"] = predicted
    return loss, extras
