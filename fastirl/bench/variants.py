"""The benchmarked variants: what each one computes and how it is called.

Every variant is a pair of callables over the same inputs

    hidden (B, T, H), weight (V, H)   -- both ``requires_grad``
    targets (B, T) int64              -- ``ignore_index`` = -100 marks non-actions

``forward()`` runs the loss as a training step would (inputs require grad, so a
fused loss may already form its gradients here) and ``step()`` runs forward
and backward, leaving ``hidden.grad`` / ``weight.grad``.  Modes:

* ``IQ``: the IQ-Learn loss (offline chi^2, ``td_weight`` = lambda, default 0.1),
* ``CE``: mean token cross-entropy (fastirl with ``td_weight=0``, and the CE anchors),
* ``floor``: the three bare GEMMs a forward+backward needs at these shapes
  (``Z = X W^T``, ``dX = G W``, ``dW = G^T X`` with G of Z's shape); no loss.

A fastirl variant takes a suffix ``@<what>`` (the same in ``fastirl-bench``,
``benchmarks/interleaved.py`` and the cost model):

* ``@fast``, ``@balanced``, ``@compact``: the ``memory=`` setting
  (docs/memory.md);
* ``@<number><unit>`` with unit B, KiB, MiB or GiB (``@512MiB``, ``@1.5GiB``):
  ``memory=`` a working-memory budget in bytes;
* ``@<int>`` (``@4096``): an explicit ``chunk_size`` (the planner is not asked).

Without a suffix a fastirl variant runs ``fastirl.iq_loss``'s default setting.

This module imports nothing heavy at import time: availability and building
happen in the worker process that measures one variant.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

IGNORE_INDEX = -100

# Static names; the fastirl backends are added at run time from the registry.
FIXED = ("naive", "naive-compile", "naive-ce", "torch-lce", "cce", "liger", "matmul-floor")
CE_SUFFIX = "-ce"
FASTIRL_PREFIX = "fastirl-"
AT = "@"
MEMORY_SETTINGS = ("fast", "balanced", "compact")
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_suffix(text: str) -> tuple["str | int | None", int | None]:
    """(memory, chunk_size) of the text after ``@`` (see the module doc);
    ValueError for anything else."""
    if text in MEMORY_SETTINGS:
        return text, None
    if text.isdigit():
        if int(text) < 1:
            raise ValueError(f"chunk size must be >= 1, got @{text}")
        return None, int(text)
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                value = float(text[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * _UNITS[unit]), None
            break
    raise ValueError(f"unknown suffix @{text}: use @fast, @balanced, @compact, a budget "
                     f"such as @512MiB / @2GiB, or a chunk size such as @4096")


def split_variant(name: str) -> tuple[str, "str | int | None", int | None]:
    """(base name, memory setting or byte budget, chunk_size) of a variant name:
    ``fastirl-cpu@compact`` -> ("fastirl-cpu", "compact", None),
    ``fastirl-cpu@512MiB`` -> ("fastirl-cpu", 536870912, None),
    ``fastirl-cpu@4096`` -> ("fastirl-cpu", None, 4096), ``cce`` -> ("cce", None, None).
    ValueError for a suffix on a variant that is not fastirl's, or an unknown suffix."""
    base, at, rest = name.partition(AT)
    if not at:
        return name, None, None
    if not base.startswith(FASTIRL_PREFIX):
        raise ValueError(f"only fastirl variants take @<memory> / @<chunk>, not {name!r}")
    memory, chunk = parse_suffix(rest)
    return base, memory, chunk


def budget_label(nbytes: int) -> str:
    """The shortest exact spelling of a byte budget: 536870912 -> "512MiB"."""
    for unit in ("GiB", "MiB", "KiB"):
        if nbytes % _UNITS[unit] == 0:
            return f"{nbytes // _UNITS[unit]}{unit}"
    return f"{nbytes}B"


def with_memory(name: str, memory: "str | int") -> str:
    """``name`` with the memory suffix of ``memory`` (a setting or bytes)."""
    return f"{name}{AT}{memory if isinstance(memory, str) else budget_label(memory)}"


@dataclass(frozen=True)
class Info:
    name: str
    mode: str            # "IQ" | "CE" | "floor"
    summary: str
    default: bool        # part of the default set
    compiles: bool       # uses torch.compile (first call compiles; compile timeout applies)
    memory_kind: str     # "logits" (materialises (N, V)), "chunked", "floor"


def fastirl_backend_names() -> list[str]:
    from fastirl.backends import BACKENDS
    return list(BACKENDS)


