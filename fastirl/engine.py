"""Chunked autograd engine: per-row statistics in, per-row coefficients out.

Two autograd functions drive any backend (see :mod:`fastirl.backends.base`):

* ``_RowStats`` (recompute mode): forward returns V and q of the active rows;
  the objective runs over them with ordinary autograd, and backward hands
  (dL/dV, dL/dq) to the backend, which recomputes each logits chunk.  Used for
  reduction="none" and for iq_loss_from_logits.
* ``_SinglePass``: when the loss is a scalar and gradients are wanted, each
  chunk's gradients are formed during forward from the logits block that is
  already there (three GEMMs instead of four).  The objective couples a row
  only to the next one, so a chunk needs V of one look-ahead row, and passes
  dL/dV of that row (from the TD term of its own last row) on to the next chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import objective as obj
from .backends import LogitSpec, resolve_backend, scratch
from .backends.base import Backend, RowStats, acc_dtype
from .backends.hardware import hardware_for
from .backends.merge import combine
from .memory import MemoryPlan
from .memory import plan as memory_plan
from .options import IQOptions, RunOptions


@dataclass(frozen=True)
class Preset:
    """Named precision / speed trade-off.

    upcast: run every GEMM on float32 copies of low-precision inputs (exact
        logits, at the cost of a float32 copy of the weight).
    deterministic: bitwise-reproducible weight gradients (no atomics).
    """

    upcast: bool = False
    deterministic: bool = True


PRESETS: dict[str, Preset] = {
    "default": Preset(),
    "fast": Preset(deterministic=False),
    "highest": Preset(upcast=True),
}


@dataclass
class _Job:
    backend: Backend
    spec: LogitSpec
    plan: obj.RowPlan
    opts: IQOptions
    chunk: int
    dtype: torch.dtype | None = None     # the GEMMs' dtype (rows are cast to it per chunk)
    memory: "MemoryPlan | None" = None   # "slabs": the gradients of a recompute backward
                                         # by vocabulary slabs (fastirl.memory)
    # Filled by forward: statistics that are not differentiable outputs.
    extras: dict[str, Any] = field(default_factory=dict)

    def chunks(self, lookahead: bool = False):
        """(start, stop, stop_with_lookahead) over the active rows.  With
        ``lookahead`` every chunk but the last takes the next chunk's first row
        too, whether its last row bootstraps from it or not (d = 0 zeroes its
        use): knowing which would cost a host read of the plan."""
        n, c = self.plan.n, self.chunk
        for s in range(0, n, c):
            e = min(s + c, n)
            yield s, e, e + 1 if lookahead and e < n else e

    def rows(self, t: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """Rows [s, e) of the active list taken from a (B*T, ...) tensor, in the
        GEMMs' dtype, as a block whose rows are unit-stride and distinct: a
        strided view (stride(1) != 1, even where size-1 dimensions make it
        "contiguous") or an expanded one (rows sharing memory) is copied, one
        chunk at a time."""
        if self.plan.index is not None:
            rows = t.index_select(0, self.plan.index[s:e])
        else:
            rows = t[s:e]
            if rows.dim() == 2 and rows.shape[1] > 0 and (
                    rows.stride(1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < rows.shape[1])):
                rows = rows.new_empty(rows.shape).copy_(rows)
        return rows if self.dtype is None or rows.dtype == self.dtype else rows.to(self.dtype)

    def add(self, out: torch.Tensor, s: int, e: int, rows: torch.Tensor) -> None:
        """out[rows s..e of the active list] += rows."""
        if self.plan.index is None:
            out[s:e].add_(rows)
        else:
            out.index_add_(0, self.plan.index[s:e], rows.to(out.dtype))

    def put(self, out: torch.Tensor, s: int, e: int, rows: torch.Tensor) -> None:
        if self.plan.index is None:
            out[s:e].copy_(rows)
        else:
            out.index_copy_(0, self.plan.index[s:e], rows.to(out.dtype))


def _cat(parts: list[torch.Tensor | None], empty: torch.Tensor) -> torch.Tensor | None:
    if not parts:
        return empty.clone()        # a tensor of its own (outputs must not alias each other)
    return None if parts[0] is None else torch.cat(parts)


def _collect(stats: list[RowStats], device, dtype) -> dict[str, torch.Tensor | None]:
    f32 = torch.zeros(0, dtype=dtype, device=device)
    return {
        "value": _cat([s.value for s in stats], f32),
        "target_logit": _cat([s.target_logit for s in stats], f32),
        "logit_sum": _cat([s.logit_sum for s in stats], f32),
        "entropy": _cat([s.entropy for s in stats], f32),
        "argmax": _cat([s.argmax for s in stats], torch.zeros(0, dtype=torch.long, device=device)),
        "max_logit": _cat([s.max_logit for s in stats], f32),
    }


def _grad_buffers(job: _Job, x, weight, bias, need):
    """dx in x's dtype; dW / db accumulators in float32 (float64 for float64)."""
    need_x, need_w, need_b = need
    dx = torch.zeros_like(x) if need_x else None
    acc = acc_dtype(job.dtype or weight.dtype)
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    db = (torch.zeros(bias.shape, dtype=acc, device=bias.device)
          if need_b and bias is not None else None)
    return dx, dw, db


