"""Launch planning of the Triton backends: pure functions, no Triton.

What the ``triton`` and ``triton-fused`` backends launch
(:mod:`fastirl.backends.triton_kernels`) and what the cost model
(:mod:`fastirl.bench.model`) reads, so that the model follows the code.
Imports torch (dtypes, the CUDA device query) and nothing of Triton: the cost
model runs where Triton is not installed.

``DeviceInfo(arch, sm_count, l2_bytes)``, ``device_info(device)``,
``gpu_info(name)`` (from the device table :mod:`fastirl.backends.hardware`);
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
need_weight=, need_bias=, single_pass=, lookahead=)`` -> [Launch] (every launch
of the "triton" backend's forward + backward; the "cuda" backend launches the
same GEMMs around its two CUDA epilogue kernels);
``fused_rows_per_chunk(n, hidden)`` (engine rows of the fused backend);
``slab_columns(n, vocab, dtype)`` (vocabulary columns per slab of the
deterministic fused backward); ``config_key`` / ``pick_config`` (tile tables).

Tile configurations come from fixed tables (``CONFIGS``), not a runtime
autotuner, so that every launchable variant is known ahead of time;
``tools/triton_aot.py`` compiles all of them for sm_80 / sm_90 and reports
registers, spills and shared memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from .hardware import GPUS, arch_class

__all__ = ["TileConfig", "CONFIGS", "LINEAR_KERNELS", "LOGITS_KERNELS", "config_key",
           "pick_config", "INTERPRET", "DeviceInfo", "INTERP_DEVICE", "gpu_info", "device_index",
           "device_info", "Launch", "WAVES", "MIN_BLOCKS_PER_SPLIT", "plan_grid",
           "plan_fused_forward", "plan_fused_backward", "plan_logits_forward",
           "plan_logits_backward", "plan_epilogue", "slab_columns", "fused_rows_per_chunk"]

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


INTERP_DEVICE = DeviceInfo("interp", 0, 0)


def gpu_info(name: str) -> DeviceInfo:
    """DeviceInfo of a named GPU of the device table ("a100", "h100", "h200")."""
    try:
        hw = GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {name!r}") from None
    return DeviceInfo(hw.arch, hw.sm_count, hw.l2_bytes)


def device_index(device: torch.device) -> int:
    """The CUDA ordinal of ``device``; ``cuda`` without an index is the current one."""
    return device.index if device.index is not None else torch.cuda.current_device()


@lru_cache(maxsize=None)
def _cuda_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(arch_class(props.major), props.multi_processor_count,
                      int(getattr(props, "L2_cache_size", 0)) or (40 << 20))


def device_info(device: torch.device, interpret: bool = INTERPRET) -> DeviceInfo:
    """DeviceInfo of a tensor's device (INTERP_DEVICE for CPU / the interpreter).
    Hopper and datacenter Blackwell (capability 9.x / 10.x, ~227 KiB shared
    memory per block) use the "sm90" configs, others (8.x, and consumer parts
    such as 8.9 / 12.x with ~99 KiB) the "sm80" ones (at most 60 KiB)."""
    if interpret or device.type != "cuda":
        return INTERP_DEVICE
    return _cuda_info(device_index(device))


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
                  need_bias: bool = False, single_pass: bool = True,
                  lookahead: bool = False) -> list[Launch]:
    """Every launch of the "triton" backend's forward + backward over n rows in
    chunks of rows_per_chunk (single_pass: the engine keeps each chunk's block
    between the two epilogues, else the backward recomputes it).

    lookahead: the engine's single pass computes one more row per chunk than
    it owns (the next chunk's first, for the TD term), except the last chunk:
    the chunk's launches then have c + 1 rows."""
    common = dict(vocab=vocab, hidden=hidden, dtype=str(dtype).split(".")[-1])
    out: list[Launch] = []
    for r0 in range(0, n, max(1, rows_per_chunk)):
        c = min(rows_per_chunk, n - r0)
        if lookahead and single_pass and r0 + c < n:
            c += 1
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


def fused_rows_per_chunk(n: int, hidden: int) -> int:
    """Rows per engine chunk of the fused backend (no explicit chunk_size):
    bounded by the float32 dx of one chunk (_CHUNK_BYTES); a multiple of 16."""
    rows = _CHUNK_BYTES // (4 * max(hidden, 1) + 64)
    return max(1, min(n, rows - rows % 16 if rows >= 16 else rows))
