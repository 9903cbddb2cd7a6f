"""cuBLAS GEMMs + one fused epilogue kernel per chunk: the GPU backends' design.

Per chunk of c rows (the chunk size from :func:`fastirl.backends.chunking.rows_per_chunk`;
single-pass mode: ``forward(keep=True)`` then
``backward(state)``, three GEMMs in all):

1. ``z = x @ W.T (+ b)``: one GEMM in the input dtype (bf16 / fp16 with float32
   accumulation inside cuBLAS), the (c, V) block stored in that dtype: never a
   float32 copy of it;
2. the statistics epilogue reads the block once: V, q (entropy, argmax, logit sum);
3. the gradient epilogue reads it once more and overwrites it, in place and in
   the input dtype, with ``dz = (A p + B onehot (+ C)) * softcap'``;
4. ``dx = dz @ W`` (a GEMM in the input dtype) and ``dW += dz.T @ x``
   accumulated in float32 (``torch.addmm(..., out_dtype=torch.float32)`` on
   CUDA: the bf16 tensor-core rate, no float32 operand copies), ``db += sum dz``.

Subclasses supply the two epilogue kernels (:meth:`_row_stats`,
:meth:`_row_grad`): Triton (:class:`fastirl.backends.triton_kernels.TritonBackend`,
``backend="triton"``) or CUDA (:class:`fastirl.backends.native.NativeCUDABackend`,
``backend="cuda"``).

float16: ``dz`` is small (``A ~ 1 / tokens``, ``p`` down to 1e-8) and would
underflow in float16 (smallest normal 6e-5), so the gradient coefficients are
divided by a power of two ``s`` (the largest ``|A|``, ``|B|``, ``|C|`` of the chunk)
before the epilogue and the GEMM results multiplied by it (exact: powers of
two); this costs one device-to-host read of ``s`` per float16 chunk.  bfloat16
has float32's exponent range and needs none of it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from . import chunking
from .base import KERNEL_DTYPES, LogitSpec, RowStats

__all__ = ["GemmEpilogueBackend", "dz_scale", "grad_gemms", "addmm_f32"]

log = logging.getLogger("fastirl")

# Fallback of the float32-accumulated low-precision dW GEMM (CPU, or a torch
# without CUDA addmm(out_dtype=)): the low-precision temporary is at most this
# many bytes (a slab of rows), never a full copy.  Every slab GEMM packs its
# right operand afresh, so slabs must not be small (1 MiB ones once took 1.9x as
# long at B=2 T=4096 H=2048 V=128256 bf16 on the CPU), nor above glibc's mmap
# threshold (at most 32 MiB), where each is fresh zero-filled pages: at that shape
# (2048-row chunks, quiet machine) a forward+backward took 0.95x as long with
# 16 MiB slabs as with 64 MiB ones (the GEMMs alone run within 3 % from 8 to 64 MiB).
_DW_SLAB_BYTES = 16 << 20
_OUT_DTYPE_OK = True


def dz_scale(dtype: torch.dtype, grad_value: torch.Tensor, grad_target: torch.Tensor,
             grad_sum: torch.Tensor | None = None) -> float:
    """The power of two that the gradient coefficients are divided by before a
    ``dtype`` epilogue writes dz (1.0 except for float16; see the module doc)."""
    if dtype != torch.float16 or grad_value.numel() == 0:
        return 1.0
    m = torch.maximum(grad_value.abs().max(), grad_target.abs().max())
    if grad_sum is not None:
        m = torch.maximum(m, grad_sum.abs().max())
    m = float(m)
    if not math.isfinite(m) or m == 0.0:
        return 1.0
    return 2.0 ** math.floor(math.log2(m))


def addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, *,
              add_into=None) -> None:
    """acc (float32) += alpha * a @ b with a, b in a 16-bit dtype or float32,
    accumulated in float32 without float32 copies of a or b: cuBLAS with a
    float32 output on CUDA, else row slabs of a low-precision GEMM (a
    temporary of at most _DW_SLAB_BYTES) added into acc, by
    ``add_into(acc_slab, part)`` when given and alpha == 1 (e.g. the CPU
    extension's ``acc_add_``, which converts in registers instead of making a
    float32 temporary as a mixed-dtype ``add_`` does)."""
    global _OUT_DTYPE_OK
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
        return
    if acc.is_cuda and _OUT_DTYPE_OK:
        try:
            torch.addmm(acc, a, b, alpha=alpha, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError) as exc:   # a torch without addmm(out_dtype=)
            _OUT_DTYPE_OK = False
            log.warning("fastirl: torch.addmm(out_dtype=float32) failed (%s); dW GEMMs "
                        "go through low-precision slabs instead", exc)
    rows = max(1, min(acc.shape[0], _DW_SLAB_BYTES // (max(acc.shape[1], 1) * a.element_size())))
    tmp = torch.empty((rows, acc.shape[1]), dtype=a.dtype, device=a.device)
    for r0 in range(0, acc.shape[0], rows):
        r1 = min(acc.shape[0], r0 + rows)
        part = torch.mm(a[r0:r1], b, out=tmp[: r1 - r0])
        if add_into is not None and alpha == 1.0:
            add_into(acc[r0:r1], part)
        else:
            acc[r0:r1].add_(part, alpha=alpha)


def grad_gemms(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, *, need_x: bool,
               dweight: torch.Tensor | None, dbias: torch.Tensor | None,
               scale: float = 1.0, dx_acc: torch.Tensor | None = None) -> torch.Tensor | None:
    """The GEMMs after a gradient epilogue: dz (c, V) holds dL/dz / scale in x's dtype.

    dweight (V, H) and dbias (V,) float32 accumulators; returns dx = scale * dz @ W
    in x's dtype when need_x, or adds it into the float32 ``dx_acc`` (then
    returns None)."""
    if dbias is not None:
        dbias.add_(dz.sum(dim=0, dtype=dbias.dtype), alpha=scale)
    if dweight is not None:
        addmm_f32(dweight, dz.t(), x, alpha=scale)
    if dx_acc is not None:
        addmm_f32(dx_acc, dz, weight, alpha=scale)
        return None
    if not need_x:
        return None
    dx = torch.mm(dz, weight)
    return dx.mul_(scale) if scale != 1.0 else dx


class GemmEpilogueBackend:
    """Chunked GEMMs around two epilogue kernels (see the module doc), for
    float32 / bfloat16 / float16 inputs (``dtypes``; the engine runs float64 on
    the PyTorch backend).  Subclasses set ``name`` and implement ``supports``,
    ``_row_stats`` and ``_row_grad``."""

    name = "gemm-epilogue"
    dtypes = KERNEL_DTYPES

    # -- to implement ------------------------------------------------------
    def supports(self, device: torch.device) -> bool:
        raise NotImplementedError

    def _row_stats(self, z: torch.Tensor, targets: torch.Tensor, spec: LogitSpec) -> RowStats:
        """Statistics of the raw logits block z (n, V) (unit column stride)."""
        raise NotImplementedError

    def _row_grad(self, z: torch.Tensor, targets: torch.Tensor, value: torch.Tensor,
                  grad_value: torch.Tensor, grad_target: torch.Tensor, spec: LogitSpec,
                  out: torch.Tensor, grad_sum: torch.Tensor | None = None) -> None:
        """dL/dz of the raw block z into out (n, V), which may be z itself
        (grad_sum: float32 (n,) added to every column, or None)."""
        raise NotImplementedError

    # -- the contract --------------------------------------------------------
    def rows_per_chunk(self, n: int, vocab: int, hidden: int, dtype: torch.dtype,
                       chunk_size: int | None) -> int:
        if chunk_size is not None:
            return max(1, min(chunk_size, n))
        # The GPU's W / dW traffic per chunk against the chunk's memory (the
        # roofline model's reasoning, fastirl.backends.chunking).
        return chunking.rows_per_chunk(n, vocab, hidden, dtype, device="cuda",
                                       hardware=chunking.hardware_for("cuda"),
                                       block_itemsize=self.block_itemsize(dtype))

    def block_itemsize(self, dtype: torch.dtype) -> int:
        # the block stays in the input dtype (never a float32 copy)
        return chunking.itemsize(dtype)

    @staticmethod
    def logits_block(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
        """The (n, V) logits in x's dtype (one GEMM, float32 accumulation)."""
        return torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())

    def forward(self, x, weight, bias, targets, spec: LogitSpec, *, keep: bool):
        z = self.logits_block(x, weight, bias)
        return self._row_stats(z, targets, spec), (z if keep else None)

    def backward(self, x, weight, bias, targets, value, grad_value, grad_target,
                 spec: LogitSpec, state: Any, *, need_x, dweight, dbias, grad_sum=None):
        z = self.logits_block(x, weight, bias) if state is None else state
        gv, gt = grad_value.float(), grad_target.float()
        gs = None if grad_sum is None else grad_sum.float()
        s = dz_scale(z.dtype, gv, gt, gs)
        if s != 1.0:
            gv, gt = gv / s, gt / s
            gs = None if gs is None else gs / s
        self._row_grad(z, targets, value.float(), gv, gt, spec, z, gs)
        return grad_gemms(z, x, weight, need_x=need_x, dweight=dweight, dbias=dbias, scale=s)

    def logits_forward(self, logits, targets, spec: LogitSpec) -> RowStats:
        return self._row_stats(logits, targets, spec)

    def logits_backward(self, logits, targets, value, grad_value, grad_target,
                        spec: LogitSpec, out: torch.Tensor, *, grad_sum=None) -> None:
        self._row_grad(logits, targets, value.float(), grad_value.float(),
                       grad_target.float(), spec, out,
                       None if grad_sum is None else grad_sum.float())
