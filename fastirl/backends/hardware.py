"""The devices fastirl plans for and models: one table.

Every fact about a GPU that the code uses lives here: data-sheet peaks (GEMM
rate per operand type, vector float32 rate, memory bandwidth), SM count, L2
size, memory, the planner's architecture class, and the **achievable
fractions** of those peaks that the cost model (:mod:`fastirl.bench.launches`)
charges launches at, fitted to published measurements
(:mod:`fastirl.bench.calibration`, docs/gpu-model.md).

Who reads what:

* the chunk policy (:mod:`fastirl.backends.chunking`) uses the data-sheet
  ratio ``gemm_flops / bandwidth`` and the memory figures;
* the Triton planner (:mod:`fastirl.backends.triton_plan`) uses ``arch``,
  ``sm_count`` and ``l2_bytes`` (through :func:`device_info`);
* the cost model uses everything, the achievable fractions included.

Importing this module needs torch only for :func:`hardware_for`'s device
query; it imports no backend and no Triton.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = ["Hardware", "Calibration", "GPUS", "CPU", "CALIBRATIONS", "gpu", "hardware_for",
           "arch_class"]

_T = 1e12


@dataclass(frozen=True)
class Calibration:
    """What a device achieves, as fractions of its data-sheet figures, and the
    fixed costs a roofline does not see.  Fitted per GPU to published
    measurements (the fit and its sources: fastirl/bench/calibration.py);
    1.0 / 0.0 everywhere is the bare data-sheet roofline.

    gemm: fraction of the dense GEMM peak a large cuBLAS GEMM reaches.
    bandwidth: fraction of the HBM bandwidth a streaming kernel reaches
        (a device-to-device copy, counting bytes read and written).
    fused_gemm: fraction of the GEMM peak a Triton kernel that fuses a GEMM
        with a reduction epilogue reaches (Cut Cross-Entropy's, fastirl's
        fused kernels).
    overlap: how much of the shorter of a launch's compute time and memory
        time it hides under the longer: a launch takes
        ``max(tc, tm) + (1 - overlap) * min(tc, tm)``.  Matters only for
        launches near the ridge point (a GEMM with one side of a few hundred
        rows streams its weight operand at the rate it multiplies it).
    launch_s: fixed cost of one kernel launch (issue and tail), seconds.
    lock_add_s: time one SM spends on one lock-protected read-modify-write of
        a 128 x 64 bf16 tile slice (Cut Cross-Entropy's ``tl_lock_add``:
        compare-and-swap spin, load, add, store, release), seconds.
    source: where the numbers come from.
    """

    gemm: float = 1.0
    bandwidth: float = 1.0
    fused_gemm: float = 1.0
    overlap: float = 1.0
    launch_s: float = 0.0
    lock_add_s: float = 0.0
    source: str = "data-sheet peaks (uncalibrated)"


@dataclass(frozen=True)
class Hardware:
    """A device: data-sheet peaks (dense, no sparsity) and its calibration.

    flops: GEMM FLOP/s by operand type: "bfloat16", "float16", "tf32",
        "float32" (float32 without TF32), "float64".
    vector_flops: FLOP/s of element-wise float32 arithmetic (CUDA cores / the
        CPU's vector FMA units), counting an FMA as two.
    bandwidth: main-memory (HBM / DRAM) bytes per second.
    l2_bandwidth: L2 bytes per second (atomics resolve there); an assumption
        (about 3x HBM; vendors do not publish it), 0 for the CPU.
    min_block_bytes: the smallest logits-block budget of a chunk.
    arch: the Triton planner's tile family: "sm90" (Hopper, datacenter
        Blackwell), "sm80" (Ampere and the rest), "cpu".
    calibration: achievable fractions and fixed costs (:class:`Calibration`).
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
    arch: str = "sm90"
    calibration: Calibration = field(default_factory=Calibration)

    def gemm_flops(self, dtype: str) -> float:
        """GEMM peak for operands of ``dtype`` ("bfloat16", "float32", "tf32", ...)."""
        if dtype in self.flops:
            return self.flops[dtype]
        if dtype == "float16" and "bfloat16" in self.flops:
            return self.flops["bfloat16"]
        return self.flops.get("float32", self.vector_flops)

    def uncalibrated(self) -> "Hardware":
        """The same device charged at its data-sheet peaks."""
        return replace(self, calibration=Calibration())


