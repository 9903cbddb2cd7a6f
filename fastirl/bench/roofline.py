"""A roofline cost model of every loss variant: ``python -m fastirl.bench.roofline``.

For a shape (N = B·T tokens, hidden H, vocabulary V, dtype) and a device, each
variant is a list of launches (GEMMs and kernels), each with its FLOPs and its
main-memory (HBM / DRAM) bytes, and is predicted to take

    sum over launches of max(flops / peak, bytes / bandwidth)

where ``peak`` is the GEMM rate of the launch's operand type (tensor cores /
AMX) for GEMMs and the vector float32 rate for element-wise kernels.  The
launch lists come from the planning code the backends run: the chunk policy of
:mod:`fastirl.backends.chunking` and, for the Triton / CUDA backends, the pure
planning functions of :mod:`fastirl.backends.triton_kernels`
(``plan_epilogue``, ``plan_fused_forward``, ``plan_fused_backward``), so the
model changes when the code does.  The anchors (Liger-Kernel, Cut
Cross-Entropy, the naive loss) are modelled from their published algorithms.

What the model leaves out (see docs/gpu-model.md): launch latency and
synchronisation, GEMM efficiency below peak (cuBLAS reaches ~70-80 % of dense
peak on large bf16 GEMMs), L2 hits other than the stated reuse, atomic
contention (atomics are charged as 8 bytes of HBM traffic each), overlap
between launches.  It ranks designs and shows their overheads; it is not a
stopwatch.

``--device cpu`` replaces the GPU figures by this CPU's, measured in a short
calibration (GEMM rate per dtype, copy bandwidth), and models the CPU
variants, so that predicted and measured times can be compared here.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fastirl.backends import chunking, gemm_epilogue
from fastirl.backends.chunking import GPUS, Hardware

__all__ = ["Op", "Shape", "Prediction", "gpu", "calibrate_cpu", "cuda_variants",
           "cpu_variants", "predict", "predict_all", "predict_ms", "bench_hardware", "rows",
           "main", "CSV_COLUMNS"]

CSV_COLUMNS = ["variant", "gpu", "launches", "flops", "hbm_bytes", "predicted_ms",
               "predicted_vs_floor", "mode", "tokens", "hidden", "vocab", "dtype",
               "peak_extra_mib"]

_ISZ = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# Element-wise cost of the epilogues, in float32 FLOP-equivalents per logit
# (vector instructions x 2, an FMA counting as two FLOPs as in the peak).
#   stats: max, exp, sum (+ converts);  grad: sub, mul, exp, mul (+ converts).
# "poly": the CPU's branch-free Cephes exp (iq_math.h exp_, ~20 instructions);
# "exp2": the GPU's hardware exp2 on pre-scaled inputs (a few instructions).
EPILOGUE_FLOPS = {"poly": {"stats": 52.0, "grad": 54.0}, "exp2": {"stats": 12.0, "grad": 12.0}}
# The soft cap's tanh on top (per logit and pass, polynomial / hardware).
SOFTCAP_FLOPS = {"poly": 60.0, "exp2": 16.0}


@dataclass(frozen=True)
class Op:
    """One launch (or ``count`` identical ones)."""

    name: str
    flops: float
    bytes: float
    unit: str = "vector"        # a GEMM operand type ("bfloat16", "tf32", ...) or "vector"
    count: int = 1
    l2_bytes: float = 0.0       # L2-side traffic (float32 atomics), at hw.l2_bandwidth

    def seconds(self, hw: Hardware) -> float:
        peak = hw.vector_flops if self.unit == "vector" else hw.gemm_flops(self.unit)
        t = max(self.flops / peak, self.bytes / hw.bandwidth)
        if self.l2_bytes and hw.l2_bandwidth:
            t = max(t, self.l2_bytes / hw.l2_bandwidth)
        return self.count * t


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    vocab: int
    dtype: str = "bfloat16"

    @property
    def isz(self) -> int:
        return _ISZ[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class Prediction:
    variant: str
    mode: str
    ops: list[Op]
    hw: Hardware
    shape: Shape
    peak_extra_bytes: float = 0.0     # modelled peak memory above the inputs
    note: str = ""
    vs_floor: float | None = None

    @property
    def launches(self) -> int:
        return sum(o.count for o in self.ops)

    @property
    def flops(self) -> float:
        return sum(o.flops * o.count for o in self.ops)

    @property
    def hbm_bytes(self) -> float:
        return sum(o.bytes * o.count for o in self.ops)

    @property
    def seconds(self) -> float:
        return sum(o.seconds(self.hw) for o in self.ops)

    def by_kind(self) -> dict[str, float]:
        """Predicted seconds per launch name (the breakdown)."""
        out: dict[str, float] = {}
        for o in self.ops:
            out[o.name] = out.get(o.name, 0.0) + o.seconds(self.hw)
        return out


# ------------------------------------------------------------------ building blocks

def gemm(name: str, m: int, n: int, k: int, dtype: str, *, out_bytes: int | None = None,
         accumulate: bool = False, unit: str | None = None, a_reads: int = 1) -> Op:
    """(m, k) @ (k, n): operands read once (a_reads: times the (m, k) operand
    is streamed), the (m, n) result written (read too when accumulating)."""
    isz = _ISZ[dtype]
    ob = isz if out_bytes is None else out_bytes
    c = m * n * ob * (2 if accumulate else 1)
    return Op(name, 2.0 * m * n * k, (a_reads * m * k + k * n) * isz + c, unit or dtype)


def elementwise(name: str, elements: float, bytes_per: float, flops_per: float,
                extra_bytes: float = 0.0) -> Op:
    return Op(name, elements * flops_per, elements * bytes_per + extra_bytes, "vector")


def _epi(kind: str, which: str, softcap: bool) -> float:
    return EPILOGUE_FLOPS[kind][which] + (SOFTCAP_FLOPS[kind] if softcap else 0.0)


def gpu(name: str) -> Hardware:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {name!r}") from None


# ------------------------------------------------------------------ CPU calibration

def calibrate_cpu(seconds: float = 3.0, threads: int | None = None) -> Hardware:
    """This CPU's figures, measured: GEMM FLOP/s per dtype (square GEMMs of
    1024-2048), copy bandwidth (a 256 MiB buffer), and the vector float32 rate
    taken as the float32 GEMM rate.  About ``seconds`` of work."""
    if threads:
        torch.set_num_threads(threads)
    budget = seconds / 4

    def rate(fn, work):
        fn()
        best, t_end = float("inf"), time.perf_counter() + budget
        while True:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
            if time.perf_counter() > t_end:
                break
        return work / best

    flops = {}
    for dt, size in (("float32", 1024), ("bfloat16", 2048)):
        a = torch.randn(size, size).to(getattr(torch, dt))
        b = torch.randn(size, size).to(getattr(torch, dt))
        out = torch.empty(size, size, dtype=a.dtype)
        flops[dt] = rate(lambda: torch.mm(a, b, out=out), 2.0 * size ** 3)
    flops["float16"] = flops["bfloat16"]
    flops["float64"] = flops["float32"] / 2
    src = torch.ones(64 << 20)          # 256 MiB
    dst = torch.empty_like(src)
    bw = rate(lambda: dst.copy_(src), 2.0 * src.numel() * 4)
    return Hardware("cpu (calibrated)", "cpu", flops, vector_flops=flops["float32"],
                    bandwidth=bw, min_block_bytes=chunking.CPU.min_block_bytes)


# ------------------------------------------------------------------ variants

def _tk():
    """The Triton planning functions (import needs triton, not a GPU)."""
    from fastirl.backends import triton_kernels
    return triton_kernels


def _device_info(hw: Hardware):
    tk = _tk()
    try:
        return tk.gpu_info(hw.name)
    except (ValueError, KeyError):
        return tk.DeviceInfo("sm90", hw.sm_count or 132, hw.l2_bytes or (50 << 20))


def _engine_rows(backend: str, s: Shape, hw: Hardware, chunk_size: int | None = None) -> int:
    """Rows per engine chunk, as the backend picks them (its chunk policy)."""
    dt = s.torch_dtype
    if chunk_size is not None:
        return max(1, min(chunk_size, s.tokens))
    if backend == "triton-fused":
        tk = _tk()
        return tk.TritonFusedBackend(interpret=False).rows_per_chunk(
            s.tokens, s.vocab, s.hidden, dt, None)
    if backend == "torch":
        return chunking.rows_per_chunk(s.tokens, s.vocab, s.hidden, dt, hardware=hw,
                                       block_itemsize=4 if dt != torch.float64 else 8)
    return chunking.rows_per_chunk(s.tokens, s.vocab, s.hidden, dt, hardware=hw)


def _from_launches(launches, s: Shape, hw: Hardware, *, epi: str, softcap: bool,
                   dx_f32: bool = False) -> list[Op]:
    """Ops of the planner's launches (fastirl.backends.triton_kernels.Launch)."""
    isz = s.isz
    ops = []
    for ln in launches:
        k = ln.kernel
        if k == "gemm_logits":
            m, n, kk = ln.grid
            ops.append(gemm("gemm_logits", m, n, kk, s.dtype))
        elif k == "gemm_dx":
            m, n, kk = ln.grid
            ops.append(gemm("gemm_dx", m, n, kk, s.dtype, out_bytes=4 if dx_f32 else isz,
                            accumulate=dx_f32))
        elif k == "gemm_dw":
            m, n, kk = ln.grid
            ops.append(gemm("gemm_dw", m, n, kk, s.dtype, out_bytes=4, accumulate=True))
        elif k == "logits_stats":
            rows, vocab = ln.rows, ln.vocab
            parts = ln.splits * rows * 4 * 4
            ops.append(elementwise("epilogue_stats", rows * vocab, isz,
                                   _epi(epi, "stats", softcap), parts))
        elif k == "merge":
            ops.append(elementwise("merge", ln.rows, ln.splits * 16 + 20, 4 * ln.splits))
        elif k == "logits_grad":
            ops.append(elementwise("epilogue_grad", ln.rows * ln.vocab, 2 * isz,
                                   _epi(epi, "grad", softcap)))
        elif k in ("linear_fwd", "linear_bwd_rows"):
            ops.append(_fused_tiles(ln, s, hw, epi=epi, softcap=softcap))
        else:
            raise ValueError(f"roofline: no cost model for launch {k!r}")
    return ops


