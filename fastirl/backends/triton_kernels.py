"""Triton backends: the launchers.

Two backends share the kernels of :mod:`.triton_logits` / :mod:`.triton_linear`:

``backend="triton"`` (:class:`TritonBackend`, the default on CUDA)
    cuBLAS GEMMs + the Triton epilogue kernels per chunk of rows
    (:class:`fastirl.backends.gemm_epilogue.GemmEpilogueBackend`): the logits
    block in the input dtype, ``logits_stats_kernel`` (+ ``merge_kernel``)
    for the statistics, ``logits_grad_kernel`` writing dz in place, then the
    dx / dW GEMMs with dW accumulated in float32.
``backend="triton-fused"`` (:class:`TritonFusedBackend`)
    the logits are never stored: ``linear_fwd_kernel`` (row block x
    vocabulary split programs, partials merged by ``merge_kernel``); backward
    fast (``preset="fast"``): ``linear_bwd_rows_kernel`` adds dx, dW, db with
    float32 atomics, each program walking its split from a staggered start;
    deterministic (default): vocabulary slabs, dz of one slab from the logits
    GEMM and ``logits_grad_kernel`` then two GEMMs (no read-modify-write of
    float32 tiles, no atomics).  Not picked by ``auto``.

What they launch is planned by the pure functions of
:mod:`fastirl.backends.triton_plan` (no Triton there; re-exported here), which
the cost model reads too.  Sizes that vary between calls (rows, splits) are
``do_not_specialize`` arguments: one compilation serves every chunk.  Every
launch runs under the inputs' device (``torch.cuda.device``).

Both compute in float32 / bfloat16 / float16 (``dtypes``; the engine runs
float64 on the PyTorch backend).  Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors
(slowly: for tests), with GEMM tiles cast to float32 first.
"""

from __future__ import annotations

import contextlib

import torch

from .base import KERNEL_DTYPES, LogitSpec, RowStats
from .gemm_epilogue import GemmEpilogueBackend, dz_scale, grad_gemms

try:
    import triton  # noqa: F401  (fail here, with the reason, when Triton is missing)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"triton is not installed ({exc})") from exc

from . import triton_linear as K
from . import triton_logits as L
from .triton_plan import (  # noqa: F401  (re-exported: the planning API)
    _CHUNK_BYTES, _SLAB_BYTES, CONFIGS, INTERP_DEVICE, INTERPRET, LINEAR_KERNELS, LOGITS_KERNELS,
    MIN_BLOCKS_PER_SPLIT, WAVES, DeviceInfo, Launch, TileConfig, config_key, device_index,
    device_info, fused_rows_per_chunk, gpu_info, pick_config, plan_epilogue, plan_fused_backward,
    plan_fused_forward, plan_grid, plan_logits_backward, plan_logits_forward, slab_columns)

__all__ = ["TritonBackend", "TritonFusedBackend", "TileConfig", "CONFIGS", "pick_config",
           "config_key", "load", "load_fused", "INTERPRET", "DeviceInfo", "Launch", "device_info",
           "gpu_info", "plan_grid", "plan_fused_forward", "plan_fused_backward",
           "plan_logits_forward", "plan_logits_backward", "plan_epilogue", "slab_columns",
           "dot_precision"]


def dot_precision(dtype: torch.dtype, interpret: bool = INTERPRET) -> str:
    """Float32 GEMM precision: TF32 exactly when PyTorch would use it, else
    3xTF32 (tensor cores, float32-level accuracy; an FMA "ieee" dot of these
    tile sizes does not fit in registers)."""
    if dtype != torch.float32 or interpret:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _device_guard(device: torch.device):
    """Launch under the tensors' device (Triton launches on the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------- helpers

# Alignment the fused linear kernels are compiled for (16 bytes; H and row
# strides multiples of 16 elements): unvectorised tile loads would spill.
_ALIGN = 16


def _aligned_ptr(t: torch.Tensor | None) -> bool:
    return t is None or t.data_ptr() % _ALIGN == 0


def _vec(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous, 16-byte aligned 1-D tensor of ``dtype`` (per-row vectors:
    a copy only if needed, and small)."""
    t = t.to(dtype).contiguous()
    return t if _aligned_ptr(t) else t.clone()


