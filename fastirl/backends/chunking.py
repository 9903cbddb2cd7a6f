"""How many rows one chunk takes: the chunk-size policy of every backend.

A chunk of c rows costs three GEMMs of ``2·c·H·V`` FLOPs each (logits,
``dx = dz @ W``, ``dW += dz.T @ x``) plus traffic that does not shrink with c:
the weight is read twice (logits and dx GEMMs) and the float32 dW accumulator
is read and written once per chunk.  Per weight element that fixed traffic is

    F = 2 · itemsize + dw_bytes          (dw_bytes: 8 for a float32 read + write,
                                          more when the low-precision dW partial
                                          goes through a temporary)

so its share of a chunk's time, on a machine with GEMM rate P (FLOP/s) and
memory bandwidth B (bytes/s), is

    overhead(c) = (V·H·F / B) / (6·c·H·V / P) = (P / B) · F / (6 c)

independent of V and H.  The policy takes the smallest c whose overhead is at
most ``OVERHEAD`` (5 %), and caps it by memory: the chunk's logits block
(c · V · block_itemsize bytes) may take at most half the float32 dW
accumulator the loss holds anyway (V·H·4 bytes), and never less than a
per-device floor (so that small heads still get GEMM-sized chunks).  Chunks
are then made equal (n split into ceil(n / c) parts), a multiple of ``ALIGN``
rows where that is possible.

The same function sizes chunks on the CPU (this machine class's GEMM rate and
bandwidth, :data:`CPU`) and on CUDA (a GPU of :data:`GPUS`, H100 unless told;
the device table is :mod:`fastirl.backends.hardware`, whose data-sheet peaks
the policy uses), and :mod:`fastirl.bench.model` uses it to model the
backends' launches.
"""

from __future__ import annotations

import torch

# The device table lives in fastirl.backends.hardware; these names stay importable here.
from .hardware import CPU, GPUS, Hardware, hardware_for

__all__ = ["Hardware", "GPUS", "CPU", "OVERHEAD", "ALIGN", "rows_per_chunk", "hardware_for",
           "chunk_overhead", "itemsize"]

# Largest share of a chunk's GEMM time the per-chunk W / dW traffic may take.
OVERHEAD = 0.05
# Chunk lengths are multiples of this (where n allows): 16-row aligned starts.
ALIGN = 16


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _resolve(device, hardware) -> Hardware:
    if isinstance(hardware, Hardware):
        return hardware
    if isinstance(hardware, str):
        try:
            return GPUS[hardware.lower()]
        except KeyError:
            raise ValueError(f"hardware must be a Hardware or one of {sorted(GPUS)}, "
                             f"got {hardware!r}") from None
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return GPUS["h100"] if kind == "cuda" else CPU


def _dw_bytes_default(dtype: torch.dtype, hw: Hardware) -> int:
    """Bytes of dW traffic per weight element and chunk: the float32 (float64)
    accumulator read and written; on the CPU a low-precision partial also goes
    through a temporary (written, read back)."""
    acc = 16 if dtype == torch.float64 else 8
    if hw.kind == "cpu" and dtype in (torch.bfloat16, torch.float16):
        acc += 2 * itemsize(dtype)
    return acc


def chunk_overhead(rows: int, dtype: torch.dtype, *, hardware: Hardware,
                   dw_bytes: int | None = None) -> float:
    """Modelled time of the per-chunk W / dW traffic over the chunk's GEMM time."""
    name = str(dtype).split(".")[-1]
    isz = itemsize(dtype)
    dw = _dw_bytes_default(dtype, hardware) if dw_bytes is None else dw_bytes
    balance = hardware.gemm_flops(name) / hardware.bandwidth
    return balance * (2 * isz + dw) / (6 * max(rows, 1))


def rows_per_chunk(n: int, vocab: int, hidden: int, dtype: torch.dtype, *,
                   device: "torch.device | str" = "cpu", chunk_size: int | None = None,
                   hardware: "Hardware | str | None" = None, block_itemsize: int | None = None,
                   dw_bytes: int | None = None, overhead: float = OVERHEAD) -> int:
    """Rows per chunk for n rows of a (vocab, hidden) head in ``dtype``.

    chunk_size: an explicit request (wins, clamped to [1, n]).
    hardware: a :class:`Hardware` or a GPU name; default from ``device``
        (:data:`CPU`, or H100 for "cuda").
    block_itemsize: bytes per element of the chunk's logits block (default:
        ``dtype``'s; 4 for a backend that keeps float32 blocks).
    dw_bytes: dW traffic per weight element and chunk (default: see module doc).
    hidden = 0 (stored logits: no GEMMs) sizes by the memory floor alone.
    """
    if n <= 0:
        return 1
    if chunk_size is not None:
        return max(1, min(int(chunk_size), n))
    hw = _resolve(device, hardware)
    vocab = max(int(vocab), 1)
    bsz = itemsize(dtype) if block_itemsize is None else int(block_itemsize)
    acc = 8 if dtype == torch.float64 else 4
    budget = max(hw.min_block_bytes, (vocab * max(hidden, 0) * acc) // 2)
    if hw.memory_bytes:
        budget = min(budget, hw.memory_bytes // 16)
    rows_mem = max(1, budget // (vocab * bsz))
    if hidden > 0:
        rows_eff = chunk_overhead(1, dtype, hardware=hw, dw_bytes=dw_bytes) / overhead
        rows = min(rows_mem, max(1, int(rows_eff + 0.999)))
    else:
        rows = rows_mem
    rows = min(rows, n)
    parts = -(-n // rows)
    rows = -(-n // parts)
    if rows > ALIGN and rows % ALIGN:
        up = rows + ALIGN - rows % ALIGN
        rows = up if up <= rows_mem and -(-n // up) == parts else rows - rows % ALIGN
    return max(1, min(rows, n))
