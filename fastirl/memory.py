"""The memory planner: how the engine computes a loss within a memory setting.

Working memory is what the loss holds at its peak beyond its inputs and its
outputs (dx, dW and db in the parameters' dtypes).  Two plans compute the same gradients,
both accumulating in float32:

``rows`` (single pass)
    Chunks of c rows; each chunk's (c, V) logits block becomes its gradient in
    place, then dx and dW += dzᵀ x (three GEMMs).  Holds a float32 dW
    accumulator (V·H·4 bytes, unless the weight is float32: then it is the
    output) and one block (c·V·b), freed before dW is made from the
    accumulator.  Per chunk the weight is read twice and
    the accumulator read and written once, so small chunks cost traffic.
``slabs`` (two passes)
    A statistics pass by slabs of S vocabulary columns and blocks of r rows
    (the parts' statistics combine exactly: :mod:`fastirl.backends.merge`),
    the objective, then for each slab and each block of rows: the (r, S)
    logits block is recomputed and turned into its gradient, dW[slab] += dzᵀ x
    in a float32 (S, H) buffer (written out in the weight's dtype once per
    slab) and dx += dz W[slab] into a float32 (N, H) buffer.  Four GEMMs; the
    dW accumulator shrinks to one slab and the dx accumulator (N·H·4, the
    output itself for float32 inputs) takes its place: the lean plan whenever
    N < V.

A setting names a budget for the working memory; the planner takes the plan
its time model (GEMM time at the device's rate, fixed traffic at its
bandwidth: :mod:`fastirl.backends.hardware`) ranks fastest among those that
fit:

* ``"fast"``: no budget: the ``rows`` plan with the backend's own chunk size;
* ``"balanced"``: working memory at most the size of dW in the weight's dtype
  (V·H·itemsize; at least 64 MiB);
* ``"compact"``: at most a quarter of that (at least 16 MiB; less makes the
  slabs so narrow that their launches dominate);

  a setting's budget is at least twice the least working memory any plan
  needs here (the least itself is a plan of tiny slabs, many times slower);
* an int: a budget in bytes; no plan fitting it is an error that says the
  least it can be.

The cost model (:mod:`fastirl.bench.model`) reads the same plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

from .backends import chunking
from .backends.hardware import Hardware

__all__ = ["MemoryPlan", "plan", "budget", "SETTINGS"]

SETTINGS = ("fast", "balanced", "compact")
MIB = 1 << 20
# Blocks narrower or shorter than this stop using the GEMM units well.
MIN_COLUMNS = 128
MIN_ROWS = 16


@dataclass(frozen=True)
class MemoryPlan:
    """mode: "rows" or "slabs"; rows: rows per chunk (of the statistics pass in
    "slabs"); slab: vocabulary columns per slab and slab_rows: rows per block
    of a slab ("slabs" only); work_bytes: modelled working memory; seconds:
    modelled time (for ranking plans, not a prediction)."""

    mode: Literal["rows", "slabs"]
    rows: int
    slab: int = 0
    slab_rows: int = 0
    work_bytes: int = 0
    seconds: float = 0.0


def budget(memory: "str | int", vocab: int, hidden: int, itemsize: int) -> int | None:
    """The working-memory budget in bytes of a setting (None: no budget)."""
    if isinstance(memory, int) and not isinstance(memory, bool):
        return memory
    if memory == "fast":
        return None
    full = vocab * hidden * itemsize
    if memory == "balanced":
        return max(64 * MIB, full)
    if memory == "compact":
        return max(16 * MIB, full // 4)
    raise ValueError(f"memory must be one of {SETTINGS} or a budget in bytes, got {memory!r}")


# A launch on the CPU (an ATen op's dispatch and threading), where the device
# table has no calibrated figure.
CPU_LAUNCH_S = 10e-6


def _rates(hw: Hardware, dtype: torch.dtype) -> tuple[float, float, float]:
    """Achievable GEMM rate, bandwidth and the cost of one launch."""
    cal = hw.calibration
    name = str(dtype).split(".")[-1]
    launch = cal.launch_s or (CPU_LAUNCH_S if hw.kind == "cpu" else 0.0)
    return hw.gemm_flops(name) * cal.gemm, hw.bandwidth * cal.bandwidth, launch


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Launches the engine makes (counted with a dispatch mode on the CPU): per call, per
# chunk of the rows plan, per slab and per (slab, block) of the slabs plan.
LAUNCHES = {"call": 63, "chunk": 20, "slab": 21, "block": 12}


def _rows_plan(n, V, H, isz, bsz, wsz, acc_extra, c, need_x, need_w, P, B, L) -> MemoryPlan:
    k = _cdiv(n, c)
    gemms = 1 + need_x + need_w
    fixed = k * V * H * ((1 + need_x) * isz + (8 if need_w else 0))
    t = (2 * n * H * V * gemms / P + (fixed + 6 * n * V * bsz) / B
         + L * (LAUNCHES["call"] + k * LAUNCHES["chunk"]))
    block = c * V * bsz + (2 * c * H * isz if need_x else 0)
    # dW in the weight's dtype is made from the accumulator at the end, when the
    # block is gone: the block counts only by what it exceeds dW with
    work = acc_extra + (max(0, block - V * H * wsz) if acc_extra else block)
    return MemoryPlan("rows", c, work_bytes=work, seconds=t)


def _slab_plan(n, V, H, isz, bsz, x_extra, w_slab_acc, S, r, need_x, P, B, L) -> MemoryPlan:
    m, k = _cdiv(V, S), _cdiv(n, r)
    flops = 2 * n * H * V * (1 + 2 + need_x)
    stats = m * k * S * H * isz + m * n * H * isz + 2 * n * V * bsz
    grads = (m * k * S * H * ((1 + need_x) * isz + 8)
             + m * n * H * (2 * isz + (8 if need_x else 0)) + 6 * n * V * bsz)
    launches = LAUNCHES["call"] + 2 * m * (LAUNCHES["slab"] + k * LAUNCHES["block"])
    work = (x_extra + w_slab_acc * S * H * 4 + r * S * bsz
            + (2 * r * H * isz if need_x else 0))          # the block's dx, and its sum
    return MemoryPlan("slabs", r, S, r, work, flops / P + (stats + grads) / B + L * launches)


def _sizes(top: int, low: int) -> list[int]:
    """``top`` and the powers of two times ``low`` below it (block sizes that
    keep the GEMM tiles whole)."""
    out, v = [top], low
    while v < top:
        out.append(v)
        v *= 2
    return out


def plan(n: int, vocab: int, hidden: int, dtype: torch.dtype, *, memory: "str | int",
         need_x: bool, need_weight: bool, hardware: Hardware, block_itemsize: int | None = None,
         weight_itemsize: int | None = None, x_itemsize: int | None = None,
         rows_fast: int | None = None,
         slabs_allowed: bool = True) -> MemoryPlan:
    """The plan for n active rows of a (vocab, hidden) head with GEMMs in
    ``dtype`` under ``memory``.

    block_itemsize: bytes per element of the backend's logits block (default
        ``dtype``'s); weight_itemsize: the weight's own dtype (its gradient's);
    rows_fast: the backend's own chunk size (the "fast" plan; default the
        chunk policy's); slabs_allowed: False where the backend cannot take a
        slab of the vocabulary (a vocabulary-parallel shard).
    """
    n, V, H = max(n, 1), max(vocab, 1), max(hidden, 1)
    isz = chunking.itemsize(dtype)
    bsz = isz if block_itemsize is None else block_itemsize
    wsz = isz if weight_itemsize is None else weight_itemsize
    xsz = isz if x_itemsize is None else x_itemsize
    if rows_fast is None:
        rows_fast = chunking.rows_per_chunk(n, V, H, dtype, hardware=hardware,
                                            block_itemsize=bsz,
                                            dw_bytes=None if need_weight else 0)
    return _plan(n, V, H, isz, bsz, wsz, xsz, *_rates(hardware, dtype), memory, need_x, need_weight,
                 rows_fast, slabs_allowed, str(dtype))


@lru_cache(maxsize=4096)
def _plan(n, V, H, isz, bsz, wsz, xsz, P, B, L, memory, need_x, need_weight, rows_fast,
          slabs_allowed, dtype) -> MemoryPlan:
    acc_extra = V * H * 4 if need_weight and wsz < 4 else 0
    fast = _rows_plan(n, V, H, isz, bsz, wsz, acc_extra, rows_fast, need_x, need_weight, P, B, L)
    limit = budget(memory, V, H, wsz)
    if limit is None:
        return fast
    candidates = [_rows_plan(n, V, H, isz, bsz, wsz, acc_extra, c, need_x, need_weight, P, B, L)
                  for c in _sizes(rows_fast, MIN_ROWS)]
    if need_weight and slabs_allowed:
        x_extra = n * H * 4 if need_x and xsz < 4 else 0   # dx accumulates in float32
        for S in _sizes(V, MIN_COLUMNS):
            for r in _sizes(n, MIN_ROWS):
                candidates.append(_slab_plan(n, V, H, isz, bsz, x_extra, True,
                                             S, r, need_x, P, B, L))
    leanest = min(candidates, key=lambda p: (p.work_bytes, p.seconds))
    if leanest.work_bytes > limit and not isinstance(memory, str):
        raise ValueError(f"memory={memory} bytes is below the least working memory a plan needs "
                     f"here ({leanest.work_bytes} bytes: {leanest.mode} plan, N={n}, V={V}, "
                     f"H={H}, {dtype}); give a larger budget or a setting "
                     f"{SETTINGS}")
    if isinstance(memory, str):
        # A setting never asks for less than twice the least working memory any plan
        # needs: the very least is a plan of tiny slabs, many times slower.
        limit = max(limit, 2 * leanest.work_bytes)
    return min((p for p in candidates if p.work_bytes <= limit),
               key=lambda p: (p.seconds, p.work_bytes))
