"""Triton backend: fused linear + streaming logsumexp kernels (no (n, V) logits).

Implements :class:`fastirl.backends.base.Backend` with the kernels of
:mod:`.triton_linear` (x, W -> statistics / gradients) and
:mod:`.triton_logits` (stored logits).  Semantics mirror
:mod:`.torch_chunked` exactly; see the comments above each kernel for the
derivations.

Passes
------
forward      ``linear_fwd_kernel`` over (row block, vocabulary split) programs
             writes per-split partials (max, sum exp, entropy sum, target
             logit, argmax), ``merge_kernel`` turns them into RowStats.
backward     recomputes the logits tiles; ``spec.deterministic`` (default):
             ``linear_bwd_rows_kernel`` for dx (per-split float32 buffers
             summed in a fixed order) and ``linear_bwd_vocab_kernel`` for
             dW / db (each program owns its vocabulary rows): no atomics,
             bitwise reproducible.  Fast mode: one ``linear_bwd_rows_kernel``
             pass that adds dx, dW and db with float32 atomics (three GEMMs
             instead of four).
``keep`` is ignored: forward keeps nothing and backward recomputes.

Tile configurations come from fixed tables (``CONFIGS``) chosen by a
heuristic, not a runtime autotuner, so that every launchable variant is known
ahead of time; :mod:`.triton_aot` compiles all of them for sm_80 / sm_90 and
reports registers, spills and shared memory.

Inputs other than float32 / bfloat16 / float16 (float64) are delegated to the
PyTorch backend.  Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors
(slowly: for tests), with GEMM tiles cast to float32 first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from .base import LogitSpec, RowStats

try:
    import triton  # noqa: F401  (fail here, with the reason, when Triton is missing)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"triton is not installed ({exc})") from exc

from . import triton_linear as K
from . import triton_logits as L
from .torch_chunked import TorchChunkedBackend

__all__ = ["TritonBackend", "TileConfig", "CONFIGS", "pick_config", "config_key", "load",
           "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Float32 scratch the deterministic dx pass may use for per-split partial sums.
_DX_SCRATCH_BYTES = 256 << 20
# Float32 dx buffer bound used by rows_per_chunk (one chunk's dx in float32).
_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch parameters of one kernel variant."""

    block_m: int = 0        # rows per tile (BLOCK_R for the logits kernels)
    block_n: int = 0        # vocabulary columns per tile (BLOCK_V)
    block_k: int = 0        # K step of the logits GEMM
    block_h: int = 0        # H slice of the dx / dW GEMMs
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# kernel -> key -> config.  Linear kernels: key (arch class, dtype class,
# size class): arch "sm90" (compute capability 9.x / 10.x: wgmma, large shared
# memory) or "sm80" (others: mma.sync, whose operand fragments live in
# registers, so smaller tiles; see arch_class);
# dtype "16" (bf16 / fp16) or "32" (float32, 3xTF32 or TF32 dots, which need
# twice the operand registers); size "small" (n <= 64 rows), "large" or "any".
# Every entry compiles without register spills (see triton_aot / notes).  The
# linear kernels are only launched on 16-byte aligned pointers with H and the
# row strides multiples of 16 (the backend pads / copies otherwise), so
# Triton always vectorises their tile loads.  Logits kernels: key ("any",
# vocabulary class).  "interp": the interpreter (large tiles, few programs).
CONFIGS: dict[str, dict[tuple[str, ...], TileConfig]] = {
    "linear_fwd": {
        ("sm90", "16", "large"): TileConfig(128, 128, 64, 0, 8, 8, 3),
        ("sm90", "16", "small"): TileConfig(64, 128, 64, 0, 8, 4, 3),
        ("sm90", "32", "any"): TileConfig(64, 128, 32, 0, 8, 8, 3),
        ("sm80", "16", "any"): TileConfig(64, 128, 64, 0, 8, 8, 3),
        ("sm80", "32", "any"): TileConfig(32, 128, 32, 0, 8, 8, 3),
        ("interp",): TileConfig(32, 128, 32, 0, 4, 4, 1),
    },
    "linear_bwd_rows": {
        ("sm90", "16", "large"): TileConfig(64, 128, 64, 64, 8, 8, 3),
        ("sm90", "16", "small"): TileConfig(32, 128, 64, 64, 8, 8, 3),
        ("sm90", "32", "any"): TileConfig(32, 64, 32, 16, 8, 8, 2),
        ("sm80", "16", "any"): TileConfig(64, 128, 64, 32, 8, 8, 3),
        ("sm80", "32", "any"): TileConfig(32, 64, 32, 16, 8, 8, 2),
        ("interp",): TileConfig(32, 128, 32, 32, 4, 4, 1),
    },
    "linear_bwd_vocab": {
        ("sm90", "16", "large"): TileConfig(64, 128, 64, 64, 1, 8, 3),
        ("sm90", "16", "small"): TileConfig(32, 128, 64, 64, 1, 8, 3),
        ("sm90", "32", "any"): TileConfig(32, 64, 32, 32, 1, 8, 2),
        ("sm80", "16", "large"): TileConfig(64, 128, 64, 32, 1, 8, 3),
        ("sm80", "16", "small"): TileConfig(32, 128, 64, 32, 1, 8, 3),
        ("sm80", "32", "any"): TileConfig(32, 64, 32, 32, 1, 8, 2),
        ("interp",): TileConfig(32, 128, 32, 32, 1, 4, 1),
    },
    "logits_stats": {
        ("any", "v256"): TileConfig(16, 256, num_warps=8),
        ("any", "v2048"): TileConfig(4, 1024, num_warps=8),
        ("any", "large"): TileConfig(1, 4096, num_warps=8),
        ("interp",): TileConfig(8, 64),
    },
    "logits_grad": {
        ("any", "v256"): TileConfig(16, 256, num_warps=8),
        ("any", "v2048"): TileConfig(4, 1024, num_warps=8),
        ("any", "large"): TileConfig(1, 4096, num_warps=8),
        ("interp",): TileConfig(8, 64),
    },
    "merge": {
        ("any",): TileConfig(256, num_warps=4),
        ("interp",): TileConfig(64),
    },
}

