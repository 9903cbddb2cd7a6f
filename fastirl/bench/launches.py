"""What a launch costs: the primitives of the roofline cost model, shared by
every variant's model (fastirl's own, :mod:`fastirl.bench.model`; the peers',
:mod:`fastirl.bench.peers`).

For a shape (:class:`Shape`: N = B·T tokens, hidden H, vocabulary V, dtype)
and a device, each variant is a list of launches (:class:`Op`: GEMMs and
kernels), each with its FLOPs, its main-memory (HBM / DRAM) bytes and how many
kernel launches it stands for.  A launch is predicted to take

    max(tc, tm) + (1 - overlap) * min(tc, tm)   (GEMMs)   /   max(tc, tm)  (others)
    + launches * launch_s  (+ lock time, + L2 time where it binds)

with ``tc = FLOPs / (peak * efficiency)`` and ``tm = bytes / (bandwidth *
efficiency)``: the data-sheet peaks of :mod:`fastirl.backends.hardware` times
the achievable fractions of the device's :class:`~fastirl.backends.hardware.Calibration`
(fitted to published measurements: :mod:`fastirl.bench.calibration`).
``calibrated=False`` gives the bare data-sheet roofline (the floor of what a
kernel can do).  A :class:`Prediction` is a variant's launches on a device.

The building blocks: :func:`gemm` (work tile-quantised to :data:`GEMM_TILE`),
:func:`elementwise`, :func:`small_launches` (launch cost only), and the
epilogues' per-logit cost (:data:`EPILOGUE_FLOPS`, :data:`SOFTCAP_FLOPS`).
:class:`Options` holds the model's switches (calibration, the inputs'
distribution, and the engine behaviours :mod:`fastirl.bench.model` follows).

``--device cpu`` (:func:`calibrate_cpu`) replaces the GPU figures by this
CPU's, measured in a short calibration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fastirl.backends import chunking
from fastirl.backends.hardware import Calibration, Hardware

__all__ = ["ISZ", "EPILOGUE_FLOPS", "SOFTCAP_FLOPS", "GEMM_TILE", "torch_has_addmm_out_dtype",
           "Options", "DEFAULT_OPTIONS", "Op", "Shape", "Prediction", "gemm", "elementwise",
           "small_launches", "calibrate_cpu"]

ISZ = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# Element-wise cost of the epilogues, in float32 FLOP-equivalents per logit
# (vector instructions x 2, an FMA counting as two FLOPs as in the peak).
#   stats: max, exp, sum (+ converts);  grad: sub, mul, exp, mul (+ converts).
# "poly": the CPU's branch-free Cephes exp (iq_math.h exp_, ~20 instructions);
# "exp2": the GPU's hardware exp2 on pre-scaled inputs (a few instructions).
EPILOGUE_FLOPS = {"poly": {"stats": 52.0, "grad": 54.0}, "exp2": {"stats": 12.0, "grad": 12.0}}
# The soft cap's tanh on top (per logit and pass, polynomial / hardware).
SOFTCAP_FLOPS = {"poly": 60.0, "exp2": 16.0}

# cuBLAS-like tile quantisation of a GEMM's work: (m, n) in 128 x 128 output
# tiles, k in steps of 64.  A GEMM with m = 4097 does 33 tile rows of work.
GEMM_TILE = (128, 128, 64)


def torch_has_addmm_out_dtype(version: str | None = None) -> bool:
    """Whether torch (``version``, default the installed one) has CUDA
    ``addmm(..., out_dtype=)`` (PyTorch 2.8 and later)."""
    v = (version or torch.__version__).split("+")[0].split(".")
    try:
        return (int(v[0]), int(v[1])) >= (2, 8)
    except (ValueError, IndexError):
        return True


@dataclass(frozen=True)
class Options:
    """The switches of the model: what the default backend's code does now.

    dw_zero_fill: the engine zero-fills the float32 dW accumulator (a memset
        of V·H·4 bytes) on every call that wants dW.
    lookahead: single-pass chunks (all but the last) compute one look-ahead
        row: their GEMMs have M (logits, dx) or K (dW) = c + 1.
    addmm_out_dtype: cuBLAS accumulates the dW GEMM into float32 (torch >=
        2.8); False models the fallback (64 MiB low-precision slabs, each
        added into the accumulator through a float32 temporary).
    engine_launches: charge the engine's and the objective's small launches.
    calibrated: achievable fractions (True) or data-sheet peaks (False).
    inputs: the logits' distribution of the inputs ("lm" or "random",
        :mod:`fastirl.bench.logits`): decides how much of Cut Cross-Entropy's
        backward its gradient filter skips.

    Switches for engine changes of the memory plans (default: what the
    engine does now; GPU backends only):

    slab_dx_direct: the "slabs" plan's dx GEMM accumulates straight into the
        float32 (N, H) accumulator (``addmm(out_dtype=float32)``, as
        ``gemm_epilogue.grad_gemms(dx_acc=)`` can) instead of writing each
        block's dx in the input dtype and adding it in: no (r, H) temporaries,
        no add kernel.
    direct_dw: where one GEMM makes a whole dW row range (a "rows" plan of
        one chunk; a "slabs" plan with one block of rows), cuBLAS writes it in
        the weight's dtype (float32 accumulation inside the GEMM): no float32
        dW accumulator or slab buffer, no zero-fill, no cast or copy.
    slab_buffer_reuse: the "slabs" plan zero-fills one float32 (S, H) dW
        buffer per slab (what the engine does) instead of allocating the next
        slab's while the last one is still referenced (two buffers at every
        slab change, as it did before).
    """

    dw_zero_fill: bool = True
    lookahead: bool = True
    addmm_out_dtype: bool = True
    engine_launches: bool = True
    calibrated: bool = True
    inputs: str = "lm"
    slab_dx_direct: bool = False
    direct_dw: bool = False
    slab_buffer_reuse: bool = True


DEFAULT_OPTIONS = Options()


@dataclass(frozen=True)
class Op:
    """One launch (or ``count`` identical ones).

    unit: a GEMM operand type ("bfloat16", "tf32", ...) for cuBLAS GEMMs,
        "fused:<dtype>" for Triton kernels that fuse GEMM tiles with a
        reduction, "vector" for element-wise / row-wise kernels.
    work: FLOPs charged (the tile-quantised work of a GEMM), default ``flops``.
    l2_bytes: L2-side traffic (float32 atomics), at ``hw.l2_bandwidth``.
    lock_adds: lock-protected tile-slice read-modify-writes (CCE's backward).
    launches: kernel launches this op stands for (per count).
    """

    name: str
    flops: float
    bytes: float
    unit: str = "vector"
    count: int = 1
    l2_bytes: float = 0.0
    launches: int = 1
    lock_adds: float = 0.0
    work: float | None = None

    def seconds(self, hw: Hardware, calibrated: bool = True) -> float:
        cal = hw.calibration if calibrated else Calibration()
        work = self.flops if self.work is None else self.work
        gemm_unit = self.unit != "vector"
        if not gemm_unit:
            peak = hw.vector_flops
        elif self.unit.startswith("fused:"):
            peak = hw.gemm_flops(self.unit[6:]) * cal.fused_gemm
        else:
            peak = hw.gemm_flops(self.unit) * cal.gemm
        tc = work / peak if peak else 0.0
        tm = self.bytes / (hw.bandwidth * cal.bandwidth) if hw.bandwidth else 0.0
        t = max(tc, tm)
        if gemm_unit:
            t += (1.0 - cal.overlap) * min(tc, tm)
        if self.l2_bytes and hw.l2_bandwidth:
            t = max(t, self.l2_bytes / hw.l2_bandwidth)
        if self.lock_adds and hw.sm_count:
            t += self.lock_adds * cal.lock_add_s / hw.sm_count
        t += self.launches * cal.launch_s
        return self.count * t


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    vocab: int
    dtype: str = "bfloat16"

    @property
    def isz(self) -> int:
        return ISZ[self.dtype]

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
    calibrated: bool = True

    @property
    def launches(self) -> int:
        return sum(o.count * o.launches for o in self.ops)

    @property
    def flops(self) -> float:
        return sum(o.flops * o.count for o in self.ops)

    @property
    def hbm_bytes(self) -> float:
        return sum(o.bytes * o.count for o in self.ops)

    @property
    def seconds(self) -> float:
        return sum(o.seconds(self.hw, self.calibrated) for o in self.ops)

    def by_kind(self) -> dict[str, float]:
        """Predicted seconds per launch name (the breakdown)."""
        out: dict[str, float] = {}
        for o in self.ops:
            out[o.name] = out.get(o.name, 0.0) + o.seconds(self.hw, self.calibrated)
        return out


# ------------------------------------------------------------------ building blocks

def _quantised(m: int, n: int, k: int) -> float:
    tm, tn, tk = GEMM_TILE
    return 2.0 * (-(-m // tm) * tm) * (-(-n // tn) * tn) * (-(-k // tk) * tk)


def gemm(name: str, m: int, n: int, k: int, dtype: str, *, out_bytes: int | None = None,
         accumulate: bool = False, unit: str | None = None, a_reads: int = 1) -> Op:
    """(m, k) @ (k, n): operands read once (a_reads: times the (m, k) operand
    is streamed), the (m, n) result written (read too when accumulating);
    the work is tile-quantised (GEMM_TILE)."""
    isz = ISZ[dtype]
    ob = isz if out_bytes is None else out_bytes
    c = m * n * ob * (2 if accumulate else 1)
    return Op(name, 2.0 * m * n * k, (a_reads * m * k + k * n) * isz + c, unit or dtype,
              work=_quantised(m, n, k))


def elementwise(name: str, elements: float, bytes_per: float, flops_per: float,
                extra_bytes: float = 0.0, launches: int = 1) -> Op:
    return Op(name, elements * flops_per, elements * bytes_per + extra_bytes, "vector",
              launches=launches)


def small_launches(name: str, launches: int) -> Op:
    """Tiny kernels (per-row vectors, bookkeeping): their launch cost only."""
    return Op(name, 0.0, 0.0, "vector", launches=launches)


def _epi(kind: str, which: str, softcap: bool) -> float:
    return EPILOGUE_FLOPS[kind][which] + (SOFTCAP_FLOPS[kind] if softcap else 0.0)


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
                    bandwidth=bw, min_block_bytes=chunking.CPU.min_block_bytes, arch="cpu",
                    calibration=Calibration(source="measured on this CPU"))