def _finish(dw, weight, db, bias):
    """The accumulators in the parameters' own dtypes (float32 master weights
    under autocast keep the float32 sums)."""
    return (None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


def _operands(job: _Job, weight, bias):
    """weight and bias in the GEMMs' dtype (a copy only under autocast / "highest")."""
    cast = lambda t: None if t is None else (  # noqa: E731
        t if job.dtype is None or t.dtype == job.dtype else t.to(job.dtype))
    return cast(weight).contiguous(), cast(bias)


def _zeros(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if t is None else t.to(like.dtype)


def _slabs(job: _Job, V: int):
    """(v0, v1) of the vocabulary slabs of the "slabs" plan."""
    for v0 in range(0, V, job.memory.slab):
        yield v0, min(V, v0 + job.memory.slab)


def _local(targets: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
    """Targets as columns of the slab [v0, v1), -1 where another slab holds them."""
    return torch.where((targets >= v0) & (targets < v1), targets - v0,
                       torch.full_like(targets, -1))


@scratch.scope()
def _slab_stats(job: _Job, x, w, b) -> list[RowStats]:
    """The statistics pass of the "slabs" plan: per slab, per block of rows; the
    slabs' statistics combine into those of the whole vocabulary."""
    acc = acc_dtype(job.dtype or x.dtype)
    whole = None
    for v0, v1 in _slabs(job, w.shape[0]):
        parts = []
        for s, e, _ in job.chunks():
            st, _ = job.backend.forward(job.rows(x, s, e), w[v0:v1],
                                        None if b is None else b[v0:v1],
                                        _local(job.plan.targets[s:e], v0, v1), job.spec,
                                        keep=False)
            if st.argmax is not None:
                st.argmax = st.argmax + v0
            parts.append(st)
        out = _collect(parts, x.device, acc)
        slab = RowStats(out["value"], out["target_logit"], out["entropy"], out["argmax"],
                        out["max_logit"], logit_sum=out["logit_sum"])
        whole = slab if whole is None else combine([whole, slab], job.spec.temperature)
    return [whole]


class _RowStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, job: _Job, x, weight, bias):
        w, b = _operands(job, weight, bias)
        if job.memory is not None and job.memory.mode == "slabs" and job.plan.n:
            stats = _slab_stats(job, x, w, b)
        else:
            with scratch.scope():
                stats = [job.backend.forward(job.rows(x, s, e), w, b, job.plan.targets[s:e],
                                             job.spec, keep=False)[0] for s, e, _ in job.chunks()]
        out = _collect(stats, x.device, acc_dtype(job.dtype or x.dtype))
        job.extras.update(entropy=out["entropy"], argmax=out["argmax"])
        ctx.job = job
        ctx.save_for_backward(x, weight, bias, out["value"])
        return out["value"], out["target_logit"], out["logit_sum"]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value, grad_target, grad_sum):
        job: _Job = ctx.job
        x, weight, bias, value = ctx.saved_tensors
        w, b = _operands(job, weight, bias)
        grad_value, grad_target = _zeros(grad_value, value), _zeros(grad_target, value)
        if job.memory is not None and job.memory.mode == "slabs":
            return (None, *_slab_backward(job, ctx.needs_input_grad[1:], x, weight, bias, w, b,
                                          value, grad_value, grad_target, grad_sum))
        dx, dw, db = _grad_buffers(job, x, weight, bias, ctx.needs_input_grad[1:])
        with scratch.scope():         # closed before dW is made from its accumulator
            for s, e, _ in job.chunks():
                dx_c = job.backend.backward(job.rows(x, s, e), w, b, job.plan.targets[s:e],
                                            value[s:e], grad_value[s:e], grad_target[s:e],
                                            job.spec, None, need_x=dx is not None, dweight=dw,
                                            dbias=db, **_sum_kw(grad_sum, s, e))
                if dx is not None:
                    job.put(dx, s, e, dx_c)
        return (None, dx, *_finish(dw, weight, db, bias))


@scratch.scope()
def _slab_backward(job: _Job, need, x, weight, bias, w, b, value, grad_value, grad_target,
                   grad_sum):
    """The "slabs" plan's gradients: per slab of S vocabulary columns, per block
    of r rows, the backend recomputes the (r, S) logits block with the global
    soft values and turns it into dz; dW[slab] accumulates in a float32 (S, H)
    buffer and is written out once, dx accumulates in float32 over the slabs.
    The one-hot term reaches a row only in the slab that holds its target."""
    need_x, need_w, need_b = need
    mp, plan = job.memory, job.plan
    V, H = w.shape
    acc = acc_dtype(job.dtype or x.dtype)
    dx = torch.zeros_like(x) if need_x else None
    # dx accumulates in float32: in dx itself when it is float32 (float64), else in a buffer
    dx_acc = dx if dx is None or x.dtype == acc else torch.zeros((plan.n, H), dtype=acc,
                                                                   device=x.device)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
    db = (torch.zeros(bias.shape, dtype=acc, device=bias.device)
          if need_b and bias is not None else None)
    dw_buf = torch.empty((mp.slab, H), dtype=acc, device=w.device) if need_w else None
    for v0, v1 in _slabs(job, V):
        dw_s = None if dw_buf is None else dw_buf[: v1 - v0].zero_()    # one buffer, reused
        for s, e, _ in job.chunks():
            dx_c = job.backend.backward(job.rows(x, s, e), w[v0:v1],
                                        None if b is None else b[v0:v1],
                                        _local(plan.targets[s:e], v0, v1), value[s:e],
                                        grad_value[s:e], grad_target[s:e], job.spec, None,
                                        need_x=need_x, dweight=dw_s,
                                        dbias=None if db is None else db[v0:v1],
                                        **_sum_kw(grad_sum, s, e))
            if dx_acc is dx and dx is not None:
                job.add(dx, s, e, dx_c)
            elif dx is not None:
                dx_acc[s:e].add_(dx_c)
            del dx_c
        if need_w:
            dw[v0:v1].copy_(dw_s)
    if dx is not None and dx_acc is not dx:
        job.put(dx, 0, plan.n, dx_acc)
    return dx, dw, None if db is None else db.to(bias.dtype)


def _sum_kw(grad_sum: torch.Tensor | None, s: int, e: int) -> dict:
    """The uniform-gradient coefficient of label smoothing, when there is one."""
    return {} if grad_sum is None else {"grad_sum": grad_sum[s:e]}


class _SinglePass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, job: _Job, x, weight, bias):
        plan, opts = job.plan, job.opts
        w, b = _operands(job, weight, bias)
        dx, dw, db = _grad_buffers(job, x, weight, bias, ctx.needs_input_grad[1:])
        acc = acc_dtype(job.dtype or x.dtype)
        total = torch.zeros((), dtype=acc, device=x.device)
        stats, rewards = [], []
        carry = None          # dL/dV of this chunk's first row, from the previous chunk
        with scratch.scope():     # closed before dW is made from its accumulator
            for s, e, e_look in job.chunks(lookahead=True):
                k = e - s
                st, state = job.backend.forward(job.rows(x, s, e_look), w, b,
                                                plan.targets[s:e_look], job.spec, keep=True)
                smooth = st.logit_sum is not None
                with torch.enable_grad():
                    q = st.target_logit[:k].detach().requires_grad_()
                    v = st.value.detach().requires_grad_()
                    lsum = st.logit_sum[:k].detach().requires_grad_() if smooth else None
                    loss, r = obj.row_losses(q, v[:k], plan.slice(s, e), opts,
                                             v_after=v[k] if e_look > e else None, logit_sum=lsum)
                    wrt = (q, v, lsum) if smooth else (q, v)
                    got = torch.autograd.grad(loss.sum(), wrt, allow_unused=True,
                                              materialize_grads=True)
                grad_target, grad_value = got[0], got[1]
                if carry is not None:
                    grad_value[0] += carry
                carry = grad_value[k].clone() if e_look > e else None
                pad = lambda g: torch.cat([g, g.new_zeros(e_look - e)])  # noqa: E731
                grad_target = pad(grad_target)
                if e_look > e:                       # the look-ahead row is the next chunk's
                    grad_value[k] = 0
                extra = {"grad_sum": pad(got[2])} if smooth else {}
                dx_c = job.backend.backward(job.rows(x, s, e_look), w, b,
                                            plan.targets[s:e_look], st.value, grad_value,
                                            grad_target, job.spec, state,
                                            need_x=dx is not None, dweight=dw, dbias=db, **extra)
                if dx is not None:
                    job.put(dx, s, e, dx_c[:k])
                total += loss.detach().sum()
                stats.append(RowStats(st.value[:k], st.target_logit[:k],
                                      None if st.entropy is None else st.entropy[:k],
                                      None if st.argmax is None else st.argmax[:k],
                                      logit_sum=st.logit_sum[:k] if smooth else None))
                rewards.append(r.detach())
                del state, dx_c       # free this chunk's logits block before the next one
        out = _collect(stats, x.device, acc)
        out["reward"] = _cat(rewards, torch.zeros(0, dtype=acc, device=x.device))
        job.extras.update(out)
        # Saved like any tensor autograd keeps: freed by the first backward unless
        # it passes retain_graph=True (then a second backward works; without it,
        # autograd's own "backward through the graph a second time" error).
        ctx.save_for_backward(dx, *_finish(dw, weight, db, bias))
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grads = ctx.saved_tensors
        # One host read: scaling dW by an upstream gradient of 1 would be a pass over
        # the whole weight gradient (and a copy of it, which a retained graph needs).
        if not torch.equal(grad_out, torch.ones_like(grad_out)):
            grads = tuple(None if g is None else g * grad_out.to(g.dtype) for g in grads)
        return (None, *grads)


