"""Vocabulary (tensor) parallelism of the fused loss: a backend wrapper.

Each rank of a process group holds a contiguous shard ``[start, start + V_r)``
of the LM head's rows (Megatron-style ``ColumnParallelLinear`` over the
vocabulary; shards may be uneven but none may be empty, ranks in rank order),
the *same* hidden states and the *same* global targets::

    loss = fastirl.iq_loss(hidden, weight_shard, targets, bias=bias_shard,
                           process_group=tp_group, **options)
    # or, with an extra cross-rank consistency check of the batch:
    loss = fastirl.distributed.vocab_parallel_iq_loss(hidden, weight_shard, targets,
                                                      process_group=tp_group, **options)

Every rank gets the same loss (and metrics), the full ``dL/dhidden`` (already
summed over the shards: do not all-reduce it again), and the gradient of its own
weight / bias shard.  The objective is identical to the single-process loss on
the gathered weight, for every option.

How (:class:`VocabParallelBackend`, a wrapper around the local backend): per
chunk of rows each rank computes the statistics of its shard (soft value V_r,
target logit q_r, entropy H_r, max logit and its argmax) and all ranks
all-gather them, O(world * rows) numbers and never O(rows * vocab).  Every rank
then combines them identically:

    V = tau * log sum_r exp(V_r / tau)            w_r = exp((V_r - V) / tau)
    q = sum_r q_r                                 (only the owner's q_r is non-zero)
    H = sum_r w_r (H_r - (V_r - V) / tau)         (w_r is the shard's policy mass)
    argmax: of the first rank holding the largest max logit (first occurrence)

The backward pass of a chunk asks the local backend for
``dz = dL/dV * exp((z - V) / tau) + dL/dq * onehot`` over the shard (the global
softmax restricted to the shard; in single-pass mode the kept logits block is
rescaled by w_r rather than recomputed), accumulates dW / db of the shard
locally, and all-reduces dx (float32 for low-precision inputs), O(rows * H)
per chunk.  Collectives per loss call: one tiny all-gather of the shard sizes,
one of the row count (before the first chunk), one per forward chunk and one
per backward chunk.

Every rank must make the same calls: same targets (and position_ids, done,
is_expert, num_items_in_batch), same hidden shape, dtype and requires_grad,
same options.  Cheap checks raise a ``ValueError`` on every rank instead of
hanging where they can: shard sizes / hidden size / dtype of the weight (in
:func:`vocab_parallel`) and the number of active rows / chunking (before the
first chunk).  ``fastirl.iq_loss(process_group=...)`` also sends a fingerprint of
the whole batch (shapes, dtype, requires_grad and checksums of targets,
position_ids, done, is_expert, num_items_in_batch) with its first all-gather,
before anything data-dependent, which also catches a rank whose batch has no
action row while another's has some.  Callers that build the backend
themselves get the same check from ``vocab_parallel(..., batch=dict(...))``;
give your process group a ``timeout`` all the same.

This module sits below :mod:`fastirl.functional` (which calls
:func:`shard_call` once every local check of a call has passed, or
:func:`fail_together` when one failed, so that no rank waits in a collective
for a rank that raised); the user-facing names are re-exported by
:mod:`fastirl.distributed`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from .backends import resolve_backend
from .backends.base import Backend, LogitSpec, RowStats
from .backends.merge import combine

__all__ = ["vocab_parallel", "VocabParallelBackend", "check_same_batch", "shard_call",
           "fail_together"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_PREFIX = "fastirl vocab-parallel: "


# --------------------------------------------------------------------------- collectives

def _comm_device(group, device: torch.device) -> torch.device:
    """The device to run a collective of a tensor living on ``device`` on: its
    own, except CPU tensors on an NCCL-only group (they go to the current GPU)."""
    if device.type == "cpu":
        try:
            name = str(dist.get_backend(group)).lower()
        except (RuntimeError, ValueError):
            name = ""
        if "nccl" in name and "gloo" not in name and "cpu" not in name:
            return torch.device("cuda", torch.cuda.current_device())
    return device


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """(world, *t.shape): t of every rank, in rank order."""
    device = t.device
    work = t.to(_comm_device(group, device)).reshape(-1).contiguous()
    world = dist.get_world_size(group)
    out = work.new_empty(world * work.numel())      # 1-d: "stack" and "cat" layouts agree
    _gather_single(out, work, group=group)
    return out.view(world, *t.shape).to(device)


# torch >= 2.12 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    device = t.device
    work = t.to(_comm_device(group, device))
    dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
    return work.to(device)


def _gather_ints(values: list[int], device: torch.device, group) -> list[list[int]]:
    """[[values of rank 0], [values of rank 1], ...] for a fixed-length int list."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    return _all_gather(t, group).tolist()