def _fused_tiles(ln, s: Shape, hw: Hardware, *, epi: str, softcap: bool) -> Op:
    """A fused linear kernel over (row block, vocabulary split) programs.

    Programs resident at once: one per SM, ``group_m`` row blocks x SMs /
    group_m splits.  Per wave, each resident split streams its W slab from HBM
    once (the resident programs of a split walk it in step; with a staggered
    walk they are at different blocks, so the slab is read once per program
    unless the slabs of the resident splits fit in L2), and each x panel is
    read once (it stays in L2 when a step's working set does, else once per
    step).  Backward (linear_bwd_rows): three GEMM tiles per step, W and x
    tiles read twice, float32 atomics of dx (BM x H per program and step) and
    dW (BN x H): 8 bytes each of L2 traffic, and in HBM one read-modify-write
    of each dW tile per wave and split (per program when staggered) and of
    each dx panel per wave."""
    cfg = ln.config
    bm, bn = cfg.block_m, cfg.block_n
    n, V, H, isz = ln.rows, ln.vocab, ln.hidden, s.isz
    programs = ln.grid[0]
    P = max(1, hw.sm_count)
    G = max(1, min(ln.group_m, P))
    per = max(1, ln.blocks_per_split)
    waves = math.ceil(programs / P)
    slab = per * bn * H * isz
    step_set = (P // G) * bn * H * isz + G * bm * H * isz
    fits = step_set <= hw.l2_bytes
    spread = G if ln.stagger and (P // G) * slab > hw.l2_bytes else 1
    w_wave = (P // G) * slab * spread
    x_wave = G * bm * H * isz * (1 if fits else per)
    bwd = ln.kernel == "linear_bwd_rows"
    reads = 2 if bwd else 1
    flops = 2.0 * n * V * H * (3 if bwd else 1)
    flops_epi = n * V * _epi(epi, "grad" if bwd else "stats", softcap)
    l2 = 0.0
    rmw = 0.0
    if bwd:
        l2 = 8.0 * programs * per * (bm + bn) * H
        rmw = waves * ((P // G) * per * bn * H * 8 * spread + G * bm * H * 8)
    partials = 0 if bwd else ln.splits * n * 16
    bytes_ = waves * reads * (w_wave + x_wave) + rmw + partials
    # tensor-core FLOPs and the epilogue's vector FLOPs share the SMs: charge both
    t_flops = flops + flops_epi * hw.gemm_flops(s.dtype) / hw.vector_flops
    return Op(ln.kernel, t_flops, bytes_, s.dtype, l2_bytes=l2)


def _fastirl_gpu(backend: str, preset: str, s: Shape, hw: Hardware, *, softcap: bool,
                 single_pass: bool) -> tuple[list[Op], float, str]:
    """(ops, peak extra bytes, note) of fastirl backend ``backend`` on a GPU."""
    tk = _tk()
    dev = _device_info(hw)
    if preset == "highest" and s.dtype != "float32":
        s = replace(s, dtype="float32")    # upcast: float32 GEMMs (no TF32 by default)
    dt = s.torch_dtype
    N, V, H = s.tokens, s.vocab, s.hidden
    grads = V * H * 4 + N * H * s.isz + V * H * s.isz   # float32 dW, dx, dW cast
    if backend in ("triton", "cuda"):
        rows = _engine_rows(backend, s, hw)
        launches = tk.plan_epilogue(N, V, H, dt, dev=dev, rows_per_chunk=rows,
                                    single_pass=single_pass)
        epi = "exp2"
        ops = _from_launches(launches, s, hw, epi=epi, softcap=softcap)
        ops.append(elementwise("dW_cast", V * H, 4 + s.isz, 1.0))
        peak = grads + rows * V * s.isz
        return ops, peak, f"{math.ceil(N / rows)} chunks of {rows} rows"
    if backend == "triton-fused":
        rows = _engine_rows(backend, s, hw)
        ops: list[Op] = []
        for r0 in range(0, N, rows):
            c = min(rows, N - r0)
            ops += _from_launches(tk.plan_fused_forward(c, V, H, dt, dev=dev), s, hw,
                                  epi="exp2", softcap=softcap)
            det = preset != "fast"
            bwd = tk.plan_fused_backward(c, V, H, dt, dev=dev, deterministic=det)
            ops += _from_launches(bwd, s, hw, epi="exp2", softcap=softcap, dx_f32=det)
        ops.append(elementwise("dW_cast", V * H, 4 + s.isz, 1.0))
        cols = tk.slab_columns(min(rows, N), V, dt)
        peak = grads + N * H * 4 + (0 if preset == "fast" else min(rows, N) * cols * s.isz)
        return ops, peak, f"{math.ceil(N / rows)} engine chunks"
    if backend == "torch":
        return _torch_backend(s, hw, softcap=softcap, epi="exp2")
    raise ValueError(f"roofline: unknown fastirl backend {backend!r}")


def _torch_backend(s: Shape, hw: Hardware, *, softcap: bool, epi: str,
                   chunk_size: int | None = None) -> tuple[list[Op], float, str]:
    """fastirl's pure-PyTorch backend: per chunk a GEMM, a float32 copy of the
    block, ~6 element-wise passes (max, sub, exp, sum, scale, one-hot), a
    float32 dW GEMM and a dx GEMM on a copy of dz in the input dtype."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    rows = _engine_rows("torch", s, hw, chunk_size)
    ops: list[Op] = []
    f32 = s.dtype == "float32"
    for c in _chunks(N, rows):
        e = c * V
        ops.append(gemm("gemm_logits", c, V, H, s.dtype))
        if not f32:
            ops.append(elementwise("to_float32", e, isz + 4, 1.0))
        ops.append(elementwise("stats_passes", e, 4 * 5, _epi(epi, "stats", softcap) / 2))
        ops.append(elementwise("grad_passes", e, 4 * 4, 4.0))
        ops.append(gemm("gemm_dw", V, H, c, "float32", out_bytes=4, accumulate=True))
        if not f32:
            ops.append(elementwise("dz_cast", e, 4 + isz, 1.0))
        ops.append(gemm("gemm_dx", c, H, V, s.dtype))
    if not f32:
        ops.append(elementwise("dW_cast", V * H, 4 + isz, 1.0))
    peak = V * H * 4 + N * H * isz + (0 if f32 else V * H * isz) + rows * V * 4
    return ops, peak, f"{math.ceil(N / rows)} chunks of {rows} rows"


def _chunks(n: int, rows: int) -> list[int]:
    """Rows each engine chunk computes in single-pass mode: its own plus one
    look-ahead row (the next chunk's first, for V of the TD term), except the
    last chunk."""
    out = []
    for r0 in range(0, n, max(1, rows)):
        c = min(rows, n - r0)
        out.append(c + 1 if r0 + c < n else c)
    return out


def _liger(s: Shape) -> tuple[list[Op], float, str]:
    """Liger-Kernel's fused linear cross-entropy: chunks of
    next_pow2(ceil(N / ceil(V / H))) rows; per chunk the logits GEMM, the
    cross-entropy kernel (reads the block twice, writes dz in place), the dx
    GEMM and ``addmm`` of dW in the weight's dtype (read-modify-write)."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    inc = -(-V // H)
    rows = 1 << max(0, math.ceil(math.log2(max(1, -(-N // inc)))))
    ops = []
    for r0 in range(0, N, rows):
        c = min(rows, N - r0)
        ops.append(gemm("gemm_logits", c, V, H, s.dtype))
        ops.append(elementwise("ce_kernel", c * V, 3 * isz, 24.0))
        ops.append(gemm("gemm_dx", c, H, V, s.dtype))
        ops.append(gemm("gemm_dw", V, H, c, s.dtype, accumulate=True))
    peak = rows * V * isz + V * H * isz + N * H * isz
    return ops, peak, f"{math.ceil(N / rows)} chunks of {rows} rows (dW in {s.dtype})"


def _cce(s: Shape, hw: Hardware) -> tuple[list[Op], float, str]:
    """Cut Cross-Entropy (``impl="cce"``): a fused forward (logits tiles ->
    log-sum-exp, never stored) and a fused backward that recomputes the tiles
    and adds dx and dW with float32 atomics; modelled without its gradient
    filtering (which skips vocabulary blocks whose softmax is below bf16
    resolution: much of the backward for trained models, none for random ones).
    Tiles 128 x 128, rows grouped for L2 like a GEMM (W once per wave)."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    bm = bn = 128
    rb, vb = -(-N // bm), -(-V // bn)
    P = max(1, hw.sm_count)
    waves = math.ceil(rb * vb / P)
    # per wave a square-ish block of tiles: its x and W panels read once
    side = max(1, int(math.sqrt(P)))
    per_wave = side * (bm + bn) * H * isz
    fwd = Op("cce_fwd", 2.0 * N * V * H, waves * per_wave + N * 8, s.dtype)
    l2 = 8.0 * rb * vb * (bm + bn) * H               # dx and dW float32 atomics
    rmw = waves * side * (bm + bn) * H * 8            # their tiles' read-modify-write in HBM
    bwd = Op("cce_bwd", 3 * 2.0 * N * V * H, 2 * waves * per_wave + rmw, s.dtype, l2_bytes=l2)
    peak = V * H * 4 + N * H * 4 + V * H * isz + N * H * isz
    return [fwd, bwd], peak, "no gradient filtering modelled"


def _naive(s: Shape) -> tuple[list[Op], float, str]:
    """``fastirl.reference.iq_loss`` eagerly: the (N, V) logits, log-sum-exp,
    gather and their autograd: about 12 element-wise passes over (N, V)
    elements (division by tau, logsumexp's max / exp / sum, the backward's
    softmax, the gather's scatter, sums) and five (N, V) tensors at the peak."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    e = N * V
    ops = [gemm("gemm_logits", N, V, H, s.dtype),
           elementwise("elementwise_passes", e, 12 * isz, 30.0),
           gemm("gemm_dx", N, H, V, s.dtype), gemm("gemm_dw", V, H, N, s.dtype)]
    return ops, 5.0 * e * max(isz, 2) + V * H * isz + N * H * isz, "(N, V) logits"


def _floor(s: Shape) -> tuple[list[Op], float, str]:
    N, V, H = s.tokens, s.vocab, s.hidden
    ops = [gemm("gemm_logits", N, V, H, s.dtype), gemm("gemm_dx", N, H, V, s.dtype),
           gemm("gemm_dw", V, H, N, s.dtype)]
    return ops, N * V * s.isz + (V * H + N * H) * s.isz, "three bare GEMMs"


# The fastirl CUDA backends x presets of the model ("fast" only where it
# changes the launches: the fused backward's atomics).
_CUDA_FASTIRL = [("cuda", "default"), ("cuda", "highest"), ("triton", "default"),
                 ("triton", "highest"), ("triton-fused", "default"), ("triton-fused", "fast"),
                 ("torch", "default")]


def _variant_name(backend: str, preset: str) -> str:
    return f"fastirl-{backend}" + ("" if preset == "default" else f"-{preset}")


def cuda_variants() -> list[str]:
    return ([_variant_name(b, p) for b, p in _CUDA_FASTIRL]
            + ["liger", "cce", "naive", "matmul-floor"])


def cpu_variants() -> list[str]:
    return ["fastirl-cpu", "fastirl-torch", "naive", "matmul-floor"]


def _split(variant: str) -> tuple[str, str]:
    rest = variant[len("fastirl-"):]
    for preset in ("fast", "highest"):
        if rest.endswith("-" + preset):
            return rest[: -len(preset) - 1], preset
    return rest, "default"


def _fastirl_cpu(s: Shape, hw: Hardware, *, softcap: bool,
                 chunk_size: int | None = None) -> tuple[list[Op], float, str]:
    """fastirl's "cpu" backend: per chunk the logits GEMM (block in the input
    dtype), the statistics and gradient epilogues (one read; one read + write),
    dx = dz @ W and dW: a float32 addmm for float32 inputs, else low-precision
    GEMMs per vocabulary slab added into the float32 accumulator."""
    N, V, H, isz = s.tokens, s.vocab, s.hidden, s.isz
    dt = s.torch_dtype
    rows = chunking.rows_per_chunk(N, V, H, dt, hardware=hw, chunk_size=chunk_size,
                                   block_itemsize=4 if dt == torch.float32 else 2)
    ops: list[Op] = []
    lowp = s.dtype != "float32"
    for c in _chunks(N, rows):
        ops.append(gemm("gemm_logits", c, V, H, s.dtype))
        ops.append(elementwise("epilogue_stats", c * V, isz, _epi("poly", "stats", softcap)))
        ops.append(elementwise("epilogue_grad", c * V, 2 * isz, _epi("poly", "grad", softcap)))
        ops.append(gemm("gemm_dx", c, H, V, s.dtype))
        if lowp:
            slab = max(1, min(V, gemm_epilogue._DW_SLAB_BYTES // (H * isz)))
            nslab = -(-V // slab)
            # every slab GEMM streams the (c, H) x panel again
            ops.append(Op("gemm_dw", 2.0 * V * H * c,
                          (V * c + nslab * c * H) * isz + V * H * isz, s.dtype))
            ops.append(elementwise("dW_add", V * H, isz + 8, 1.0))
        else:
            ops.append(gemm("gemm_dw", V, H, c, s.dtype, out_bytes=4, accumulate=True))
    if lowp:
        ops.append(elementwise("dW_cast", V * H, 4 + isz, 1.0))
    peak = V * H * 4 + N * H * isz + (V * H * isz if lowp else 0) + rows * V * (
        4 if not lowp else isz)
    return ops, peak, f"{math.ceil(N / rows)} chunks of {rows} rows"


def predict(variant: str, s: Shape, hw: Hardware, *, softcap: bool = False,
            single_pass: bool = True, chunk_size: int | None = None) -> Prediction:
    """The modelled launches of ``variant`` (a fastirl-bench variant name) at ``s``.
    chunk_size: the engine's explicit chunk_size (CPU variants), else the policy's."""
    mode = "IQ"
    if variant == "matmul-floor":
        ops, peak, note = _floor(s)
        mode = "floor"
    elif variant == "naive":
        ops, peak, note = _naive(s)
    elif variant == "liger":
        ops, peak, note = _liger(s)
        mode = "CE"
    elif variant == "cce":
        ops, peak, note = _cce(s, hw)
        mode = "CE"
    elif variant.startswith("fastirl-"):
        backend, preset = _split(variant)
        if backend.endswith("-ce"):
            backend, mode = backend[:-3], "CE"
        if hw.kind == "cpu":
            if backend == "cpu":
                ops, peak, note = _fastirl_cpu(s, hw, softcap=softcap, chunk_size=chunk_size)
            elif backend == "torch":
                ops, peak, note = _torch_backend(s, hw, softcap=softcap, epi="poly",
                                                 chunk_size=chunk_size)
            else:
                raise ValueError(f"roofline: {variant!r} is not a CPU variant")
        else:
            ops, peak, note = _fastirl_gpu(backend, preset, s, hw, softcap=softcap,
                                           single_pass=single_pass)
    else:
        raise ValueError(f"roofline: unknown variant {variant!r}")
    return Prediction(variant, mode, ops, hw, s, peak, note)


def predict_all(s: Shape, hw: Hardware, variants: list[str] | None = None,
                **kw) -> list[Prediction]:
    names = variants or (cuda_variants() if hw.kind == "cuda" else cpu_variants())
    preds = [predict(v, s, hw, **kw) for v in names]
    floor = predict("matmul-floor", s, hw).seconds
    for p in preds:
        p.vs_floor = p.seconds / floor
    return preds


def bench_hardware(device: torch.device, threads: int | None = None) -> Hardware:
    """The figures ``fastirl-bench`` predicts with: this CPU calibrated (about
    two seconds), or the known GPU matching the CUDA device's name."""
    if device.type == "cpu":
        return calibrate_cpu(seconds=2.0, threads=threads)
    return chunking.hardware_for(device)


def predict_ms(variant: str, *, tokens: int, hidden: int, vocab: int, dtype: str,
               hw: Hardware, loss_preset: str = "default") -> float | None:
    """Predicted forward+backward milliseconds of a ``fastirl-bench`` variant,
    or None for the variants the model does not cover on this device."""
    name = variant[:-3] if variant.startswith("fastirl-") and variant.endswith("-ce") else variant
    if name.startswith("fastirl-") and loss_preset != "default":
        if hw.kind == "cpu":
            return None
        name = f"{name}-{loss_preset}"
    known = cpu_variants() if hw.kind == "cpu" else cuda_variants()
    if name not in known:
        return None
    try:
        p = predict(name, Shape(tokens, hidden, vocab, dtype), hw)
    except (ValueError, ImportError):
        return None
    return p.seconds * 1e3


def rows(preds: list[Prediction]) -> list[dict]:
    """CSV rows (CSV_COLUMNS) of predictions."""
    return [dict(variant=p.variant, gpu=p.hw.name, launches=p.launches, flops=f"{p.flops:.6g}",
                 hbm_bytes=f"{p.hbm_bytes:.6g}", predicted_ms=f"{p.seconds * 1e3:.6g}",
                 predicted_vs_floor=f"{p.vs_floor:.4f}", mode=p.mode, tokens=p.shape.tokens,
                 hidden=p.shape.hidden, vocab=p.shape.vocab, dtype=p.shape.dtype,
                 peak_extra_mib=f"{p.peak_extra_bytes / 2**20:.1f}") for p in preds]


# ------------------------------------------------------------------ output

def _fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms / 1e3:.2f} s" if ms >= 1e4 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def table(preds: list[Prediction], markdown: bool = False) -> str:
    head = ["variant", "launches", "TFLOP", "HBM GB", "predicted", "vs floor", "peak extra",
            "note"]
    cells = [[p.variant, str(p.launches), f"{p.flops / 1e12:.2f}", f"{p.hbm_bytes / 1e9:.1f}",
              _fmt_ms(p.seconds), f"{p.vs_floor:.2f}x", f"{p.peak_extra_bytes / 2**30:.2f} GiB",
              p.note] for p in preds]
    from .report import markdown_table, text_table
    return markdown_table(head, cells) if markdown else text_table(head, cells)


def sweep(base: Shape, hw: Hardware, tokens: list[int], variants: list[str] | None = None
          ) -> dict[int, list[Prediction]]:
    return {n: predict_all(replace(base, tokens=n), hw, variants) for n in tokens}


def sweep_table(sw: dict[int, list[Prediction]], what: str = "time",
                markdown: bool = False) -> str:
    ns = sorted(sw)
    names = [p.variant for p in sw[ns[0]]]
    head = ["variant"] + [f"N={n // 1024}k" if n % 1024 == 0 else f"N={n}" for n in ns]
    cells = []
    for i, name in enumerate(names):
        row = [name]
        for n in ns:
            p = sw[n][i]
            row.append(_fmt_ms(p.seconds) + f" ({p.vs_floor:.2f}x)" if what == "time"
                       else f"{p.peak_extra_bytes / 2**30:.2f} GiB")
        cells.append(row)
    from .report import markdown_table, text_table
    return markdown_table(head, cells) if markdown else text_table(head, cells)


def plot(sw: dict[int, list[Prediction]], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ns = sorted(sw)
    names = [p.variant for p in sw[ns[0]]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, name in enumerate(names):
        style = dict(marker="o", label=name, linestyle="--" if not name.startswith("fastirl")
                     else "-")
        axes[0].plot(ns, [sw[n][i].seconds * 1e3 for n in ns], **style)
        if name != "matmul-floor":
            axes[1].plot(ns, [sw[n][i].peak_extra_bytes / 2**30 for n in ns], **style)
    for ax, label in ((axes[0], "predicted forward+backward (ms)"),
                      (axes[1], "modelled peak extra memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens N = B*T")
        ax.set_ylabel(label)
        ax.grid(which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    s0 = sw[ns[0]][0]
    fig.suptitle(f"roofline model: H={s0.shape.hidden} V={s0.shape.vocab} {s0.shape.dtype} "
                 f"on {s0.hw.name}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastirl.bench.roofline",
        description="Roofline cost model of the fused IQ loss and its anchors: per launch "
                    "FLOPs and HBM bytes, predicted time = sum of max(flops/peak, "
                    "bytes/bandwidth).")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--gpu", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="gpu: the --gpu figures; cpu: this CPU, calibrated (a few seconds)")
    p.add_argument("--threads", type=int, help="torch threads of the CPU calibration")
    p.add_argument("--variants", help="comma-separated variant names (default: all of the device)")
    p.add_argument("--softcap", action="store_true", help="model a logit soft cap")
    p.add_argument("--sweep-tokens", default="1024,2048,4096,8192,16384,32768,65536",
                   help="token counts of the sweep table / plot ('' for none)")
    p.add_argument("--csv", help="write the main shape's predictions (and the sweep) to this CSV")
    p.add_argument("--png", help="plot predicted time and memory against tokens to this PNG")
    p.add_argument("--markdown", action="store_true", help="markdown tables")
    p.add_argument("--breakdown", action="store_true", help="per-launch-kind times per variant")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for k in ("batch", "seq", "hidden", "vocab"):
        if getattr(args, k) < 1:
            print(f"roofline: --{k} must be >= 1", file=sys.stderr)
            return 2
    try:
        hw = calibrate_cpu(threads=args.threads) if args.device == "cpu" else gpu(args.gpu)
    except ValueError as exc:
        print(f"roofline: {exc}", file=sys.stderr)
        return 2
    s = Shape(args.batch * args.seq, args.hidden, args.vocab, args.dtype)
    names = [v.strip() for v in args.variants.split(",")] if args.variants else None
    try:
        preds = predict_all(s, hw, names, softcap=args.softcap)
    except ValueError as exc:
        print(f"roofline: {exc}", file=sys.stderr)
        return 2
    if hw.kind == "cpu":
        print(f"calibrated CPU: {hw.gemm_flops('bfloat16') / 1e12:.2f} TFLOP/s bf16, "
              f"{hw.gemm_flops('float32') / 1e12:.3f} TFLOP/s fp32 GEMM, "
              f"{hw.bandwidth / 1e9:.1f} GB/s ({torch.get_num_threads()} threads)")
    print(f"N={s.tokens} H={s.hidden} V={s.vocab} {s.dtype} on {hw.name}:")
    print(table(preds, args.markdown))
    if args.breakdown:
        for p in preds:
            parts = ", ".join(f"{k} {_fmt_ms(v)}" for k, v in p.by_kind().items())
            print(f"  {p.variant}: {parts}")
    all_rows = rows(preds)
    tokens = [int(t) for t in args.sweep_tokens.split(",") if t.strip()]
    if tokens:
        sw = sweep(s, hw, tokens, names)
        print("\npredicted forward+backward against tokens (x the floor):")
        print(sweep_table(sw, "time", args.markdown))
        print("\nmodelled peak extra memory against tokens:")
        print(sweep_table(sw, "memory", args.markdown))
        for n in sorted(sw):
            if n != s.tokens:
                all_rows += rows(sw[n])
        if args.png:
            out = plot(sw, Path(args.png))
            print(f"wrote {out}" if out else "matplotlib not installed: no plot")
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            w.writerows(all_rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
