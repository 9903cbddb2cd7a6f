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
bandwidth, :data:`CPU`) and on CUDA (a GPU of :data:`GPUS`, H100 unless told),
and :mod:`fastirl.bench.roofline` uses it to model the backends' launches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Hardware", "GPUS", "CPU", "OVERHEAD", "ALIGN", "rows_per_chunk", "hardware_for",
           "chunk_overhead", "itemsize"]

# Largest share of a chunk's GEMM time the per-chunk W / dW traffic may take.
OVERHEAD = 0.05
# Chunk lengths are multiples of this (where n allows): 16-row aligned starts.
ALIGN = 16


@dataclass(frozen=True)
class Hardware:
    """Peak figures of a device (public data sheets for GPUs; dense, no sparsity).

    flops: GEMM FLOP/s by operand type: "bfloat16", "float16", "tf32",
        "float32" (float32 without TF32), "float64".
    vector_flops: FLOP/s of element-wise float32 arithmetic (CUDA cores / the
        CPU's vector FMA units), counting an FMA as two.
    bandwidth: main-memory (HBM / DRAM) bytes per second.
    l2_bandwidth: L2 bytes per second (atomics resolve there); an assumption
        (about 3x HBM; vendors do not publish it), 0 for the CPU.
    min_block_bytes: the smallest logits-block budget of a chunk.
    """

    name: str
    kind: str                       # "cuda" or "cpu"
    flops: dict[str, float] = field(default_factory=dict)
    vector_flops: float = 0.0
    bandwidth: float = 0.0
    l2_bandwidth: float = 0.0
    sm_count: int = 0
    l2_bytes: int = 0
    memory_bytes: int = 0
    min_block_bytes: int = 64 << 20

    def gemm_flops(self, dtype: str) -> float:
        """GEMM peak for operands of ``dtype`` ("bfloat16", "float32", "tf32", ...)."""
        if dtype in self.flops:
            return self.flops[dtype]
        if dtype == "float16" and "bfloat16" in self.flops:
            return self.flops["bfloat16"]
        return self.flops.get("float32", self.vector_flops)


_T = 1e12
GPUS: dict[str, Hardware] = {
    # A100 SXM4 80 GB: 312 / 156 / 19.5 TFLOP/s, 2.04 TB/s, 108 SMs, 40 MB L2
    "a100": Hardware("a100", "cuda", {"bfloat16": 312 * _T, "float16": 312 * _T,
                                      "tf32": 156 * _T, "float32": 19.5 * _T,
                                      "float64": 19.5 * _T},
                     vector_flops=19.5 * _T, bandwidth=2.039e12, l2_bandwidth=6e12, sm_count=108,
                     l2_bytes=40 << 20, memory_bytes=80 * 10**9, min_block_bytes=1 << 30),
    # H100 SXM5 80 GB: 989 / 495 / 67 TFLOP/s, 3.35 TB/s, 132 SMs, 50 MB L2
    "h100": Hardware("h100", "cuda", {"bfloat16": 989.4 * _T, "float16": 989.4 * _T,
                                      "tf32": 494.7 * _T, "float32": 66.9 * _T,
                                      "float64": 66.9 * _T},
                     vector_flops=66.9 * _T, bandwidth=3.35e12, l2_bandwidth=10e12, sm_count=132,
                     l2_bytes=50 << 20, memory_bytes=80 * 10**9, min_block_bytes=1 << 30),
    # H200 SXM 141 GB: H100's compute, 4.8 TB/s of HBM3e
    "h200": Hardware("h200", "cuda", {"bfloat16": 989.4 * _T, "float16": 989.4 * _T,
                                      "tf32": 494.7 * _T, "float32": 66.9 * _T,
                                      "float64": 66.9 * _T},
                     vector_flops=66.9 * _T, bandwidth=4.8e12, l2_bandwidth=10e12, sm_count=132,
                     l2_bytes=50 << 20, memory_bytes=141 * 10**9, min_block_bytes=1 << 30),
}

# The CPU class this project is measured on (2 cores of a Sapphire Rapids Xeon
# with AMX; `python -m fastirl.bench.roofline --device cpu` calibrates the
# present CPU): only the ratio GEMM rate / bandwidth matters to the policy.
CPU = Hardware("cpu", "cpu", {"bfloat16": 1.5 * _T, "float16": 1.5 * _T,
                              "float32": 0.15 * _T, "float64": 0.075 * _T},
               vector_flops=0.15 * _T, bandwidth=20e9, min_block_bytes=64 << 20)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def hardware_for(device: "torch.device | str") -> Hardware:
    """The figures the policy uses for ``device``: :data:`CPU` for a CPU; for
    CUDA the known GPU whose name matches the device's (A100 / H100 / H200),
    else H100's."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return CPU
    name = ""
    if torch.cuda.is_available():
        try:
            name = torch.cuda.get_device_name(dev).lower()
        except (RuntimeError, AssertionError):
            name = ""
    for key, hw in GPUS.items():
        if key in name:
            return hw
    return GPUS["h100"]


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
