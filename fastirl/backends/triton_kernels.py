"""Triton backends and their launch planning.

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

Launch planning (pure functions: no GPU, no tensors; what the backends launch
and what the cost model :mod:`fastirl.bench.roofline` reads)
------------------------------------------------------------------------------
``DeviceInfo(arch, sm_count, l2_bytes)``, ``device_info(device)``,
``gpu_info(name)`` for "a100" / "h100" / "h200";
``Launch`` (kernel, grid, config, splits, blocks_per_split, group_m, stagger,
rows, vocab, hidden);
``plan_grid(row_blocks, vocab_blocks, block_m=, block_n=, hidden=, itemsize=,
dev=, requested=None)`` -> ``(splits, blocks_per_split, group_m)``;
``plan_fused_forward(n, vocab, hidden, dtype, dev=, ...)`` -> [Launch];
``plan_fused_backward(n, vocab, hidden, dtype, dev=, deterministic=, need_x=,
need_weight=, need_bias=, ...)`` -> [Launch] (GEMMs as kernels "gemm_logits",
"gemm_dx", "gemm_dw" with ``grid = (m, n, k)``);
``plan_logits_forward(n, vocab, dtype, dev=)`` / ``plan_logits_backward(...)``
-> [Launch] (the epilogue kernels of one chunk);
``plan_epilogue(n, vocab, hidden, dtype, dev=, rows_per_chunk=, need_x=,
need_weight=, need_bias=, single_pass=)`` -> [Launch] (every launch of the
"triton" backend's forward + backward; the "cuda" backend launches the same
GEMMs around its two CUDA epilogue kernels);
``slab_columns(n, vocab, dtype)`` (vocabulary columns per slab of the
deterministic fused backward); ``config_key`` / ``pick_config`` (tile tables).

Tile configurations come from fixed tables (``CONFIGS``), not a runtime
autotuner, so that every launchable variant is known ahead of time;
:mod:`.triton_aot` compiles all of them for sm_80 / sm_90 and reports
registers, spills and shared memory.  Sizes that vary between calls (rows,
splits) are ``do_not_specialize`` arguments: one compilation serves every
chunk.  Every launch runs under the inputs' device (``torch.cuda.device``).

Inputs other than float32 / bfloat16 / float16 (float64) are delegated to the
PyTorch backend.  Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors
(slowly: for tests), with GEMM tiles cast to float32 first.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from .base import LogitSpec, RowStats
from .gemm_epilogue import _FLOAT as _FLOAT_DTYPES
from .gemm_epilogue import GemmEpilogueBackend, dz_scale, grad_gemms

try:
    import triton  # noqa: F401  (fail here, with the reason, when Triton is missing)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"triton is not installed ({exc})") from exc

from . import triton_linear as K
from . import triton_logits as L
from .torch_chunked import TorchChunkedBackend

__all__ = ["TritonBackend", "TritonFusedBackend", "TileConfig", "CONFIGS", "pick_config",
           "config_key", "load", "load_fused", "INTERPRET", "DeviceInfo", "Launch", "device_info",
           "gpu_info", "plan_grid", "plan_fused_forward", "plan_fused_backward",
           "plan_logits_forward", "plan_logits_backward", "plan_epilogue", "slab_columns"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Bound of the rows of one engine chunk of the fused backend: its float32 dx
# accumulator (deterministic mode) stays under this many bytes.
_CHUNK_BYTES = 1 << 30
# Bytes of the dz block of one vocabulary slab of the deterministic fused backward.
_SLAB_BYTES = 256 << 20


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch parameters of one kernel variant."""

    block_m: int = 0        # rows per tile (BLOCK_R for the logits kernels)
    block_n: int = 0        # vocabulary columns per tile (BLOCK_V)
    block_k: int = 0        # K step of the logits GEMM
    block_h: int = 0        # H slice of the dx / dW GEMMs
    group_m: int = 8        # unused by the planner (kept for the AOT report's labels)
    num_warps: int = 4
    num_stages: int = 3