# Achievable fractions per GPU, fitted by fastirl.bench.calibration.fit() to the
# published measurements listed there (docs/gpu-model.md has the table of every
# figure, the prediction and the ratio, and which figures were fitted).  A test
# (tests/test_roofline.py) re-runs the fit and checks it reproduces these.
CALIBRATIONS: dict[str, Calibration] = {
    # A100-SXM4-80GB: fitted to Cut Cross-Entropy's Table 1 (arXiv 2411.09009):
    # gemm, bandwidth from the baseline's and torch.compile's loss times;
    # fused_gemm from CCE's loss; overlap from Liger's loss+gradient;
    # lock_add_s from CCE without gradient filtering.
    "a100": Calibration(gemm=0.746, bandwidth=0.917, fused_gemm=0.932, overlap=0.213,
                        launch_s=6e-6, lock_add_s=6.76e-7,
                        source="fitted to arXiv 2411.09009 Table 1 (A100-SXM4-80GB)"),
    # H100 SXM: gemm from the bare lm_head GEMMs (42 ms) and bandwidth from
    # selective_log_softmax (3.50 ms) of huggingface/trl#7244; the rest as A100's
    # (no published H100 figure isolates them).
    "h100": Calibration(gemm=0.794, bandwidth=0.887, fused_gemm=0.932, overlap=0.213,
                        launch_s=6e-6, lock_add_s=6.76e-7,
                        source="fitted to huggingface/trl#7244 (H100)"),
    # H200 SXM (the GPU this project can be lent): gemm from an 8192^3 bf16
    # torch.mm (769-798 TFLOP/s), bandwidth from a device-to-device copy
    # (4.3 TB/s), both measured on the lent machine; the rest as H100's.
    "h200": Calibration(gemm=0.839, bandwidth=0.899, fused_gemm=0.932, overlap=0.213,
                        launch_s=6e-6, lock_add_s=6.76e-7,
                        source="measured on the lent H200 (torch.mm, copy)"),
}

GPUS: dict[str, Hardware] = {
    # A100 SXM4 80 GB: 312 / 156 / 19.5 TFLOP/s, 2.04 TB/s, 108 SMs, 40 MB L2
    "a100": Hardware("a100", "cuda", {"bfloat16": 312 * _T, "float16": 312 * _T,
                                      "tf32": 156 * _T, "float32": 19.5 * _T,
                                      "float64": 19.5 * _T},
                     vector_flops=19.5 * _T, bandwidth=2.039e12, l2_bandwidth=6e12, sm_count=108,
                     l2_bytes=40 << 20, memory_bytes=80 * 10**9, min_block_bytes=1 << 30,
                     arch="sm80", calibration=CALIBRATIONS["a100"]),
    # H100 SXM5 80 GB: 989 / 495 / 67 TFLOP/s, 3.35 TB/s, 132 SMs, 50 MB L2
    "h100": Hardware("h100", "cuda", {"bfloat16": 989.4 * _T, "float16": 989.4 * _T,
                                      "tf32": 494.7 * _T, "float32": 66.9 * _T,
                                      "float64": 66.9 * _T},
                     vector_flops=66.9 * _T, bandwidth=3.35e12, l2_bandwidth=10e12, sm_count=132,
                     l2_bytes=50 << 20, memory_bytes=80 * 10**9, min_block_bytes=1 << 30,
                     arch="sm90", calibration=CALIBRATIONS["h100"]),
    # H200 SXM 141 GB: H100's compute, 4.8 TB/s of HBM3e, 132 SMs; PyTorch
    # reports 60 MB of L2 on the lent machine.
    "h200": Hardware("h200", "cuda", {"bfloat16": 989.4 * _T, "float16": 989.4 * _T,
                                      "tf32": 494.7 * _T, "float32": 66.9 * _T,
                                      "float64": 66.9 * _T},
                     vector_flops=66.9 * _T, bandwidth=4.8e12, l2_bandwidth=10e12, sm_count=132,
                     l2_bytes=60 << 20, memory_bytes=141 * 10**9, min_block_bytes=1 << 30,
                     arch="sm90", calibration=CALIBRATIONS["h200"]),
}

# The CPU class this project is measured on (2 cores of a Sapphire Rapids Xeon
# with AMX; `python -m fastirl.bench.roofline --device cpu` calibrates the
# present CPU): only the ratio GEMM rate / bandwidth matters to the policy.
CPU = Hardware("cpu", "cpu", {"bfloat16": 1.5 * _T, "float16": 1.5 * _T,
                              "float32": 0.15 * _T, "float64": 0.075 * _T},
               vector_flops=0.15 * _T, bandwidth=20e9, min_block_bytes=64 << 20, arch="cpu")


def gpu(name: str) -> Hardware:
    """The GPU called ``name`` ("a100", "h100", "h200"); ValueError otherwise."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {name!r}") from None


def arch_class(major: int) -> str:
    """The planner's tile family of a compute capability major version:
    Hopper and datacenter Blackwell (9.x, 10.x: ~227 KiB shared memory per
    block, wgmma) "sm90", the others "sm80"."""
    return "sm90" if major in (9, 10) else "sm80"


def hardware_for(device: "torch.device | str") -> Hardware:  # noqa: F821
    """The figures for ``device``: :data:`CPU` for a CPU; for CUDA the known GPU
    whose name matches the device's (A100 / H100 / H200), else H100's."""
    import torch

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