LINEAR_KERNELS = ("linear_fwd", "linear_bwd_rows", "linear_bwd_vocab")
LOGITS_KERNELS = ("logits_stats", "logits_grad")


def arch_class(device: torch.device) -> str:
    """Config family of a CUDA device: "sm90" for Hopper and datacenter Blackwell
    (capability 9.x / 10.x: ~227 KiB shared memory per block), else "sm80"
    (8.x, and consumer parts such as 8.9 / 12.x with ~99 KiB: the sm80 configs
    use at most 60 KiB)."""
    return "sm90" if _capability(device.index or 0)[0] in (9, 10) else "sm80"


@lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def config_key(kernel: str, *, dtype: torch.dtype = torch.float32, n: int = 0, vocab: int = 0,
               arch: str = "sm90", interpret: bool = INTERPRET) -> tuple[str, ...]:
    """The key in CONFIGS[kernel] the backend launches for these sizes."""
    if interpret:
        return ("interp",)
    if kernel in LINEAR_KERNELS:
        dc = "32" if dtype == torch.float32 else "16"
        key = (arch, dc, "small" if n <= 64 else "large")
        return key if key in CONFIGS[kernel] else (arch, dc, "any")
    if kernel in LOGITS_KERNELS:
        return ("any", "v256" if vocab <= 256 else "v2048" if vocab <= 2048 else "large")
    return ("any",)


def pick_config(kernel: str, **kw) -> TileConfig:
    return CONFIGS[kernel][config_key(kernel, **kw)]