# kernel -> key -> config.  Linear kernels: key (arch class, dtype class,
# size class): arch "sm90" (compute capability 9.x / 10.x: wgmma, large shared
# memory) or "sm80" (others: mma.sync, whose operand fragments live in
# registers, so smaller tiles; see arch_class);
# dtype "16" (bf16 / fp16) or "32" (float32, 3xTF32 or TF32 dots, which need
# twice the operand registers); size "small" (n <= 64 rows), "large" or "any".
# sm90 tiles have BLOCK_M >= 64: a Hopper warpgroup MMA (wgmma) is 64 rows
# tall, and Triton falls back to mma.sync for a 32-row tile.  Every entry
# compiles without register spills (see triton_aot / docs/triton.md).
# Logits kernels: key ("any", vocabulary class).  "interp": the interpreter
# (large tiles, few programs).
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
        ("sm90", "16", "any"): TileConfig(64, 128, 64, 64, 8, 8, 3),
        ("sm90", "32", "any"): TileConfig(64, 32, 32, 16, 8, 4, 2),
        ("sm80", "16", "any"): TileConfig(64, 128, 64, 32, 8, 8, 3),
        ("sm80", "32", "any"): TileConfig(32, 64, 32, 16, 8, 8, 2),
        ("interp",): TileConfig(32, 128, 32, 32, 4, 4, 1),
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

LINEAR_KERNELS = ("linear_fwd", "linear_bwd_rows")
LOGITS_KERNELS = ("logits_stats", "logits_grad")


def config_key(kernel: str, *, dtype: torch.dtype = torch.float32, n: int = 0, vocab: int = 0,
               arch: str = "sm90", interpret: bool = INTERPRET) -> tuple[str, ...]:
    """The key in CONFIGS[kernel] the backend launches for these sizes."""
    if interpret or arch == "interp":
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


# ---------------------------------------------------------------- planning

@dataclass(frozen=True)
class DeviceInfo:
    """What the planner needs of a device.  sm_count 0: no parallel device (CPU
    under the interpreter): one vocabulary split unless one is requested."""

    arch: str = "sm90"          # CONFIGS family: "sm90", "sm80" or "interp"
    sm_count: int = 132
    l2_bytes: int = 50 << 20


# Public figures of the GPUs the cost model knows (arch class, SMs, L2 bytes).
_GPUS = {"a100": DeviceInfo("sm80", 108, 40 << 20), "h100": DeviceInfo("sm90", 132, 50 << 20),
         "h200": DeviceInfo("sm90", 132, 50 << 20)}
INTERP_DEVICE = DeviceInfo("interp", 0, 0)


def gpu_info(name: str) -> DeviceInfo:
    """DeviceInfo of a named GPU ("a100", "h100", "h200")."""
    try:
        return _GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"gpu must be one of {sorted(_GPUS)}, got {name!r}") from None


def device_index(device: torch.device) -> int:
    """The CUDA ordinal of ``device``; ``cuda`` without an index is the current one."""
    return device.index if device.index is not None else torch.cuda.current_device()


@lru_cache(maxsize=None)
def _cuda_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    arch = "sm90" if props.major in (9, 10) else "sm80"
    return DeviceInfo(arch, props.multi_processor_count,
                      int(getattr(props, "L2_cache_size", 0)) or (40 << 20))


def device_info(device: torch.device, interpret: bool = INTERPRET) -> DeviceInfo:
    """DeviceInfo of a tensor's device (INTERP_DEVICE for CPU / the interpreter).
    Hopper and datacenter Blackwell (capability 9.x / 10.x, ~227 KiB shared
    memory per block) use the "sm90" configs, others (8.x, and consumer parts
    such as 8.9 / 12.x with ~99 KiB) the "sm80" ones (at most 60 KiB)."""
    if interpret or device.type != "cuda":
        return INTERP_DEVICE
    return _cuda_info(device_index(device))


