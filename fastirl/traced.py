"""The fused loss as one ``torch.library`` custom op: the traced path.

Under ``torch.compile`` (and with meta / fake tensors, which hold no values)
the public functions check types, shapes and devices in Python, as always, and
then call one opaque op, ``torch.ops.fastirl.iq_loss_fused``, instead of the
chunked engine:

* its fake implementation gives the outputs' shapes and dtypes without reading
  a value, so shape inference (FSDP meta-device initialisation) and tracing work;
* its real implementation is the eager code path (:func:`fastirl.functional.compute`):
  the value checks that need data (targets in range, ``position_ids >= 0``,
  ``num_items_in_batch > 0``, hyper-parameters given as 0-d tensors) run inside
  it, so the traced graph holds no host sync and ``fullgraph=True`` works;
* its autograd formula: for a scalar loss the op computes the gradients during
  its forward (the engine's single pass) and backward scales them by the
  upstream gradient; for ``reduction="none"`` a second op,
  ``fastirl::iq_loss_fused_backward``, recomputes the forward and backward with
  the upstream gradient.

Outputs of ``iq_loss_fused`` (empty ``(0,)`` tensors where not asked for):
loss (scalar or the targets' shape, the input dtype), rewards (targets' shape,
float32 / float64: implicit_rewards), metrics (6,) in :data:`METRICS` order,
and the gradients of ``main``, ``weight`` and ``bias``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from .backends.base import acc_dtype
from .objective import IQOptions

__all__ = ["call", "METRICS", "HYPER"]

METRICS = ("nll", "td_penalty", "reward", "value", "entropy", "accuracy")
HYPER = ("gamma", "td_weight", "temperature", "softcap")


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


def _options(scalars: Tensor, kw: dict) -> IQOptions:
    """IQOptions from the op's arguments; validates the hyper-parameters' values."""
    *values, has_softcap = scalars.tolist()
    values = dict(zip(HYPER, values))
    if not has_softcap:
        values["softcap"] = None
    return IQOptions(ignore_index=kw["ignore_index"], reduction=kw["reduction"],
                     divergence=kw["divergence"], value_term=kw["value_term"],
                     td_rows=kw["td_rows"], detach_next_value=kw["detach_next_value"], **values)


def _run(entry, main, weight, bias, targets, position_ids, done, is_expert, num_items, scalars,
         kw: dict, grads: list[bool], upstream: Tensor | None = None):
    """The eager computation behind both ops.  Returns (loss, rewards, metrics, grads)."""
    from . import functional as F

    opts = _options(scalars, kw)
    with _autograd_inside_op(), torch.enable_grad() if any(grads) else torch.no_grad():
        leaves = [None if t is None else t.detach().requires_grad_(g)
                  for t, g in zip((main, weight, bias), grads)]
        loss, rows, plan, flat = F.compute(
            "logits" if entry == "logits" else "linear", *leaves,
            targets, position_ids, done, is_expert, num_items, opts, backend=kw["backend"],
            preset=kw["preset"], chunk_size=kw["chunk_size"],
            want_metrics=kw["return_metrics"])
        wanted = [t for t, g in zip(leaves, grads) if g]
        got = iter(torch.autograd.grad(loss, wanted, upstream, materialize_grads=True)
                   if wanted else ())
        out_grads = [next(got) if g else None for g in grads]
    rewards = F.rewards(rows, plan, flat) if entry == "rewards" else None
    metrics = None
    if kw["return_metrics"]:
        m = F.row_metrics(rows, plan, opts)
        metrics = torch.stack([m[k] for k in METRICS])
    return loss.detach(), rewards, metrics, out_grads


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


def _grad_like(t: Tensor, g: Tensor) -> Tensor:
    """The gradient of ``t`` with the strides of ``torch.empty_like(t)``, which the
    fake implementation promises (compiled code relies on them)."""
    out = torch.empty_like(t)
    if g.stride() == out.stride():
        return g
    return out.copy_(g)


def _outputs(main, targets, kw, grads, weight, bias, loss=None, rewards=None, metrics=None,
             d=(None, None, None)):
    """The op's six outputs; what is not given is allocated empty (fake mode) or as
    a (0,) placeholder."""
    acc = acc_dtype(main.dtype)
    if kw["entry"] == "rewards":
        loss = _empty(main)
    elif loss is None:
        shape = tuple(targets.shape) if kw["reduction"] == "none" else ()
        loss = main.new_empty(shape)
    if kw["entry"] != "rewards":
        rewards = _empty(main, acc)
    elif rewards is None:
        rewards = main.new_empty(tuple(targets.shape), dtype=acc)
    if not kw["return_metrics"]:
        metrics = _empty(main, acc)
    elif metrics is None:
        metrics = main.new_empty((len(METRICS),), dtype=acc)
    gs = []
    for t, g, got in zip((main, weight, bias), grads, d):
        gs.append(_empty(main) if not g else
                  (torch.empty_like(t) if got is None else _grad_like(t, got)))
    return (loss.contiguous(), rewards.contiguous(), metrics, *gs)


@torch.library.custom_op("fastirl::iq_loss_fused", mutates_args=())
def _fused(main: Tensor, weight: Tensor | None, bias: Tensor | None, targets: Tensor,
           position_ids: Tensor | None, done: Tensor | None, is_expert: Tensor | None,
           num_items: Tensor | None, scalars: Tensor, *, entry: str, ignore_index: int,
           reduction: str, divergence: str, value_term: str | None, td_rows: str,
           detach_next_value: bool, backend: str, preset: str, chunk_size: int | None,
           return_metrics: bool, grads: list[bool]
           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    kw = dict(entry=entry, ignore_index=ignore_index, reduction=reduction,
              divergence=divergence, value_term=value_term, td_rows=td_rows,
              detach_next_value=detach_next_value, backend=backend, preset=preset,
              chunk_size=chunk_size, return_metrics=return_metrics)
    loss, rewards, metrics, d = _run(entry, main, weight, bias, targets, position_ids, done,
                                     is_expert, num_items, scalars, kw, grads)
    return _outputs(main, targets, kw, grads, weight, bias, loss, rewards, metrics, d)


@_fused.register_fake
def _fused_fake(main, weight, bias, targets, position_ids, done, is_expert, num_items, scalars,
                **kw):
    return _outputs(main, targets, kw, kw["grads"], weight, bias)


@torch.library.custom_op("fastirl::iq_loss_fused_backward", mutates_args=())
def _fused_backward(grad: Tensor, main: Tensor, weight: Tensor | None, bias: Tensor | None,
                    targets: Tensor, position_ids: Tensor | None, done: Tensor | None,
                    is_expert: Tensor | None, num_items: Tensor | None, scalars: Tensor, *,
                    entry: str, ignore_index: int, reduction: str, divergence: str,
                    value_term: str | None, td_rows: str, detach_next_value: bool,
                    backend: str, preset: str, chunk_size: int | None, return_metrics: bool,
                    grads: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    kw = dict(ignore_index=ignore_index, reduction=reduction, divergence=divergence,
              value_term=value_term, td_rows=td_rows, detach_next_value=detach_next_value,
              backend=backend, preset=preset, chunk_size=chunk_size, return_metrics=False)
    *_, d = _run(entry, main, weight, bias, targets, position_ids, done, is_expert, num_items,
                 scalars, kw, grads, upstream=grad)
    return tuple(_empty(main) if g is None else _grad_like(t, g)
                 for t, g in zip((main, weight, bias), d))


@_fused_backward.register_fake
def _fused_backward_fake(grad, main, weight, bias, targets, position_ids, done, is_expert,
                         num_items, scalars, **kw):
    return tuple(torch.empty_like(t) if g else _empty(main)
                 for t, g in zip((main, weight, bias), kw["grads"]))


_N_INPUTS = 9          # positional inputs of iq_loss_fused


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    kw = dict(keyword_only_inputs)
    ctx.kw = kw
    ctx.precomputed = kw["reduction"] != "none"
    ctx.mark_non_differentiable(*output[1:])
    if ctx.precomputed:          # gradients of the scalar loss, from the forward pass
        ctx.save_for_backward(*output[3:])
    else:
        ctx.save_for_backward(*inputs)


def _backward(ctx, grad_loss, *unused):
    need = list(ctx.needs_input_grad[:3])
    if ctx.precomputed:
        out = [g * grad_loss.to(g.dtype) if n else None
               for g, n in zip(ctx.saved_tensors, need)]
    else:
        kw = dict(ctx.kw, grads=need)
        d = _fused_backward(grad_loss, *ctx.saved_tensors, **kw)
        out = [g if n else None for g, n in zip(d, need)]
    return (*out, *([None] * (_N_INPUTS - 3)))


_fused.register_autograd(_backward, setup_context=_setup_context)


def _scalars(opts: IQOptions) -> Tensor:
    """The four hyper-parameters and whether softcap is set, as one float64 CPU
    tensor; 0-d tensors among them stay graph inputs, numbers become constants."""
    values = [getattr(opts, name) for name in HYPER]
    has_softcap = values[-1] is not None
    values[-1] = values[-1] if has_softcap else 1.0
    values.append(float(has_softcap))
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device="cpu").reshape(())
                        for v in values])


def call(entry: str, main, weight, bias, targets, position_ids, done, is_expert, num_items,
         opts: IQOptions, *, backend: str, preset: str, chunk_size: int | None,
         return_metrics: bool):
    """Runs an entry point ("linear", "logits" or "rewards") through the op, after
    the caller's type and shape checks.  Returns what the public function returns."""
    if num_items is not None and not isinstance(num_items, Tensor):
        num_items = torch.tensor(float(num_items), dtype=torch.float64)
    differentiable = entry != "rewards" and opts.reduction != "none" and torch.is_grad_enabled()
    grads = [differentiable and t is not None and t.requires_grad for t in (main, weight, bias)]
    out = _fused(main, weight, bias, targets, position_ids, done, is_expert, num_items,
                 _scalars(opts), entry=entry, ignore_index=opts.ignore_index,
                 reduction=opts.reduction, divergence=opts.divergence,
                 value_term=opts.value_term, td_rows=opts.td_rows,
                 detach_next_value=opts.detach_next_value, backend=backend, preset=preset,
                 chunk_size=chunk_size, return_metrics=return_metrics, grads=grads)
    loss, rewards, metrics = out[:3]
    if entry == "rewards":
        return rewards
    if return_metrics:
        return loss, dict(zip(METRICS, metrics.unbind()))
    return loss