PRECISE = (torch.float32, torch.float64)


def _gemm_dtype(dtype: torch.dtype, preset: Preset) -> torch.dtype:
    """bf16 / fp16 GEMMs run on float32 copies with preset "highest"."""
    return torch.float32 if preset.upcast and dtype not in PRECISE else dtype


def _spec(opts: IQOptions, preset: Preset, want_metrics: bool, logit_sum: bool) -> LogitSpec:
    return LogitSpec(temperature=opts.temperature, softcap=opts.softcap,
                     deterministic=preset.deterministic, entropy=want_metrics,
                     argmax=want_metrics, logit_sum=logit_sum)


def run_linear(hidden2d, weight, bias, plan: obj.RowPlan, opts: IQOptions, *,
               backend: "str | Backend", run: RunOptions, want_metrics: bool,
               logit_sum: bool = False, compute_dtype: torch.dtype | None = None,
               single_pass: bool | None = None):
    """The IQ loss of flattened rows (B*T, H), GEMMs in ``compute_dtype``
    (default: hidden's).  Returns (loss in the accumulation dtype, per-row
    tensors dict)."""
    preset = PRESETS[run.preset]
    dtype = _gemm_dtype(compute_dtype or hidden2d.dtype, preset)
    be = resolve_backend(backend, hidden2d.device, dtype)
    spec = _spec(opts, preset, want_metrics, logit_sum)
    V, H = weight.shape
    grad = torch.is_grad_enabled()
    need_x, need_w = grad and hidden2d.requires_grad, grad and weight.requires_grad
    wants_grad = need_x or need_w or (grad and bias is not None and bias.requires_grad)
    chunk = be.rows_per_chunk(plan.n, V, H, dtype, run.chunk_size) if plan.n else 1
    mp = None
    if plan.n and run.chunk_size is None and run.memory != "fast":
        mp = memory_plan(plan.n, V, H, dtype, memory=run.memory, need_x=need_x,
                         need_weight=need_w, hardware=hardware_for(hidden2d.device),
                         block_itemsize=be.block_itemsize(dtype),
                         weight_itemsize=weight.element_size(),
                         x_itemsize=hidden2d.element_size(), rows_fast=chunk,
                         slabs_allowed=isinstance(backend, str))
        chunk = mp.rows
    job = _Job(be, spec, plan, opts, chunk, dtype, mp)
    if single_pass is None:
        single_pass = wants_grad and opts.reduction != "none" and (mp is None or mp.mode == "rows")
    if single_pass:
        loss = _SinglePass.apply(job, hidden2d, weight, bias)
        rows = job.extras
    else:
        value, q, lsum = _RowStats.apply(job, hidden2d, weight, bias)
        loss, r = obj.row_losses(q, value, plan, opts, logit_sum=lsum)
        rows = dict(job.extras, value=value, target_logit=q, reward=r, row_loss=loss)
        if opts.reduction != "none":
            loss = loss.sum()
    return loss, rows