def _disagree(rows: list[Any]) -> str:
    return ", ".join(f"rank {r}: {v}" for r, v in enumerate(rows))


def _check_group(group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(_PREFIX + "torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
    if group is None:
        raise ValueError(_PREFIX + "process_group must be a ProcessGroup "
                         "(e.g. torch.distributed.group.WORLD), got None")


# --------------------------------------------------------------------------- backend

# Largest vocabulary whose ids are exact in the statistics dtype.
_EXACT_INT = {torch.float32: 1 << 24, torch.float64: 1 << 53}


class VocabParallelBackend:
    """A :class:`~fastirl.backends.base.Backend` over one contiguous vocabulary
    shard that returns the statistics and hidden-state gradients of the *whole*
    vocabulary (see the module docstring).  Build it with :func:`vocab_parallel`.

    ``targets`` given to it are global ids; ``weight`` / ``bias`` / ``dweight`` /
    ``dbias`` are the shard's."""

    def __init__(self, inner: Backend, group, start: int, sizes: list[int]):
        self.inner = inner
        self.group = group
        self.sizes = list(sizes)
        self.start = start
        self.stop = start + sizes[dist.get_rank(group)]
        self.vocab = sum(sizes)
        self.world = len(sizes)
        self.name = f"vocab_parallel({inner.name})"
        self.dtypes = inner.dtypes

    def __repr__(self) -> str:
        return (f"VocabParallelBackend(inner={self.inner.name!r}, shard=[{self.start}, "
                f"{self.stop}) of {self.vocab}, world={self.world})")

    def supports(self, device: torch.device) -> bool:
        return self.inner.supports(device)

    def _local(self, targets: torch.Tensor) -> torch.Tensor:
        own = (targets >= self.start) & (targets < self.stop)
        return torch.where(own, targets - self.start, torch.full_like(targets, -1))

    def rows_per_chunk(self, n: int, vocab: int, hidden: int, dtype: torch.dtype,
                       chunk_size: int | None) -> int:
        # Called once per loss call, before the first chunk, on every rank with
        # n > 0: the place to check that all ranks will make the same calls.
        device = torch.device("cpu")
        mine = [n, hidden, _DTYPES.index(dtype) if dtype in _DTYPES else -1,
                -1 if chunk_size is None else int(chunk_size), int(torch.is_grad_enabled())]
        rows = _gather_ints(mine, device, self.group)
        names = ("number of active rows (action rows and the rows they bootstrap from)",
                 "hidden size", "dtype", "chunk_size", "grad mode")
        for i, name in enumerate(names):
            if len({r[i] for r in rows}) > 1:
                shown = [r[i] if i != 2 else (str(_DTYPES[r[i]]) if r[i] >= 0 else "?")
                         for r in rows]
                raise ValueError(
                    _PREFIX + f"ranks disagree on the {name} ({_disagree(shown)}); "
                    "every rank of the vocabulary-parallel group must pass the same hidden "
                    "shape and dtype, the same targets / position_ids / done and options")
        # Chunking from the largest shard: identical on every rank.
        return self.inner.rows_per_chunk(n, max(self.sizes), hidden, dtype, chunk_size)

    def block_itemsize(self, dtype: torch.dtype) -> int:
        return self.inner.block_itemsize(dtype)

    def forward(self, x, weight, bias, targets, spec: LogitSpec, *, keep: bool):
        st, state = self.inner.forward(x, weight, bias, self._local(targets), spec, keep=keep)
        value = st.value
        fdt = value.dtype
        fields = [value, st.target_logit.to(fdt)]
        if spec.entropy:
            fields.append(st.entropy.to(fdt))
        if spec.logit_sum:
            fields.append(st.logit_sum.to(fdt))
        ids_apart = spec.argmax and self.vocab > _EXACT_INT[fdt]
        if spec.argmax:
            fields.append(st.max_logit.to(fdt))
            if not ids_apart:       # global ids are exact in fdt: one collective for all
                fields.append((st.argmax + self.start).to(fdt))
        g = _all_gather(torch.stack(fields), self.group)   # (world, fields, n)
        cols = iter(range(2, g.shape[1]))
        pick = lambda on: [None] * self.world if not on else list(g[:, next(cols)])  # noqa: E731
        ent, lsum, maxl = pick(spec.entropy), pick(spec.logit_sum), pick(spec.argmax)
        ids = [None] * self.world
        if spec.argmax:
            ids = list(_all_gather(st.argmax + self.start, self.group) if ids_apart
                       else g[:, next(cols)].to(torch.int64))
        stats = combine([RowStats(g[r, 0], g[r, 1], ent[r], ids[r], maxl[r], logit_sum=lsum[r])
                         for r in range(self.world)], spec.temperature)
        # keep=True: the inner state belongs to the shard's own value V_r
        return stats, (state, value) if keep else None

    def backward(self, x, weight, bias, targets, value, grad_value, grad_target,
                 spec: LogitSpec, state: Any, *, need_x, dweight, dbias, **uniform):
        # dz = g * exp((z - V)/tau) = (g * w_r) * exp((z - V_r)/tau): with a kept
        # block, hand the inner backend its own V_r and the rescaled coefficient.
        if state is None:
            inner_state, v_in, g_in = None, value, grad_value
        else:
            inner_state, v_local = state
            g_in = grad_value * torch.exp((v_local - value) / spec.temperature)
            v_in = v_local
        dx = self.inner.backward(x, weight, bias, self._local(targets), v_in, g_in, grad_target,
                                 spec, inner_state, need_x=need_x, dweight=dweight, dbias=dbias,
                                 **uniform)     # grad_sum: per column, the same on every shard
        if not need_x:
            return None
        red = dx if dx.dtype in (torch.float32, torch.float64) else dx.float()
        red = _all_reduce_sum(red, self.group)
        return red if red.dtype == dx.dtype else red.to(dx.dtype)

    def logits_forward(self, logits, targets, spec):
        raise NotImplementedError(_PREFIX + "logits input is not supported; use "
                                  "fastirl.iq_loss with the weight shard")

    def logits_backward(self, *args, **kwargs):
        raise NotImplementedError(_PREFIX + "logits input is not supported; use "
                                  "fastirl.iq_loss with the weight shard")


def vocab_parallel(group, weight_shard: torch.Tensor, backend_name: "str | Backend" = "auto",
                   *, batch: dict | None = None, ce_weight: torch.Tensor | None = None,
                   failed: BaseException | None = None,
                   dtype: torch.dtype | None = None) -> tuple[VocabParallelBackend, int]:
    """The vocabulary-parallel backend of this rank and the global vocabulary size.

    ``weight_shard`` (V_r, H) is this rank's contiguous block of LM-head rows;
    shards are laid out in rank order of ``group``.  One all-gather of
    (V_r, H, dtype, requires_grad) per call; raises ``ValueError`` on every rank if
    they disagree on H, dtype or requires_grad, or if a shard is empty.

    ``batch`` (optional): ``dict(hidden=..., targets=..., position_ids=...,
    done=..., is_expert=..., num_items_in_batch=...)``; its fingerprint (see
    :func:`check_same_batch`) rides in the same all-gather and is compared too,
    as does the length of ``ce_weight`` (it must be the global vocabulary).
    ``failed``: this rank's own checks raised ``failed``; it still takes part in
    the all-gather, so that every rank raises instead of waiting for it.
    ``dtype``: the GEMMs' dtype (default: the weight shard's), which picks the
    inner backend as :func:`fastirl.backends.resolve_backend` does.
    """
    _check_group(group)
    if failed is None:
        if isinstance(backend_name, VocabParallelBackend):
            failed = ValueError(_PREFIX + "backend is already vocabulary-parallel")
        elif not isinstance(weight_shard, torch.Tensor) or weight_shard.dim() != 2:
            shape = tuple(weight_shard.shape) if isinstance(weight_shard, torch.Tensor) else None
            failed = ValueError(_PREFIX + f"weight shard must be a 2-d (V_local, H) tensor, got "
                                f"{shape if shape is not None else type(weight_shard).__name__}")
    device = weight_shard.device if isinstance(weight_shard, torch.Tensor) else (
        batch["hidden"].device if batch and isinstance(batch.get("hidden"), torch.Tensor)
        else torch.device("cpu"))
    if failed is not None:
        mine = torch.zeros(6 + _FP_LEN, dtype=torch.int64, device=device)
        mine[4] = 1
    else:
        V, H = weight_shard.shape
        dt = _DTYPES.index(weight_shard.dtype) if weight_shard.dtype in _DTYPES else -1
        ce = -1 if ce_weight is None else ce_weight.shape[0]
        fp = (_fingerprint(**batch).to(device) if batch is not None
              else torch.zeros(_FP_LEN, dtype=torch.int64, device=device))
        mine = torch.cat([torch.tensor([V, H, dt, int(weight_shard.requires_grad), 0, ce],
                                       dtype=torch.int64, device=device), fp])
    rows = _all_gather(mine, group).tolist()       # one collective, one host sync
    if failed is not None:
        raise failed
    bad = [r for r, row in enumerate(rows) if row[4]]
    if bad:
        raise ValueError(_PREFIX + f"rank(s) {bad} of the vocabulary-parallel group failed their "
                         f"input checks (see the error raised there); every rank stops")
    sizes = [r[0] for r in rows]
    if any(s < 1 for s in sizes):
        raise ValueError(_PREFIX + f"every rank needs a non-empty vocabulary shard; shard "
                         f"sizes are {sizes}")
    for i, name in ((1, "hidden size (weight.shape[1])"), (2, "weight dtype"),
                    (3, "weight.requires_grad")):
        if len({r[i] for r in rows}) > 1:
            shown = [r[i] if i != 2 else (str(_DTYPES[r[i]]) if r[i] >= 0 else "?")
                     for r in rows]
            raise ValueError(_PREFIX + f"ranks disagree on the {name}: "
                             f"{_disagree(shown)}")
    if any(r[5] not in (-1, sum(sizes)) for r in rows):
        raise ValueError(_PREFIX + f"ce_weight must have one weight per global vocabulary entry "
                         f"({sum(sizes)}); lengths by rank: {_disagree([r[5] for r in rows])}")
    if batch is not None:
        _check_fingerprints([r[6:] for r in rows])
    rank = dist.get_rank(group)
    start = sum(sizes[:rank])
    inner = resolve_backend(backend_name, weight_shard.device, dtype or weight_shard.dtype)
    return VocabParallelBackend(inner, group, start, sizes), sum(sizes)


def _batch_of(call) -> dict:
    return dict(hidden=call.main, targets=call.targets, position_ids=call.position_ids,
                done=call.done, is_expert=call.is_expert, num_items_in_batch=call.num_items)


def shard_call(call, group):
    """``call`` (a checked :class:`fastirl.compute.Call` of a weight shard) with the
    vocabulary-parallel backend and the global vocabulary; every rank agrees on
    the shards and the batch first (one all-gather)."""
    backend, vocab = vocab_parallel(group, call.weight, call.run.backend, batch=_batch_of(call),
                                    ce_weight=call.iq.ce_weight,
                                    dtype=call.compute_dtype or call.main.dtype)
    return replace(call, backend=backend, vocab=vocab)


def fail_together(group, error: BaseException, hidden=None) -> None:
    """Raises ``error`` after telling the other ranks (which raise too)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        raise error
    vocab_parallel(group, None, batch={"hidden": hidden}, failed=error)


# --------------------------------------------------------------------------- batch check

_P = 2147483647                    # 2^31 - 1: every product below stays under 2^62
_K = 1103515245                    # and every sum under 2^63 (no int64 overflow)


def _checksum(t: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if t is None:
        return torch.full((), -1, dtype=torch.int64, device=device)
    flat = torch.remainder(t.detach().reshape(-1).to(device=device, dtype=torch.int64) + 3, _P)
    pos = torch.arange(flat.numel(), dtype=torch.int64, device=device)
    weight = torch.remainder(torch.remainder(pos, _P) * _K + 12345, _P) + 1
    return torch.remainder(flat * weight, _P).sum()


def _fingerprint(hidden, targets, position_ids=None, done=None, is_expert=None,
                 num_items_in_batch=None) -> torch.Tensor:
    """(12,) int64 on hidden's device, built without a host sync."""
    dev = hidden.device
    shape = list(hidden.shape)[:3] + [-1] * (3 - min(hidden.dim(), 3))
    tshape = list(targets.shape)[:2] + [-1] * (2 - min(targets.dim(), 2))
    dt = _DTYPES.index(hidden.dtype) if hidden.dtype in _DTYPES else -1
    head = torch.tensor([*shape, dt, int(hidden.requires_grad), *tshape], dtype=torch.int64,
                        device=dev)
    ni = num_items_in_batch
    if ni is None:
        ni = torch.full((), -1, dtype=torch.int64, device=dev)
    else:                     # the float64 bits of the count
        ni = torch.as_tensor(ni).detach().reshape(()).to(device=dev, dtype=torch.float64)
        ni = ni.view(torch.int64)
    sums = [_checksum(t, dev) for t in (targets, position_ids, done, is_expert)]
    return torch.cat([head, torch.stack([*sums, ni])])


_FP_LEN = 12
_FP_NAMES = ("hidden shape", "hidden shape", "hidden shape", "hidden dtype",
             "hidden.requires_grad", "targets shape", "targets shape", "targets",
             "position_ids", "done", "is_expert", "num_items_in_batch")


def check_same_batch(group, hidden: torch.Tensor, targets: torch.Tensor, *,
                     position_ids=None, done=None, is_expert=None,
                     num_items_in_batch=None) -> None:
    """Raises ``ValueError`` on every rank of ``group`` unless all ranks hold the
    same hidden shape / dtype / requires_grad and identical targets,
    position_ids, done, is_expert and num_items_in_batch (one all-gather of a
    few integers; tensors are compared by a position-weighted checksum modulo
    2^31 - 1, computed on their device without a host sync)."""
    _check_group(group)
    mine = _fingerprint(hidden, targets, position_ids, done, is_expert, num_items_in_batch)
    _check_fingerprints(_all_gather(mine, group).tolist())


def _check_fingerprints(rows: list[list[int]]) -> None:
    bad = sorted({_FP_NAMES[i] for i in range(len(rows[0])) if len({r[i] for r in rows}) > 1})
    if bad:
        detail = ""
        if "hidden shape" in bad or "targets shape" in bad:
            detail = " (hidden shapes: " + _disagree([
                tuple(x for x in r[:3] if x >= 0) for r in rows]) + ")"
        raise ValueError(_PREFIX + f"ranks disagree on {', '.join(bad)}{detail}; every rank "
                         "of the vocabulary-parallel group must pass the same batch")