def _device_guard(device: torch.device):
    """Launch under the tensors' device (Triton launches on the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@dataclass(frozen=True)
class Launch:
    """One launch of a plan.  Kernels: the CONFIGS names, plus "gemm_logits",
    "gemm_dx", "gemm_dw" for cuBLAS GEMMs (then ``grid = (m, n, k)`` of an
    (m, k) @ (k, n) product in the input dtype, float32 output for "gemm_dw")."""

    kernel: str
    grid: tuple[int, ...]
    config: TileConfig | None = None
    splits: int = 1             # vocabulary splits (row kernels)
    blocks_per_split: int = 0   # vocabulary blocks each split walks
    group_m: int = 1            # row blocks per L2 group of the program order
    stagger: bool = False       # programs start their walk at different blocks
    rows: int = 0
    vocab: int = 0
    hidden: int = 0
    dtype: str = ""             # input dtype name ("bfloat16", ...)


# At least this many waves of (row block, split) programs: the last, partial
# wave then idles at most ~1/WAVES of the SMs' time (one wave of 1-2 programs
# per SM idles up to half of it).
WAVES = 4
# Vocabulary blocks per split at least, so that a program's row loads, target
# logit and partial store are amortised over several logits tiles.
MIN_BLOCKS_PER_SPLIT = 4


def _group_m(row_blocks: int, splits: int, block_m: int, block_n: int, hidden: int,
             itemsize: int, dev: DeviceInfo) -> int:
    """Row blocks per group of the program order (see ``swizzle``).  The
    programs resident at once are G row blocks x (SMs / G) splits; per step
    they read G x panels (block_m x H) and SMs / G W panels (block_n x H),
    a working set that is smallest at G = sqrt(SMs * block_n / block_m) and
    must stay in L2 (x panels within a quarter of it)."""
    if dev.sm_count <= 0 or hidden <= 0:
        return 1
    g = max(1, round(math.sqrt(dev.sm_count * block_n / block_m)))
    if dev.l2_bytes:
        g = min(g, max(1, dev.l2_bytes // (4 * block_m * hidden * itemsize)))
    g = max(g, _cdiv(dev.sm_count, max(splits, 1)))   # few splits: all residents share W
    return max(1, min(g, row_blocks))


def plan_grid(row_blocks: int, vocab_blocks: int, *, block_m: int, block_n: int, hidden: int,
              itemsize: int, dev: DeviceInfo, requested: int | None = None
              ) -> tuple[int, int, int]:
    """(splits, vocabulary blocks per split, group_m) of a (row block, split) grid.

    Enough splits for WAVES waves of programs and for the L2 grouping (SMs / G
    distinct vocabulary positions among the resident programs), at least
    MIN_BLOCKS_PER_SPLIT blocks each; among up to 1.5x that many splits, the
    count whose last wave is fullest."""
    if requested is not None:
        want = requested
    elif dev.sm_count <= 0:
        want = 1
    else:
        sm = dev.sm_count
        g = max(1, round(math.sqrt(sm * block_n / block_m)))
        want = max(_cdiv(WAVES * sm, row_blocks), _cdiv(sm, min(g, row_blocks)))
        want = min(want, max(1, vocab_blocks // MIN_BLOCKS_PER_SPLIT))
        best, best_idle = want, 1.0
        for cand in range(want, max(want, want * 3 // 2) + 1):
            progs = row_blocks * _cdiv(vocab_blocks, max(1, vocab_blocks // cand))
            idle = (_cdiv(progs, sm) * sm - progs) / progs
            if idle < best_idle - 1e-9:
                best, best_idle = cand, idle
        want = max(1, min(best, vocab_blocks))
        per = max(1, vocab_blocks // want)          # rounded down: at least `want` splits
        splits = _cdiv(vocab_blocks, per)
        return splits, per, _group_m(row_blocks, splits, block_m, block_n, hidden, itemsize, dev)
    want = max(1, min(want, vocab_blocks))
    per = _cdiv(vocab_blocks, want)
    splits = _cdiv(vocab_blocks, per)
    return splits, per, _group_m(row_blocks, splits, block_m, block_n, hidden, itemsize, dev)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_fused_forward(n: int, vocab: int, hidden: int, dtype: torch.dtype, *,
                       dev: DeviceInfo, splits: int | None = None) -> list[Launch]:
    """Launches of the fused forward of n rows: linear_fwd, then merge."""
    if n == 0:
        return []
    cfg = pick_config("linear_fwd", dtype=dtype, n=n, arch=dev.arch, interpret=False)
    rb, vb = _cdiv(n, cfg.block_m), _cdiv(vocab, cfg.block_n)
    S, per, g = plan_grid(rb, vb, block_m=cfg.block_m, block_n=cfg.block_n, hidden=hidden,
                          itemsize=_itemsize(dtype), dev=dev, requested=splits)
    merge = pick_config("merge", arch=dev.arch, interpret=False)
    common = dict(rows=n, vocab=vocab, hidden=hidden, dtype=str(dtype).split(".")[-1])
    return [Launch("linear_fwd", (rb * S,), cfg, S, per, g, False, **common),
            Launch("merge", (_cdiv(n, merge.block_m),), merge, S, **common)]


def slab_columns(n: int, vocab: int, dtype: torch.dtype, budget: int = _SLAB_BYTES) -> int:
    """Vocabulary columns per slab of the deterministic fused backward: the dz
    block (n, slab) within ``budget`` bytes, a multiple of 128 (>= 128)."""
    cols = budget // max(1, n * _itemsize(dtype))
    cols = max(128, cols - cols % 128)
    return min(vocab, cols)


def plan_fused_backward(n: int, vocab: int, hidden: int, dtype: torch.dtype, *,
                        dev: DeviceInfo, deterministic: bool, need_x: bool = True,
                        need_weight: bool = True, need_bias: bool = False,
                        splits: int | None = None) -> list[Launch]:
    """Launches of the fused backward of n rows.

    Fast (not deterministic, with dx or dW wanted): one linear_bwd_rows with
    atomics, staggered walks.  Otherwise (and db alone): per vocabulary slab,
    gemm_logits, logits_grad, gemm_dx (into a float32 dx), gemm_dw."""
    if n == 0:
        return []
    common = dict(rows=n, vocab=vocab, hidden=hidden, dtype=str(dtype).split(".")[-1])
    if not deterministic and (need_x or need_weight):
        cfg = pick_config("linear_bwd_rows", dtype=dtype, n=n, arch=dev.arch, interpret=False)
        rb, vb = _cdiv(n, cfg.block_m), _cdiv(vocab, cfg.block_n)
        S, per, g = plan_grid(rb, vb, block_m=cfg.block_m, block_n=cfg.block_n, hidden=hidden,
                              itemsize=_itemsize(dtype), dev=dev, requested=splits)
        return [Launch("linear_bwd_rows", (rb * S,), cfg, S, per, g, True, **common)]
    out = []
    cols = slab_columns(n, vocab, dtype)
    for v0 in range(0, vocab, cols):
        c = min(cols, vocab - v0)
        out.append(Launch("gemm_logits", (n, c, hidden), **common))
        out += plan_logits_backward(n, c, dtype, dev=dev)
        if need_x:
            out.append(Launch("gemm_dx", (n, hidden, c), **common))
        if need_weight:
            out.append(Launch("gemm_dw", (c, hidden, n), **common))
    return out


def plan_logits_forward(n: int, vocab: int, dtype: torch.dtype, *, dev: DeviceInfo,
                        splits: int | None = None) -> list[Launch]:
    """Statistics epilogue of a stored (n, vocab) block: logits_stats, merge."""
    if n == 0:
        return []
    cfg = pick_config("logits_stats", vocab=vocab, arch=dev.arch, interpret=False)
    rb, vb = _cdiv(n, cfg.block_m), _cdiv(vocab, cfg.block_n)
    if splits is None and dev.sm_count > 0:
        # programs for WAVES waves (a row is one program: no x panel to share)
        splits = max(1, min(_cdiv(WAVES * dev.sm_count, rb), vb // MIN_BLOCKS_PER_SPLIT))
    S, per, _ = plan_grid(rb, vb, block_m=cfg.block_m, block_n=cfg.block_n, hidden=0,
                          itemsize=_itemsize(dtype), dev=dev, requested=splits or 1)
    merge = pick_config("merge", arch=dev.arch, interpret=False)
    common = dict(rows=n, vocab=vocab, dtype=str(dtype).split(".")[-1])
    return [Launch("logits_stats", (rb, S), cfg, S, per, **common),
            Launch("merge", (_cdiv(n, merge.block_m),), merge, S, **common)]


def plan_logits_backward(n: int, vocab: int, dtype: torch.dtype, *,
                         dev: DeviceInfo) -> list[Launch]:
    """Gradient epilogue of a stored (n, vocab) block (in place)."""
    if n == 0:
        return []
    cfg = pick_config("logits_grad", vocab=vocab, arch=dev.arch, interpret=False)
    return [Launch("logits_grad", (_cdiv(n, cfg.block_m), _cdiv(vocab, cfg.block_n)), cfg,
                   rows=n, vocab=vocab, dtype=str(dtype).split(".")[-1])]


def plan_epilogue(n: int, vocab: int, hidden: int, dtype: torch.dtype, *, dev: DeviceInfo,
                  rows_per_chunk: int, need_x: bool = True, need_weight: bool = True,
                  need_bias: bool = False, single_pass: bool = True) -> list[Launch]:
    """Every launch of the "triton" backend's forward + backward over n rows in
    chunks of rows_per_chunk (single_pass: the engine keeps each chunk's block
    between the two epilogues, else the backward recomputes it)."""
    common = dict(vocab=vocab, hidden=hidden, dtype=str(dtype).split(".")[-1])
    out: list[Launch] = []
    for r0 in range(0, n, max(1, rows_per_chunk)):
        c = min(rows_per_chunk, n - r0)
        out.append(Launch("gemm_logits", (c, vocab, hidden), rows=c, **common))
        out += plan_logits_forward(c, vocab, dtype, dev=dev)
        if not single_pass:
            out.append(Launch("gemm_logits", (c, vocab, hidden), rows=c, **common))
        out += plan_logits_backward(c, vocab, dtype, dev=dev)
        if need_x:
            out.append(Launch("gemm_dx", (c, hidden, vocab), rows=c, **common))
        if need_weight:
            out.append(Launch("gemm_dw", (vocab, hidden, c), rows=c, **common))
    return out


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
        super().__init__()
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

    def __init__(self, *, fwd_splits: int | None = None, bwd_splits: int | None = None,
                 interpret: bool = INTERPRET):
        self.fwd_splits = fwd_splits
        self.bwd_splits = bwd_splits
        self.interpret = interpret
        self._fallback = TorchChunkedBackend()
        self._epilogue = TritonBackend(interpret=interpret)

    def supports(self, device: torch.device) -> bool:
        return _supports(torch.device(device), self.interpret)

    def rows_per_chunk(self, n: int, vocab: int, hidden: int, dtype: torch.dtype,
                       chunk_size: int | None) -> int:
        if chunk_size is not None:
            return max(1, min(chunk_size, n))
        if dtype not in _FLOAT_DTYPES:
            return self._fallback.rows_per_chunk(n, vocab, hidden, dtype, None)
        # Bounded by the float32 dx of one chunk; a multiple of 16.
        rows = _CHUNK_BYTES // (4 * max(hidden, 1) + 64)
        return max(1, min(n, rows - rows % 16 if rows >= 16 else rows))

    _native = staticmethod(GemmEpilogueBackend._native)

    def _use_epilogue(self, x, weight, bias) -> bool:
        """Operands the fused kernels do not take (see fused_aligned) go to the
        GEMM + epilogue backend: same results, and W is never copied."""
        return not fused_aligned(x, weight, bias)

    # -- statistics ---------------------------------------------------------
    def forward(self, x, weight, bias, targets, spec: LogitSpec, *, keep: bool):
        if not self._native(x, weight, bias):
            return self._fallback.forward(x, weight, bias, targets, spec, keep=keep)
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
        if (not self._native(x, weight, bias)
                or any(t is not None and t.dtype != torch.float32 for t in (dweight, dbias))):
            return self._fallback.backward(x, weight, bias, targets, value, grad_value,
                                           grad_target, spec, None, need_x=need_x,
                                           dweight=dweight, dbias=dbias, grad_sum=grad_sum)
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
        if not self._native(logits):
            return self._fallback.logits_forward(logits, targets, spec)
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