class _LogitsRowStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, job: _Job, logits):
        stats = [job.backend.logits_forward(job.rows(logits, s, e), job.plan.targets[s:e],
                                            job.spec) for s, e, _ in job.chunks()]
        out = _collect(stats, logits.device, acc_dtype(logits.dtype))
        job.extras.update(entropy=out["entropy"], argmax=out["argmax"])
        ctx.job = job
        ctx.save_for_backward(logits, out["value"])
        return out["value"], out["target_logit"], out["logit_sum"]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value, grad_target, grad_sum):
        job: _Job = ctx.job
        logits, value = ctx.saved_tensors
        grad_value, grad_target = _zeros(grad_value, value), _zeros(grad_target, value)
        grad = torch.zeros_like(logits)      # the gradient itself: inactive rows stay 0
        for s, e, _ in job.chunks():
            out = grad[s:e] if job.plan.index is None else torch.empty(
                e - s, logits.shape[1], dtype=logits.dtype, device=logits.device)
            job.backend.logits_backward(job.rows(logits, s, e), job.plan.targets[s:e],
                                        value[s:e], grad_value[s:e], grad_target[s:e],
                                        job.spec, out, **_sum_kw(grad_sum, s, e))
            if job.plan.index is not None:
                job.put(grad, s, e, out)
        return None, grad


def run_logits(logits2d, plan: obj.RowPlan, opts: IQOptions, *, backend: "str | Backend",
               run: RunOptions, want_metrics: bool, logit_sum: bool = False):
    """The IQ loss of (B*T, V) logits.  Returns (loss in the accumulation dtype,
    per-row tensors dict)."""
    preset = PRESETS[run.preset]
    if preset.upcast and logits2d.dtype not in PRECISE:
        logits2d = logits2d.float()
    be = resolve_backend(backend, logits2d.device, logits2d.dtype)
    spec = _spec(opts, preset, want_metrics, logit_sum)
    V = logits2d.shape[1]
    chunk = be.rows_per_chunk(plan.n, V, 0, logits2d.dtype, run.chunk_size) if plan.n else 1
    job = _Job(be, spec, plan, opts, chunk)
    value, q, lsum = _LogitsRowStats.apply(job, logits2d)
    loss, r = obj.row_losses(q, value, plan, opts, logit_sum=lsum)
    rows = dict(job.extras, value=value, target_logit=q, reward=r)
    if opts.reduction != "none":
        loss = loss.sum()
    return loss, rows
