"""Native backends: C++ (``"cpu"``) and CUDA (``"cuda"``) epilogues around ATen GEMMs.

Per chunk of rows the logits block comes from one GEMM (``torch.mm`` /
``torch.addmm``: MKL / oneDNN on CPU, cuBLAS on CUDA); the extension's ops then
make one pass over it:

* ``torch.ops.fastirl.row_stats``: V, the target logit and optionally entropy,
  argmax, max logit and the logit sum, with an online max / sum-exp per row (no
  extra block);
* ``torch.ops.fastirl.row_grad_``: overwrites the block with
  ``dz = (grad_value * p + grad_target * onehot (+ grad_sum)) * softcap'``, so in single-pass
  mode (``forward(keep=True)`` then ``backward(state)``) a chunk costs exactly
  three GEMMs (logits, ``dx = dz @ W``, ``dW += dz.T @ x``) and two passes over
  the block, and holds one block (never a second, capped copy: on the CPU
  ``row_stats_capped_`` stores the capped logits in it, so the backward pass
  needs no second tanh).

The ops are registered with ``torch.library`` (namespace ``fastirl``) with fake
implementations, so ``torch.compile`` can trace them; building and loading the
extension is :mod:`.native_build`'s job.

The kernels take float32 / bfloat16 / float16 blocks (the backends' ``dtypes``);
the engine runs float64 inputs on the PyTorch backend instead
(:func:`fastirl.backends.resolve_backend`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from . import chunking, scratch
from .base import KERNEL_DTYPES, LogitSpec, RowStats
from .gemm_epilogue import GemmEpilogueBackend, addmm_f32
from .native_build import load_library

__all__ = ["NativeCPUBackend", "NativeCUDABackend", "load_cpu", "load_cuda"]

log = logging.getLogger("fastirl")

def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _f32_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else _f32(t)


def _row_grad_op(z: torch.Tensor, targets: torch.Tensor, value: torch.Tensor,
                 grad_value: torch.Tensor, grad_target: torch.Tensor, spec: LogitSpec,
                 out: torch.Tensor, grad_sum: torch.Tensor | None) -> None:
    """dL/dz of the raw block z into out: ``row_grad_`` when out is z itself, else
    ``row_grad`` (through a unit-stride temporary when out's columns are strided)."""
    args = (targets, value, grad_value, grad_target, float(spec.temperature), spec.softcap)
    if out.data_ptr() == z.data_ptr() and out.dtype == z.dtype and out.stride() == z.stride():
        torch.ops.fastirl.row_grad_(out, *args, False, grad_sum)
        return
    if z.shape[1] > 1 and z.stride(1) != 1:
        z = z.contiguous()
    if out.shape[1] > 1 and out.stride(1) != 1:
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        torch.ops.fastirl.row_grad(z, *args, tmp, grad_sum)
        out.copy_(tmp)
        return
    torch.ops.fastirl.row_grad(z, *args, out, grad_sum)


def _stats(z: torch.Tensor, targets: torch.Tensor, spec: LogitSpec,
           cap_in_place: bool = False) -> RowStats:
    """Statistics of the raw logits block z; with cap_in_place (and a soft cap)
    z is left holding the capped logits."""
    if cap_in_place and spec.softcap is not None:
        out = torch.ops.fastirl.row_stats_capped_(z, targets, float(spec.temperature),
                                                  float(spec.softcap), spec.entropy, spec.argmax,
                                                  spec.logit_sum)
    else:
        out = torch.ops.fastirl.row_stats(z, targets, float(spec.temperature), spec.softcap,
                                          spec.entropy, spec.argmax, spec.logit_sum)
    value, q, ent, amax, maxl, zsum = out
    if spec.argmax and z.device.type == "cpu":
        _nan_argmax(z, value, amax, maxl)
    return RowStats(value, q, ent if spec.entropy else None, amax if spec.argmax else None,
                    maxl if spec.argmax else None, zsum if spec.logit_sum else None)


def _nan_argmax(z: torch.Tensor, value: torch.Tensor, amax: torch.Tensor,
                maxl: torch.Tensor) -> None:
    """The NaN policy of every backend (torch.max's): a row holding a NaN logit
    has max logit NaN and argmax its first NaN column.  The CPU kernel skips
    NaN in its max (its value is NaN all the same), so those rows, found by
    their NaN value, are redone here (rare; no device sync on the CPU)."""
    rows = torch.nonzero(torch.isnan(value)).flatten()
    if rows.numel():
        m, i = z[rows].float().max(dim=1)
        nan = torch.isnan(m)
        maxl[rows[nan]] = m[nan]
        amax[rows[nan]] = i[nan]


class NativeCPUBackend:
    """C++ epilogues (OpenMP over rows, vectorised along the vocabulary); GEMMs
    are ATen's.

    bfloat16 / float16 inputs: the GEMMs run in that dtype (oneDNN / AMX where
    the CPU has it, several times faster than float32 GEMMs) and the logits
    block stays in it, read by the epilogues in float32 arithmetic; dz is written
    back in the input dtype, dx = dz @ W runs in it, and dW += dz.T @ x is a
    low-precision GEMM per vocabulary slab added into the float32 accumulator.
    That is the precision of the naive bf16 computation (tests check it against
    it); preset="highest" upcasts instead.
    """

    name = "cpu"
    dtypes = KERNEL_DTYPES

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cpu"

    def block_itemsize(self, dtype: torch.dtype) -> int:
        # the block stays in the input dtype (float32, or 16 bits)
        return 4 if dtype == torch.float32 else 2

    def rows_per_chunk(self, n: int, vocab: int, hidden: int, dtype: torch.dtype,
                       chunk_size: int | None) -> int:
        # The cost model's policy: W / dW traffic per chunk against the block's memory.
        return chunking.rows_per_chunk(n, vocab, hidden, dtype, device="cpu",
                                       chunk_size=chunk_size,
                                       block_itemsize=self.block_itemsize(dtype))

    @staticmethod
    def _logits(x, weight, bias) -> torch.Tensor:
        """The logits block of a chunk: float32 for float32 inputs, the input
        dtype otherwise (in the call's scratch block: :mod:`.scratch`)."""
        out = scratch.empty("block", (x.shape[0], weight.shape[0]), x.dtype, x.device)
        if bias is not None:
            return torch.addmm(bias, x, weight.t(), out=out)
        return torch.mm(x, weight.t(), out=out)

    def forward(self, x, weight, bias, targets, spec: LogitSpec, *, keep: bool):
        z = self._logits(x, weight, bias)
        # forward(keep=True) stores the capped logits in the block (saves the
        # tanh of the backward pass); float32 blocks only: capped logits rounded
        # to 16 bits would shift p.
        capped = keep and spec.softcap is not None and z.dtype == torch.float32
        return _stats(z, targets, spec, cap_in_place=capped), ((z, capped) if keep else None)

    def backward(self, x, weight, bias, targets, value, grad_value, grad_target,
                 spec: LogitSpec, state: Any, *, need_x, dweight, dbias, grad_sum=None):
        z, capped = (self._logits(x, weight, bias), False) if state is None else state
        torch.ops.fastirl.row_grad_(z, targets, _f32(value), _f32(grad_value), _f32(grad_target),
                                    float(spec.temperature), spec.softcap, capped,
                                    _f32_or_none(grad_sum))
        # z holds dz now, in the input dtype
        if dbias is not None:
            dbias.add_(z.sum(dim=0, dtype=dbias.dtype))
        if dweight is not None:     # (a 16-bit dz: slabs added by the extension's acc_add_)
            addmm_f32(dweight, z.t(), x, add_into=torch.ops.fastirl.acc_add_)
        return torch.mm(z, weight) if need_x else None

    def logits_forward(self, logits, targets, spec: LogitSpec) -> RowStats:
        if logits.dim() == 2 and logits.shape[1] > 0 and logits.stride(1) != 1:
            logits = logits.contiguous()
        return _stats(logits, targets, spec)

    def logits_backward(self, logits, targets, value, grad_value, grad_target,
                        spec: LogitSpec, out: torch.Tensor, *, grad_sum=None) -> None:
        _row_grad_op(logits, targets, _f32(value), _f32(grad_value), _f32(grad_target), spec,
                     out, _f32_or_none(grad_sum))


class NativeCUDABackend(GemmEpilogueBackend):
    """``backend="cuda"``: cuBLAS GEMMs + the CUDA epilogue kernels per chunk
    (see :mod:`fastirl.backends.gemm_epilogue`): logits blocks in the input
    dtype, dz written in place in it, dW accumulated in float32 by cuBLAS."""

    name = "cuda"

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cuda" and torch.cuda.is_available()

    def _row_stats(self, z, targets, spec: LogitSpec) -> RowStats:
        if z.dim() == 2 and z.shape[1] > 1 and z.stride(1) != 1:
            z = z.contiguous()
        return _stats(z, targets, spec)

    def _row_grad(self, z, targets, value, grad_value, grad_target, spec, out,
                  grad_sum=None) -> None:
        _row_grad_op(z, targets, value, grad_value, grad_target, spec, out, grad_sum)


def load_cpu() -> NativeCPUBackend:
    """The "cpu" backend; ImportError (with the reason) when the extension can
    neither be imported nor built."""
    where = load_library("cpu")
    _notice("cpu", where)
    return NativeCPUBackend()


def load_cuda() -> NativeCUDABackend:
    """The "cuda" backend; RuntimeError without a CUDA device, ImportError when
    the extension can neither be imported nor built."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available")
    if torch.version.cuda is None:
        raise RuntimeError("this torch build has no CUDA support")
    where = load_library("cuda")
    _notice("cuda", where)
    return NativeCUDABackend()


_noticed: set[str] = set()


def _notice(kind: str, where: str) -> None:
    if kind not in _noticed:
        _noticed.add(kind)
        log.info("fastirl: native %s backend from %s", kind, where)