def dot_precision(dtype: torch.dtype, interpret: bool = INTERPRET) -> str:
    """Float32 GEMM precision: TF32 exactly when PyTorch would use it, else
    3xTF32 (tensor cores, float32-level accuracy; an FMA "ieee" dot of these
    tile sizes does not fit in registers)."""
    if dtype != torch.float32 or interpret:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(device: torch.device, row_blocks: int, vocab_blocks: int,
            requested: int | None, cap: int | None = None) -> tuple[int, int]:
    """(number of vocabulary splits, vocabulary blocks per split): enough
    (row block, split) programs to fill the device twice over."""
    if requested is not None:
        want = requested
    elif device.type == "cuda":
        want = _cdiv(2 * _sm_count(device.index or 0), row_blocks)
    else:
        want = 1
    if cap is not None:
        want = min(want, cap)
    want = max(1, min(want, vocab_blocks))
    per = _cdiv(vocab_blocks, want)
    return _cdiv(vocab_blocks, per), per


# Pointer alignment / divisibility the kernels are compiled for (16 bytes,
# multiples of 16 elements): what Triton specialises on to vectorise loads,
# and what the ahead-of-time report (triton_aot) checks.
_ALIGN = 16


def _aligned_ptr(t: torch.Tensor) -> bool:
    return t.data_ptr() % _ALIGN == 0


