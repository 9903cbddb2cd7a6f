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
    import triton
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"triton is not installed ({exc})") from exc

from . import triton_linear as K
from . import triton_logits as L
from .torch_chunked import TorchChunkedBackend

__all__ = ["TritonBackend", "TileConfig", "CONFIGS", "load", "INTERPRET"]

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


# kernel -> (dtype class, size class) -> config.  dtype class "16" (bf16/fp16),
# "32" (float32), "interp" (interpreter: large tiles, few programs).
CONFIGS: dict[str, dict[tuple[str, str], TileConfig]] = {
    "linear_fwd": {
        ("16", "large"): TileConfig(128, 128, 64, 0, 8, 8, 3),
        ("16", "small"): TileConfig(64, 128, 64, 0, 8, 4, 3),
        ("32", "large"): TileConfig(128, 128, 32, 0, 8, 8, 3),
        ("32", "small"): TileConfig(64, 128, 32, 0, 8, 4, 3),
        ("interp", "any"): TileConfig(32, 128, 32, 0, 4, 4, 1),
    },
    "linear_bwd_rows": {
        ("16", "large"): TileConfig(128, 128, 64, 64, 8, 8, 3),
        ("16", "small"): TileConfig(64, 128, 64, 64, 8, 4, 3),
        ("32", "large"): TileConfig(128, 128, 32, 64, 8, 8, 3),
        ("32", "small"): TileConfig(64, 128, 32, 64, 8, 4, 3),
        ("interp", "any"): TileConfig(32, 128, 32, 32, 4, 4, 1),
    },
    "linear_bwd_vocab": {
        ("16", "large"): TileConfig(128, 128, 64, 64, 1, 8, 3),
        ("16", "small"): TileConfig(64, 128, 64, 64, 1, 4, 3),
        ("32", "large"): TileConfig(128, 128, 32, 64, 1, 8, 3),
        ("32", "small"): TileConfig(64, 128, 32, 64, 1, 4, 3),
        ("interp", "any"): TileConfig(32, 128, 32, 32, 1, 4, 1),
    },
    # Logits kernels: size class by vocabulary.
    "logits_stats": {
        ("any", "v256"): TileConfig(16, 256, num_warps=4),
        ("any", "v2048"): TileConfig(4, 1024, num_warps=4),
        ("any", "large"): TileConfig(1, 4096, num_warps=8),
        ("interp", "any"): TileConfig(8, 64),
    },
    "logits_grad": {
        ("any", "v256"): TileConfig(16, 256, num_warps=4),
        ("any", "v2048"): TileConfig(4, 1024, num_warps=4),
        ("any", "large"): TileConfig(1, 4096, num_warps=8),
        ("interp", "any"): TileConfig(8, 64),
    },
    "merge": {
        ("any", "any"): TileConfig(256, num_warps=4),
        ("interp", "any"): TileConfig(64),
    },
}


def _dtype_class(dtype: torch.dtype) -> str:
    return "32" if dtype == torch.float32 else "16"


def pick_config(kernel: str, *, dtype: torch.dtype = torch.float32, n: int = 0, vocab: int = 0,
                interpret: bool = INTERPRET) -> TileConfig:
    """The tile configuration the backend launches for these sizes."""
    table = CONFIGS[kernel]
    if interpret:
        return table[("interp", "any")]
    if kernel == "merge":
        return table[("any", "any")]
    if kernel in ("logits_stats", "logits_grad"):
        size = "v256" if vocab <= 256 else "v2048" if vocab <= 2048 else "large"
        return table[("any", size)]
    return table[(_dtype_class(dtype), "small" if n <= 64 else "large")]