def info(name: str) -> Info:
    """Static description of variant ``name``; ValueError for an unknown name."""
    fixed = {
        "naive": Info("naive", "IQ", "fastirl.reference.iq_loss eager: builds the (N, V) logits",
                      True, False, "logits"),
        "naive-compile": Info("naive-compile", "IQ", "torch.compile(fastirl.reference.iq_loss)",
                              True, True, "logits"),
        "naive-ce": Info("naive-ce", "CE", "F.cross_entropy(F.linear(x, W), t) eager",
                         False, False, "logits"),
        "torch-lce": Info("torch-lce", "CE",
                          "torch F.linear_cross_entropy(options=LinearCrossEntropyOptions())",
                          True, False, "chunked"),
        "cce": Info("cce", "CE", "Cut Cross-Entropy (cut-cross-entropy; torch_compile impl on "
                    "CPU, cce on CUDA)", True, True, "chunked"),
        "liger": Info("liger", "CE", "Liger-Kernel fused linear cross-entropy (CUDA)",
                      True, False, "chunked"),
        "matmul-floor": Info("matmul-floor", "floor",
                             "the three bare GEMMs of forward+backward (X W^T, G W, G^T X)",
                             True, False, "floor"),
    }
    if name in fixed:
        return fixed[name]
    if AT in name:
        base, memory, chunk = split_variant(name)
        got = info(base)
        what = (f"chunk_size={chunk}" if chunk is not None else
                f"memory={memory if isinstance(memory, str) else budget_label(memory)!r}")
        return Info(name, got.mode, f"{got.summary}, {what}", False, got.compiles,
                    got.memory_kind)
    if name.startswith(FASTIRL_PREFIX):
        rest = name[len(FASTIRL_PREFIX):]
        ce = rest.endswith(CE_SUFFIX)
        backend = rest[: -len(CE_SUFFIX)] if ce else rest
        if backend in fastirl_backend_names():
            mode = "CE" if ce else "IQ"
            what = "td_weight=0 (cross-entropy)" if ce else "IQ loss"
            return Info(name, mode, f"fastirl.iq_loss(backend={backend!r}), {what}",
                        True, False, "chunked")
    raise ValueError(f"unknown variant {name!r}; known: {', '.join(all_names())}")


def all_names() -> list[str]:
    names = ["naive", "naive-compile", "naive-ce"]
    for b in fastirl_backend_names():
        names += [f"{FASTIRL_PREFIX}{b}", f"{FASTIRL_PREFIX}{b}{CE_SUFFIX}"]
    return names + ["torch-lce", "cce", "liger", "matmul-floor"]


def memory_group(device) -> list[str]:
    """The ``memory`` group: every default fastirl IQ variant of the device at
    each memory setting (on a CPU the Triton backends, which run there only
    in their interpreter, are left out)."""
    def runs(n):
        return relevant(n, device) and not (device.type == "cpu"
                                            and fastirl_backend(n).startswith("triton"))
    return [with_memory(n, m) for n in all_names()
            if fastirl_backend(n) and info(n).mode == "IQ" and info(n).default and runs(n)
            for m in MEMORY_SETTINGS]


def relevant(name: str, device) -> bool:
    """Whether ``name`` belongs in a group selection (default / iq / ce) on
    ``device``: the native backends are per device type."""
    backend = fastirl_backend(name)
    if backend in ("cpu", "cuda"):
        return backend == device.type
    return True


def fastirl_backend(name: str) -> str | None:
    if not name.startswith(FASTIRL_PREFIX):
        return None
    rest = name.partition(AT)[0][len(FASTIRL_PREFIX):]
    return rest[: -len(CE_SUFFIX)] if rest.endswith(CE_SUFFIX) else rest


# --------------------------------------------------------------------------- availability

def unavailable_reason(name: str, device) -> str | None:
    """None if ``name`` can run on ``device`` (a torch.device), else a one-line reason."""
    import torch

    dev = device.type
    if AT in name:
        try:
            name = split_variant(name)[0]
        except ValueError as exc:
            return str(exc)
    if name == "naive-compile":
        if dev == "cpu":
            import shutil
            if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
                return "torch.compile on CPU needs a C++ compiler (g++/clang++), none found"
        return None
    if name == "torch-lce":
        import torch.nn.functional as F
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn,
                                                                 "LinearCrossEntropyOptions"):
            return (f"torch {torch.__version__} has no F.linear_cross_entropy / "
                    "LinearCrossEntropyOptions")
        return None
    if name == "cce":
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return "cut-cross-entropy not installed (pip install cut-cross-entropy)"
        return None
    if name == "liger":
        if dev != "cuda":
            return "Liger-Kernel runs on CUDA only"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel not installed (pip install liger-kernel)"
        return None
    backend = fastirl_backend(name)
    if backend is not None:
        from fastirl.backends import get_backend
        try:
            be = get_backend(backend)
        except RuntimeError as exc:
            line = (str(exc).splitlines() or [type(exc).__name__])[0]
            return line if len(line) <= 200 else line[:197] + "..."
        if not be.supports(device):
            return f"fastirl backend {backend!r} does not support {dev}"
        if backend.startswith("triton") and dev == "cpu":
            return "Triton on CPU runs only in its interpreter: a correctness tool, not timed"
        return None
    return None