def _vec(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous, 16-byte aligned 1-D tensor of ``dtype`` (copy only if needed)."""
    t = t.to(dtype).contiguous()
    return t if _aligned_ptr(t) else t.clone()


def _matrix(t: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``t`` (r, c) as a (r, width >= c) matrix of ``dtype`` with unit column
    stride, row stride a multiple of 16 and a 16-byte aligned start; zero
    padded (a copy) only when ``t`` is not already like that."""
    r, c = t.shape
    if (t.dtype == dtype and c == width and t.stride(1) == 1 and t.stride(0) % _ALIGN == 0
            and _aligned_ptr(t)) or r == 0:
        return t
    out = torch.zeros((r, width), dtype=dtype, device=t.device)
    out[:, :c] = t
    return out


def _logits_view(t: torch.Tensor) -> torch.Tensor:
    """Stored logits / gradient buffer with unit column stride and an aligned start."""
    if t.stride(-1) != 1 or not _aligned_ptr(t):
        return t.contiguous() if not t.is_contiguous() else t.clone()
    return t


class TritonBackend:
    """The Triton implementation of the backend contract.

    fwd_splits / bwd_splits force the number of vocabulary splits (tests use
    them to exercise the partial merge); None picks them from the device.
    """

    name = "triton"

    def __init__(self, *, fwd_splits: int | None = None, bwd_splits: int | None = None,
                 interpret: bool = INTERPRET):
        self.fwd_splits = fwd_splits
        self.bwd_splits = bwd_splits
        self.interpret = interpret
        self._fallback = TorchChunkedBackend()

    # -- capabilities -------------------------------------------------------
    def supports(self, device: torch.device) -> bool:
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return False
            return torch.cuda.get_device_capability(device) >= (8, 0)
        return self.interpret and device.type == "cpu"

    def rows_per_chunk(self, n: int, vocab: int, hidden: int, dtype: torch.dtype,
                       chunk_size: int | None) -> int:
        if chunk_size is not None:
            return max(1, min(chunk_size, n))
        if dtype not in _FLOAT_DTYPES:
            return self._fallback.rows_per_chunk(n, vocab, hidden, dtype, None)
        # Bounded by the float32 dx buffer of one chunk; a multiple of 16 so
        # that chunk starts stay 16-byte aligned.
        rows = _CHUNK_BYTES // (4 * max(hidden, 1) + 64)
        return max(1, min(n, rows - rows % 16 if rows >= 16 else rows))

    def _native(self, *tensors: torch.Tensor | None) -> bool:
        return all(t is None or t.dtype in _FLOAT_DTYPES for t in tensors)

    def _cfg(self, kernel: str, device: torch.device | None = None, **kw) -> TileConfig:
        arch = arch_class(device) if device is not None and device.type == "cuda" else "sm90"
        return pick_config(kernel, interpret=self.interpret, arch=arch, **kw)

    def _operands(self, x, weight, bias, targets):
        """x, W padded to H16 = roundup(H, 16) columns where needed (zero
        columns add nothing to z), all in x's dtype, all aligned."""
        H16 = _cdiv(x.shape[1], _ALIGN) * _ALIGN
        x = _matrix(x, H16, x.dtype)
        weight = _matrix(weight, H16, x.dtype)
        bias = None if bias is None else _vec(bias, x.dtype)
        return x, weight, bias, _vec(targets, torch.int64), H16

    @staticmethod
    def _params(spec: LogitSpec) -> tuple[float, float]:
        cap = float(spec.softcap) if spec.softcap is not None else 1.0
        return 1.0 / float(spec.temperature), cap

    # -- statistics ---------------------------------------------------------
    def _alloc_partials(self, S: int, n: int, device, spec: LogitSpec):
        part = torch.empty((4 if spec.entropy else 3, S, n), dtype=torch.float32, device=device)
        pidx = torch.empty((S, n) if spec.argmax else (1,), dtype=torch.int32, device=device)
        pm, ps, pq = part[0], part[1], part[2]
        pw = part[3] if spec.entropy else pm
        if S * n % 4:                       # keep every partial row 16-byte aligned
            return self._alloc_partials_slow(S, n, device, spec)
        return pm, ps, pw, pq, pidx

    @staticmethod
    def _alloc_partials_slow(S: int, n: int, device, spec: LogitSpec):
        def f():
            return torch.empty((S, n), dtype=torch.float32, device=device)
        pm, ps, pq = f(), f(), f()
        pw = f() if spec.entropy else pm
        pidx = torch.empty((S, n) if spec.argmax else (1,), dtype=torch.int32, device=device)
        return pm, ps, pw, pq, pidx

    def _merge(self, partials, S: int, n: int, device, spec: LogitSpec) -> RowStats:
        pm, ps, pw, pq, pidx = partials
        value = torch.empty(n, dtype=torch.float32, device=device)
        q = torch.empty_like(value)
        ent = torch.empty_like(value) if spec.entropy else value
        amax = torch.empty(n, dtype=torch.int64, device=device) if spec.argmax else None
        maxl = torch.empty_like(value) if spec.argmax else None
        cfg = self._cfg("merge")
        tau = float(spec.temperature)
        L.merge_kernel[(_cdiv(n, cfg.block_m),)](
            pm, ps, pw, pq, pidx, value, q, ent, amax if amax is not None else pidx,
            maxl if maxl is not None else value, n, S, tau, 1.0 / tau,
            ENTROPY=spec.entropy, ARGMAX=spec.argmax, BLOCK=cfg.block_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return RowStats(value, q, ent if spec.entropy else None, amax, maxl)

    @staticmethod
    def _empty_stats(device, spec: LogitSpec) -> RowStats:
        f = torch.zeros(0, dtype=torch.float32, device=device)
        return RowStats(f, f.clone(), f.clone() if spec.entropy else None,
                        torch.zeros(0, dtype=torch.int64, device=device) if spec.argmax else None,
                        f.clone() if spec.argmax else None)

    def forward(self, x, weight, bias, targets, spec: LogitSpec, *, keep: bool):
        if not self._native(x, weight, bias):
            return self._fallback.forward(x, weight, bias, targets, spec, keep=keep)
        n, V = x.shape[0], weight.shape[0]
        if n == 0:
            return self._empty_stats(x.device, spec), None
        x, weight, bias, targets, H = self._operands(x, weight, bias, targets)
        cfg = self._cfg("linear_fwd", x.device, dtype=x.dtype, n=n)
        row_blocks = _cdiv(n, cfg.block_m)
        S, per = _splits(x.device, row_blocks, _cdiv(V, cfg.block_n), self.fwd_splits)
        partials = self._alloc_partials(S, n, x.device, spec)
        inv_tau, cap = self._params(spec)
        K.linear_fwd_kernel[(row_blocks * S,)](
            x, weight, bias if bias is not None else weight, targets, *partials,
            n, V, H, x.stride(0), weight.stride(0), per, S, inv_tau, cap,
            HAS_BIAS=bias is not None, SOFTCAP=spec.softcap is not None,
            ENTROPY=spec.entropy, ARGMAX=spec.argmax,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m, DOT_F32=self.interpret,
            DOT_PREC=dot_precision(x.dtype, self.interpret),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return self._merge(partials, S, n, x.device, spec), None

    # -- gradients ----------------------------------------------------------
    def backward(self, x, weight, bias, targets, value, grad_value, grad_target,
                 spec: LogitSpec, state, *, need_x, dweight, dbias):
        if (not self._native(x, weight, bias)
                or any(t is not None and t.dtype != torch.float32 for t in (dweight, dbias))):
            return self._fallback.backward(x, weight, bias, targets, value, grad_value,
                                           grad_target, spec, None, need_x=need_x,
                                           dweight=dweight, dbias=dbias)
        if dbias is not None and bias is None:
            raise ValueError("dbias given without bias")
        n, H0 = x.shape
        V = weight.shape[0]
        if n == 0:
            return x.new_zeros((0, H0)) if need_x else None
        x_dtype = x.dtype
        x, weight, bias, targets, H = self._operands(x, weight, bias, targets)
        value = _vec(value, torch.float32)
        gv, gt = _vec(grad_value, torch.float32), _vec(grad_target, torch.float32)
        # Float32 accumulators the kernels can add into directly, else temporaries.
        dw_buf = dweight
        if dweight is not None and (H != H0 or dweight.stride(1) != 1
                                    or dweight.stride(0) % _ALIGN or not _aligned_ptr(dweight)):
            dw_buf = torch.zeros((V, H), dtype=torch.float32, device=x.device)
        db_buf = dbias
        if dbias is not None and (not dbias.is_contiguous() or not _aligned_ptr(dbias)):
            db_buf = torch.zeros(V, dtype=torch.float32, device=x.device)

        inv_tau, cap = self._params(spec)
        common = dict(HAS_BIAS=bias is not None, SOFTCAP=spec.softcap is not None,
                      DOT_F32=self.interpret, DOT_PREC=dot_precision(x.dtype, self.interpret))
        b_arg = bias if bias is not None else weight
        # Fast mode adds dW (and db, when that pass runs anyway) with atomics in
        # the rows pass; everything else goes to the deterministic passes.
        fast = not spec.deterministic
        rows_pass = need_x or (fast and dw_buf is not None)
        fast = fast and rows_pass
        dx = None
        if rows_pass:
            cfg = self._cfg("linear_bwd_rows", x.device, dtype=x.dtype, n=n)
            row_blocks = _cdiv(n, cfg.block_m)
            vb = _cdiv(V, cfg.block_n)
            if fast:
                S, per = _splits(x.device, row_blocks, vb, self.bwd_splits)
                dx_buf = (torch.zeros((n, H), dtype=torch.float32, device=x.device)
                          if need_x else None)
            else:
                S, per = _splits(x.device, row_blocks, vb, self.bwd_splits,
                                 cap=max(1, _DX_SCRATCH_BYTES // (4 * n * H)))
                dx_buf = torch.empty((S, n, H), dtype=torch.float32, device=x.device)
            dw_fast = fast and dw_buf is not None
            db_fast = fast and db_buf is not None
            K.linear_bwd_rows_kernel[(row_blocks * S,)](
                x, weight, b_arg, targets, value, gv, gt,
                dx_buf if dx_buf is not None else gv,
                dw_buf if dw_fast else gv, db_buf if db_fast else gv,
                n, V, H, x.stride(0), weight.stride(0),
                dw_buf.stride(0) if dw_fast else 0, per, S, inv_tau, cap,
                DX=need_x, DX_ATOMIC=fast, FAST_DW=dw_fast, FAST_DB=db_fast,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                BLOCK_H=cfg.block_h, GROUP_M=cfg.group_m, **common,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if need_x:
                if not fast:
                    dx_buf = dx_buf[0] if S == 1 else dx_buf.sum(dim=0)
                dx = dx_buf[:, :H0].to(x_dtype)
        if not fast and (dw_buf is not None or db_buf is not None):
            cfg = self._cfg("linear_bwd_vocab", x.device, dtype=x.dtype, n=n)
            K.linear_bwd_vocab_kernel[(_cdiv(V, cfg.block_n),)](
                x, weight, b_arg, targets, value, gv, gt,
                dw_buf if dw_buf is not None else gv, db_buf if db_buf is not None else gv,
                n, V, H, x.stride(0), weight.stride(0),
                dw_buf.stride(0) if dw_buf is not None else 0, inv_tau, cap,
                DW=dw_buf is not None, DB=db_buf is not None,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                BLOCK_H=cfg.block_h, **common,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if dw_buf is not None and dw_buf is not dweight:
            dweight.add_(dw_buf[:, :H0])
        if db_buf is not None and db_buf is not dbias:
            dbias.add_(db_buf)
        return dx

    # -- stored logits ------------------------------------------------------
    def logits_forward(self, logits, targets, spec: LogitSpec) -> RowStats:
        if not self._native(logits):
            return self._fallback.logits_forward(logits, targets, spec)
        n, V = logits.shape
        if n == 0:
            return self._empty_stats(logits.device, spec)
        z = _logits_view(logits)
        targets = _vec(targets, torch.int64)
        cfg = self._cfg("logits_stats", vocab=V)
        row_blocks = _cdiv(n, cfg.block_m)
        S, per = _splits(z.device, row_blocks, _cdiv(V, cfg.block_n), self.fwd_splits)
        partials = self._alloc_partials(S, n, z.device, spec)
        inv_tau, cap = self._params(spec)
        L.logits_stats_kernel[(row_blocks, S)](
            z, targets, *partials, n, V, z.stride(0), per, inv_tau, cap,
            SOFTCAP=spec.softcap is not None, ENTROPY=spec.entropy, ARGMAX=spec.argmax,
            BLOCK_R=cfg.block_m, BLOCK_V=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        return self._merge(partials, S, n, z.device, spec)

    def logits_backward(self, logits, targets, value, grad_value, grad_target,
                        spec: LogitSpec, out: torch.Tensor) -> None:
        if not self._native(logits, out):
            return self._fallback.logits_backward(logits, targets, value, grad_value,
                                                  grad_target, spec, out)
        n, V = logits.shape
        if n == 0:
            return None
        z = _logits_view(logits)            # a copy only if unaligned / strided
        o = out if out.stride(-1) == 1 and _aligned_ptr(out) else torch.empty(
            out.shape, dtype=out.dtype, device=out.device)
        cfg = self._cfg("logits_grad", vocab=V)
        inv_tau, cap = self._params(spec)
        L.logits_grad_kernel[(_cdiv(n, cfg.block_m), _cdiv(V, cfg.block_n))](
            z, _vec(targets, torch.int64), _vec(value, torch.float32),
            _vec(grad_value, torch.float32), _vec(grad_target, torch.float32), o,
            n, V, z.stride(0), o.stride(0), inv_tau, cap,
            SOFTCAP=spec.softcap is not None, BLOCK_R=cfg.block_m, BLOCK_V=cfg.block_n,
            INTERP=self.interpret, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if o is not out:
            out.copy_(o)
        return None


def load() -> TritonBackend:
    """The backend, or RuntimeError saying why Triton cannot run here."""
    if not INTERPRET and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)")
    return TritonBackend()