def dot_precision(dtype: torch.dtype, interpret: bool = INTERPRET) -> str:
    """Float32 GEMM precision: TF32 exactly when PyTorch would use it."""
    if dtype == torch.float32 and not interpret and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


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


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (n, C) tensor with unit column stride (row stride is passed)."""
    return t if t.stride(-1) == 1 else t.contiguous()


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
        # Memory per row: the float32 dx buffer (H) and a few partials.
        return max(1, min(n, _CHUNK_BYTES // (4 * max(hidden, 1) + 64)))

    def _native(self, *tensors: torch.Tensor) -> bool:
        return all(t.dtype in _FLOAT_DTYPES for t in tensors)

    def _cfg(self, kernel: str, **kw) -> TileConfig:
        return pick_config(kernel, interpret=self.interpret, **kw)

    # -- statistics ---------------------------------------------------------
    def _alloc_partials(self, S: int, n: int, device, spec: LogitSpec):
        part = torch.empty((4 if spec.entropy else 3, S, n), dtype=torch.float32, device=device)
        pidx = torch.empty((S, n) if spec.argmax else (1,), dtype=torch.int32, device=device)
        pm, ps, pq = part[0], part[1], part[2]
        pw = part[3] if spec.entropy else pm
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
            num_warps=cfg.num_warps)
        return RowStats(value, q, ent if spec.entropy else None, amax, maxl)

    @staticmethod
    def _empty_stats(device, spec: LogitSpec) -> RowStats:
        f = torch.zeros(0, dtype=torch.float32, device=device)
        return RowStats(f, f.clone(), f.clone() if spec.entropy else None,
                        torch.zeros(0, dtype=torch.int64, device=device) if spec.argmax else None,
                        f.clone() if spec.argmax else None)

    def forward(self, x, weight, bias, targets, spec: LogitSpec, *, keep: bool):
        tensors = (x, weight) if bias is None else (x, weight, bias)
        if not self._native(*tensors):
            return self._fallback.forward(x, weight, bias, targets, spec, keep=keep)
        n, H = x.shape
        V = weight.shape[0]
        if n == 0:
            return self._empty_stats(x.device, spec), None
        x, weight = _rows(x), _rows(weight)
        bias = None if bias is None else bias.to(x.dtype).contiguous()
        weight = weight.to(x.dtype)
        targets = targets.to(torch.int64).contiguous()
        cfg = self._cfg("linear_fwd", dtype=x.dtype, n=n)
        row_blocks = _cdiv(n, cfg.block_m)
        S, per = _splits(x.device, row_blocks, _cdiv(V, cfg.block_n), self.fwd_splits)
        partials = self._alloc_partials(S, n, x.device, spec)
        pm, ps, pw, pq, pidx = partials
        tau = float(spec.temperature)
        cap = float(spec.softcap) if spec.softcap is not None else 1.0
        K.linear_fwd_kernel[(row_blocks * S,)](
            x, weight, bias if bias is not None else weight, targets, pm, ps, pw, pq, pidx,
            n, V, H, x.stride(0), weight.stride(0), per, S, 1.0 / tau, cap,
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
        tensors = (x, weight) if bias is None else (x, weight, bias)
        accs = [t for t in (dweight, dbias) if t is not None]
        if not self._native(*tensors) or any(t.dtype != torch.float32 for t in accs):
            return self._fallback.backward(x, weight, bias, targets, value, grad_value,
                                           grad_target, spec, None, need_x=need_x,
                                           dweight=dweight, dbias=dbias)
        n, H = x.shape
        V = weight.shape[0]
        if dbias is not None and bias is None:
            raise ValueError("dbias given without bias")
        if n == 0:
            return x.new_zeros((0, H)) if need_x else None
        x, weight = _rows(x), _rows(weight)
        bias = None if bias is None else bias.to(x.dtype).contiguous()
        weight = weight.to(x.dtype)
        targets = targets.to(torch.int64).contiguous()
        value, gv, gt = _f32(value), _f32(grad_value), _f32(grad_target)
        # Accumulators must have unit column stride; otherwise use a temporary.
        dw_buf = dweight
        if dweight is not None and dweight.stride(1) != 1:
            dw_buf = torch.zeros(dweight.shape, dtype=torch.float32, device=dweight.device)
        db_buf = dbias
        if dbias is not None and not dbias.is_contiguous():
            db_buf = torch.zeros(dbias.shape, dtype=torch.float32, device=dbias.device)

        tau = float(spec.temperature)
        cap = float(spec.softcap) if spec.softcap is not None else 1.0
        common = dict(HAS_BIAS=bias is not None, SOFTCAP=spec.softcap is not None,
                      DOT_F32=self.interpret, DOT_PREC=dot_precision(x.dtype, self.interpret))
        b_arg = bias if bias is not None else weight
        dx = None
        fast = not spec.deterministic
        want_rows = need_x or (fast and (dw_buf is not None or db_buf is not None))
        if want_rows:
            cfg = self._cfg("linear_bwd_rows", dtype=x.dtype, n=n)
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
                dw_buf.stride(0) if dw_fast else 0, per, S, 1.0 / tau, cap,
                DX=need_x, DX_ATOMIC=fast, FAST_DW=dw_fast, FAST_DB=db_fast,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                BLOCK_H=cfg.block_h, GROUP_M=cfg.group_m, **common,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if need_x:
                if not fast:
                    dx_buf = dx_buf[0] if S == 1 else dx_buf.sum(dim=0)
                dx = dx_buf.to(x.dtype)
        if not fast and (dw_buf is not None or db_buf is not None):
            cfg = self._cfg("linear_bwd_vocab", dtype=x.dtype, n=n)
            K.linear_bwd_vocab_kernel[(_cdiv(V, cfg.block_n),)](
                x, weight, b_arg, targets, value, gv, gt,
                dw_buf if dw_buf is not None else gv, db_buf if db_buf is not None else gv,
                n, V, H, x.stride(0), weight.stride(0),
                dw_buf.stride(0) if dw_buf is not None else 0, 1.0 / tau, cap,
                DW=dw_buf is not None, DB=db_buf is not None,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                BLOCK_H=cfg.block_h, **common,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if dw_buf is not None and dw_buf is not dweight:
            dweight.add_(dw_buf)
        if db_buf is not None and db_buf is not dbias:
            dbias.add_(db_buf)
        return dx if need_x else None

    # -- stored logits ------------------------------------------------------
    def logits_forward(self, logits, targets, spec: LogitSpec) -> RowStats:
        if not self._native(logits):
            return self._fallback.logits_forward(logits, targets, spec)
        n, V = logits.shape
        if n == 0:
            return self._empty_stats(logits.device, spec)
        z = _rows(logits)
        targets = targets.to(torch.int64).contiguous()
        cfg = self._cfg("logits_stats", vocab=V)
        row_blocks = _cdiv(n, cfg.block_m)
        S, per = _splits(z.device, row_blocks, _cdiv(V, cfg.block_n), self.fwd_splits)
        partials = self._alloc_partials(S, n, z.device, spec)
        pm, ps, pw, pq, pidx = partials
        tau = float(spec.temperature)
        cap = float(spec.softcap) if spec.softcap is not None else 1.0
        L.logits_stats_kernel[(row_blocks, S)](
            z, targets, pm, ps, pw, pq, pidx, n, V, z.stride(0), per, 1.0 / tau, cap,
            SOFTCAP=spec.softcap is not None, ENTROPY=spec.entropy, ARGMAX=spec.argmax,
            BLOCK_R=cfg.block_m, BLOCK_V=cfg.block_n, num_warps=cfg.num_warps)
        return self._merge(partials, S, n, z.device, spec)

    def logits_backward(self, logits, targets, value, grad_value, grad_target,
                        spec: LogitSpec, out: torch.Tensor) -> None:
        if not self._native(logits, out):
            return self._fallback.logits_backward(logits, targets, value, grad_value,
                                                  grad_target, spec, out)
        n, V = logits.shape
        if n == 0:
            return None
        z = _rows(logits)
        o = out if out.stride(-1) == 1 else torch.empty(out.shape, dtype=out.dtype,
                                                       device=out.device)
        targets = targets.to(torch.int64).contiguous()
        cfg = self._cfg("logits_grad", vocab=V)
        tau = float(spec.temperature)
        cap = float(spec.softcap) if spec.softcap is not None else 1.0
        L.logits_grad_kernel[(_cdiv(n, cfg.block_m), _cdiv(V, cfg.block_n))](
            z, targets, _f32(value), _f32(grad_value), _f32(grad_target), o,
            n, V, z.stride(0), o.stride(0), 1.0 / tau, cap,
            SOFTCAP=spec.softcap is not None, BLOCK_R=cfg.block_m, BLOCK_V=cfg.block_n,
            num_warps=cfg.num_warps)
        if o is not out:
            out.copy_(o)
        return None


def load() -> TritonBackend:
    """The backend, or RuntimeError saying why Triton cannot run here."""
    if not INTERPRET and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)")
    return TritonBackend()