# --------------------------------------------------------------------------- building

@dataclass
class Bound:
    """A variant bound to inputs: ``forward()`` and ``step()`` (forward+backward)."""

    forward: Callable[[], object]
    step: Callable[[], object]


def loss_fn(name: str, device, *, td_weight: float, loss_preset: str = "default",
            ignore_index: int = IGNORE_INDEX) -> Callable | None:
    """``f(hidden, weight, targets) -> scalar loss`` for loss variants; None for the floor."""
    import torch
    import torch.nn.functional as F

    import fastirl
    from fastirl import reference

    if name == "naive":
        return lambda x, w, t: reference.iq_loss(x, w, t, td_weight=td_weight,
                                                 ignore_index=ignore_index)
    if name == "naive-compile":
        compiled = torch.compile(reference.iq_loss, dynamic=True)
        return lambda x, w, t: compiled(x, w, t, td_weight=td_weight, ignore_index=ignore_index)
    if name == "naive-ce":
        return lambda x, w, t: F.cross_entropy(F.linear(x, w).flatten(0, -2), t.flatten(),
                                               ignore_index=ignore_index)
    if name == "torch-lce":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x.flatten(0, -2), w, t.flatten(),
                                                      ignore_index=ignore_index, options=options)
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy
        impl = "cce" if device.type == "cuda" else "torch_compile"
        return lambda x, w, t: linear_cross_entropy(x, w, t, ignore_index=ignore_index,
                                                    impl=impl)
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        module = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index)

        def liger(x, w, t):
            out = module(w, x.flatten(0, -2), t.flatten())
            return out[0] if isinstance(out, tuple) else out
        return liger
    if name == "matmul-floor":
        return None
    base, memory, chunk = split_variant(name)
    backend = fastirl_backend(base)
    if backend is None:
        raise ValueError(f"unknown variant {name!r}")
    lam = 0.0 if base.endswith(CE_SUFFIX) else td_weight
    extra = {}
    if memory is not None:
        extra["memory"] = memory
    if chunk is not None:
        extra["chunk_size"] = chunk
    return lambda x, w, t: fastirl.iq_loss(x, w, t, td_weight=lam, ignore_index=ignore_index,
                                           backend=backend, preset=loss_preset, **extra)


def bind(name: str, fn: Callable | None, hidden, weight, targets) -> Bound:
    """Bind a variant to inputs.  Gradients are reset to None before each call, so
    every call allocates its own gradient tensors (counted in its memory)."""

    def clear():
        hidden.grad = None
        weight.grad = None

    if fn is None:   # the matmul floor
        x2d = hidden.detach().reshape(-1, hidden.shape[-1])
        w = weight.detach()

        def forward():
            return x2d @ w.t()

        def step():
            z = x2d @ w.t()            # logits        (N, V)
            dx = z @ w                 # G W           (N, H), G of Z's shape (Z reused)
            dw = z.t() @ x2d           # G^T X         (V, H)
            return dx, dw
        return Bound(forward, step)

    def forward():
        clear()
        return fn(hidden, weight, targets)

    def step():
        clear()
        loss = fn(hidden, weight, targets)
        loss.backward()
        return loss
    return Bound(forward, step)


# --------------------------------------------------------------------------- memory estimates

def estimate_extra_bytes(name: str, *, tokens: int, hidden: int, vocab: int, itemsize: int,
                         device_type: str) -> int:
    """A rough upper estimate of the memory one forward+backward needs beyond its
    inputs (for refusing impossible shapes before allocating anything)."""
    n, h, v = tokens, hidden, vocab
    grads = (n * h + v * h) * itemsize
    nv = n * v
    kind = info(name).memory_kind
    if kind == "logits":
        # logits, z/tau, exp / softmax temporaries and dL/dz: about five (N, V) tensors
        # at the peak (measured: 4.9 at N=4096, V=32000, fp32); the compiled variant
        # fuses some of them but still materialises (N, V).
        per = max(itemsize, 4)
        factor = 3 if name == "naive-compile" else 5
        return grads + factor * nv * per
    if kind == "floor":
        return grads + nv * itemsize
    # chunked: a bounded workspace plus float32 gradient accumulators.
    workspace = (1 << 30) * 3 if device_type == "cuda" else (256 << 20)
    return grads + min(workspace, 3 * nv * 4) + v * h * 4 + n * h * 4