def fused_aligned(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether x, W (and b) are laid out as the fused kernels need: unit column
    stride, row strides and H multiples of 16, 16-byte aligned starts.  Other
    operands go to the GEMM + epilogue path (no copy of W)."""
    H = x.shape[1]
    return (x.dtype == weight.dtype and H % _ALIGN == 0
            and all(t.stride(1) == 1 and t.stride(0) % _ALIGN == 0 and _aligned_ptr(t)
                    for t in (x, weight))
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()
                                  and _aligned_ptr(bias))))


def _rows_view(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` (r, c) of ``dtype`` with unit column stride (a copy only when the
    column stride is not 1; any row stride, pointer alignment or width: the
    kernels mask every tail and Triton specialises on what divides by 16)."""
    t = t.to(dtype)
    if t.shape[1] > 1 and t.stride(1) != 1 and t.shape[0] > 0:
        t = t.contiguous()
    return t


def _params(spec: LogitSpec) -> tuple[float, float]:
    cap = float(spec.softcap) if spec.softcap is not None else 1.0
    return 1.0 / float(spec.temperature), cap


def _empty_stats(device, spec: LogitSpec) -> RowStats:
    f = torch.zeros(0, dtype=torch.float32, device=device)
    return RowStats(f, f.clone(), f.clone() if spec.entropy else None,
                    torch.zeros(0, dtype=torch.int64, device=device) if spec.argmax else None,
                    f.clone() if spec.argmax else None,
                    f.clone() if spec.logit_sum else None)


def _alloc_partials(S: int, n: int, device, spec: LogitSpec):
    f = lambda: torch.empty((S, n), dtype=torch.float32, device=device)  # noqa: E731
    pm, ps, pq = f(), f(), f()
    pw = f() if spec.entropy else pm
    pidx = torch.empty((S, n) if spec.argmax else (1,), dtype=torch.int32, device=device)
    pz = f() if spec.logit_sum else pm          # logit-sum partials (pz_ptr)
    return pm, ps, pw, pq, pidx, pz


def _merge(partials, launch: Launch, n: int, device, spec: LogitSpec) -> RowStats:
    pm, ps, pw, pq, pidx, pz = partials
    value = torch.empty(n, dtype=torch.float32, device=device)
    q = torch.empty_like(value)
    ent = torch.empty_like(value) if spec.entropy else value
    amax = torch.empty(n, dtype=torch.int64, device=device) if spec.argmax else None
    maxl = torch.empty_like(value) if spec.argmax else None
    zsum = torch.empty_like(value) if spec.logit_sum else None
    cfg = launch.config
    tau = float(spec.temperature)
    L.merge_kernel[launch.grid](
        pm, ps, pw, pq, pidx, pz, value, q, ent, amax if amax is not None else pidx,
        maxl if maxl is not None else value, zsum if zsum is not None else value,
        n, launch.splits, tau, 1.0 / tau,
        ENTROPY=spec.entropy, ARGMAX=spec.argmax, LOGIT_SUM=spec.logit_sum, BLOCK=cfg.block_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return RowStats(value, q, ent if spec.entropy else None, amax, maxl, zsum)


def logits_stats(z: torch.Tensor, targets: torch.Tensor, spec: LogitSpec, *,
                 interpret: bool = INTERPRET, splits: int | None = None) -> RowStats:
    """RowStats of a stored (n, V) float32 / bf16 / fp16 logits block (Triton)."""
    n, V = z.shape
    if n == 0:
        return _empty_stats(z.device, spec)
    z = _rows_view(z, z.dtype)
    dev = device_info(z.device, interpret)
    stats, merge = plan_logits_forward(n, V, z.dtype, dev=dev, splits=splits)
    cfg = stats.config
    partials = _alloc_partials(stats.splits, n, z.device, spec)
    inv_tau, cap = _params(spec)
    with _device_guard(z.device):
        L.logits_stats_kernel[stats.grid](
            z, _vec(targets, torch.int64), *partials, n, V, z.stride(0),
            stats.blocks_per_split, inv_tau, cap,
            SOFTCAP=spec.softcap is not None, ENTROPY=spec.entropy, ARGMAX=spec.argmax,
            LOGIT_SUM=spec.logit_sum,
            BLOCK_R=cfg.block_m, BLOCK_V=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        return _merge(partials, merge, n, z.device, spec)


def logits_grad(z: torch.Tensor, targets: torch.Tensor, value: torch.Tensor,
                grad_value: torch.Tensor, grad_target: torch.Tensor, spec: LogitSpec,
                out: torch.Tensor, *, interpret: bool = INTERPRET,
                grad_sum: torch.Tensor | None = None) -> None:
    """out (n, V) = dL/dz of the stored raw logits z; out may be z itself
    (grad_sum: (n,) added to every column, or None)."""
    n, V = z.shape
    if n == 0:
        return
    z = _rows_view(z, z.dtype)
    o = out if (out.shape[1] <= 1 or out.stride(1) == 1) else torch.empty(
        out.shape, dtype=out.dtype, device=out.device)
    (launch,) = plan_logits_backward(n, V, z.dtype, dev=device_info(z.device, interpret))
    cfg = launch.config
    inv_tau, cap = _params(spec)
    gt = _vec(grad_target, torch.float32)
    gs = gt if grad_sum is None else _vec(grad_sum, torch.float32)   # (unread without it)
    with _device_guard(z.device):
        L.logits_grad_kernel[launch.grid](
            z, _vec(targets, torch.int64), _vec(value, torch.float32),
            _vec(grad_value, torch.float32), gt, gs, o,
            n, V, z.stride(0), o.stride(0), inv_tau, cap,
            SOFTCAP=spec.softcap is not None, GRAD_SUM=grad_sum is not None,
            BLOCK_R=cfg.block_m, BLOCK_V=cfg.block_n,
            INTERP=interpret, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if o is not out:
        out.copy_(o)


# ---------------------------------------------------------------- backends

class TritonBackend(GemmEpilogueBackend):
    """``backend="triton"``: cuBLAS GEMMs + the Triton epilogue kernels per
    chunk (see :mod:`fastirl.backends.gemm_epilogue`); the CUDA default.

    fwd_splits forces the vocabulary splits of the statistics kernel (tests)."""

    name = "triton"

    def __init__(self, *, fwd_splits: int | None = None, interpret: bool = INTERPRET):
        self.fwd_splits = fwd_splits
        self.interpret = interpret

    def supports(self, device: torch.device) -> bool:
        return _supports(torch.device(device), self.interpret)

    def _row_stats(self, z, targets, spec: LogitSpec) -> RowStats:
        return logits_stats(z, targets, spec, interpret=self.interpret, splits=self.fwd_splits)

    def _row_grad(self, z, targets, value, grad_value, grad_target, spec, out,
                  grad_sum=None) -> None:
        logits_grad(z, targets, value, grad_value, grad_target, spec, out,
                    interpret=self.interpret, grad_sum=grad_sum)


def _supports(device: torch.device, interpret: bool) -> bool:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        return torch.cuda.get_device_capability(device_index(device)) >= (8, 0)
    return interpret and device.type == "cpu"


class TritonFusedBackend:
    """``backend="triton-fused"``: the logits are never stored (see the module
    doc).  Not picked by ``auto`` until a GPU measurement says it wins.

    fwd_splits / bwd_splits force the number of vocabulary splits (tests use
    them to exercise the partial merge); None plans them from the device.
    """

    name = "triton-fused"
    dtypes = KERNEL_DTYPES

    def __init__(self, *, fwd_splits: int | None = None, bwd_splits: int | None = None,
                 interpret: bool = INTERPRET):
        self.fwd_splits = fwd_splits
        self.bwd_splits = bwd_splits
        self.interpret = interpret
        self._epilogue = TritonBackend(interpret=interpret)

    def supports(self, device: torch.device) -> bool:
        return _supports(torch.device(device), self.interpret)

    def rows_per_chunk(self, n: int, vocab: int, hidden: int, dtype: torch.dtype,
                       chunk_size: int | None) -> int:
        if chunk_size is not None:
            return max(1, min(chunk_size, n))
        return fused_rows_per_chunk(n, hidden)    # bounded by one chunk's float32 dx

    def block_itemsize(self, dtype: torch.dtype) -> int:
        # No (n, V) block: the logits it stores are the dz slabs of the
        # deterministic backward (and the blocks of the GEMM + epilogue path
        # that unaligned operands go to), in the input dtype.
        return self._epilogue.block_itemsize(dtype)

    def _use_epilogue(self, x, weight, bias) -> bool:
        """Operands the fused kernels do not take (see fused_aligned) go to the
        GEMM + epilogue backend: same results, and W is never copied."""
        return not fused_aligned(x, weight, bias)

    # -- statistics ---------------------------------------------------------
    def forward(self, x, weight, bias, targets, spec: LogitSpec, *, keep: bool):
        n, V = x.shape[0], weight.shape[0]
        if n == 0:
            return _empty_stats(x.device, spec), None
        if self._use_epilogue(x, weight, bias):
            return self._epilogue.forward(x, weight, bias, targets, spec, keep=False)
        targets = _vec(targets, torch.int64)
        H = x.shape[1]
        fwd, merge = plan_fused_forward(n, V, H, x.dtype, dev=device_info(x.device, self.interpret),
                                        splits=self.fwd_splits)
        cfg = fwd.config
        partials = _alloc_partials(fwd.splits, n, x.device, spec)
        inv_tau, cap = _params(spec)
        with _device_guard(x.device):
            K.linear_fwd_kernel[fwd.grid](
                x, weight, bias if bias is not None else weight, targets, *partials,
                n, V, H, x.stride(0), weight.stride(0), fwd.blocks_per_split, fwd.splits,
                fwd.group_m, inv_tau, cap,
                HAS_BIAS=bias is not None, SOFTCAP=spec.softcap is not None,
                ENTROPY=spec.entropy, ARGMAX=spec.argmax, LOGIT_SUM=spec.logit_sum,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                DOT_F32=self.interpret, DOT_PREC=dot_precision(x.dtype, self.interpret),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            return _merge(partials, merge, n, x.device, spec), None

    # -- gradients ----------------------------------------------------------
    def backward(self, x, weight, bias, targets, value, grad_value, grad_target,
                 spec: LogitSpec, state, *, need_x, dweight, dbias, grad_sum=None):
        if dbias is not None and bias is None:
            raise ValueError("dbias given without bias")
        n, H = x.shape
        V = weight.shape[0]
        if n == 0:
            return x.new_zeros((0, H)) if need_x else None
        x_dtype = x.dtype
        if self._use_epilogue(x, weight, bias):
            return self._epilogue.backward(x, weight, bias, targets, value, grad_value,
                                           grad_target, spec, None, need_x=need_x,
                                           dweight=dweight, dbias=dbias, grad_sum=grad_sum)
        targets = _vec(targets, torch.int64)
        value = _vec(value, torch.float32)
        gv, gt = _vec(grad_value, torch.float32), _vec(grad_target, torch.float32)
        gs = None if grad_sum is None else _vec(grad_sum, torch.float32)
        plan = plan_fused_backward(n, V, H, x.dtype, dev=device_info(x.device, self.interpret),
                                   deterministic=spec.deterministic, need_x=need_x,
                                   need_weight=dweight is not None, need_bias=dbias is not None,
                                   splits=self.bwd_splits)
        with _device_guard(x.device):
            if plan[0].kernel == "linear_bwd_rows":
                return self._fused_rows(plan[0], x, weight, bias, targets, value, gv, gt, spec,
                                        need_x, dweight, dbias, x_dtype, gs)
            return self._slabs(x, weight, bias, targets, value, gv, gt, spec, need_x, dweight,
                               dbias, gs)

    def _fused_rows(self, launch: Launch, x, weight, bias, targets, value, gv, gt, spec,
                    need_x, dweight, dbias, x_dtype, gs=None):
        """Fast mode: dx, dW, db added with float32 atomics by one kernel."""
        n, H = x.shape
        V = weight.shape[0]
        dw_buf = dweight
        if dweight is not None and (dweight.stride(1) != 1 or dweight.stride(0) % _ALIGN
                                    or not _aligned_ptr(dweight)):
            dw_buf = torch.zeros((V, H), dtype=torch.float32, device=x.device)
        db_buf = dbias if dbias is None or (dbias.is_contiguous() and _aligned_ptr(dbias)) \
            else torch.zeros(V, dtype=torch.float32, device=x.device)
        dx_buf = torch.zeros((n, H), dtype=torch.float32, device=x.device) if need_x else None
        inv_tau, cap = _params(spec)
        cfg = launch.config
        K.linear_bwd_rows_kernel[launch.grid](
            x, weight, bias if bias is not None else weight, targets, value, gv, gt,
            gt if gs is None else gs,     # gs_ptr: unread without GRAD_SUM
            dx_buf if dx_buf is not None else gv, dw_buf if dw_buf is not None else gv,
            db_buf if db_buf is not None else gv,
            n, V, H, x.stride(0), weight.stride(0), dw_buf.stride(0) if dw_buf is not None else 0,
            launch.blocks_per_split, launch.splits, launch.group_m, int(launch.stagger),
            inv_tau, cap,
            HAS_BIAS=bias is not None, SOFTCAP=spec.softcap is not None, GRAD_SUM=gs is not None,
            DX=need_x, DW=dw_buf is not None, DB=db_buf is not None,
            SCALE_DZ=x.dtype == torch.float16,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_H=cfg.block_h,
            DOT_F32=self.interpret, DOT_PREC=dot_precision(x.dtype, self.interpret),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if dw_buf is not None and dw_buf is not dweight:
            dweight.add_(dw_buf)
        if db_buf is not None and db_buf is not dbias:
            dbias.add_(db_buf)
        return dx_buf.to(x_dtype) if need_x else None

    def _slabs(self, x, weight, bias, targets, value, gv, gt, spec, need_x, dweight, dbias,
               gs=None):
        """Deterministic: per vocabulary slab, dz (n, slab) from one GEMM and the
        gradient epilogue, then dx += dz @ W[slab] (float32), dW[slab] += dz.T @ x.
        Every float32 element is written once per slab, never per tile (gs, the
        uniform coefficient, applies to every column of every slab)."""
        n, H = x.shape
        V = weight.shape[0]
        s = dz_scale(x.dtype, gv, gt, gs)
        if s != 1.0:
            gv, gt = gv / s, gt / s
            gs = None if gs is None else gs / s
        dx = torch.zeros((n, H), dtype=torch.float32, device=x.device) if need_x else None
        cols = slab_columns(n, V, x.dtype)
        for v0 in range(0, V, cols):
            v1 = min(V, v0 + cols)
            w = weight[v0:v1]
            z = GemmEpilogueBackend.logits_block(x, w, None if bias is None else bias[v0:v1])
            local = torch.where((targets >= v0) & (targets < v1), targets - v0, -1)
            logits_grad(z, local, value, gv, gt, spec, z, interpret=self.interpret, grad_sum=gs)
            grad_gemms(z, x, w, need_x=False, scale=s, dx_acc=dx,
                       dweight=None if dweight is None else dweight[v0:v1],
                       dbias=None if dbias is None else dbias[v0:v1])
        return dx.to(x.dtype) if need_x else None

    # -- stored logits: the epilogue kernels ---------------------------------
    def logits_forward(self, logits, targets, spec: LogitSpec) -> RowStats:
        return logits_stats(logits, targets, spec, interpret=self.interpret,
                            splits=self.fwd_splits)

    def logits_backward(self, logits, targets, value, grad_value, grad_target,
                        spec: LogitSpec, out: torch.Tensor, *, grad_sum=None) -> None:
        self._epilogue.logits_backward(logits, targets, value, grad_value, grad_target, spec,
                                       out, grad_sum=grad_sum)


def _check_loadable() -> None:
    if not INTERPRET and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)")


def load() -> TritonBackend:
    """The "triton" backend, or RuntimeError saying why Triton cannot run here."""
    _check_loadable()
    return TritonBackend()


def load_fused() -> TritonFusedBackend:
    """The "triton-fused" backend, or RuntimeError saying why Triton cannot run here."""
    _check_loadable()
    return TritonFusedBackend()
