"""Backend registry and ``backend="auto"`` dispatch.

Backends are loaded lazily by name, so importing fastirl never compiles or
imports Triton / the native extension until one is asked for.  A loader returns
a backend object (see :mod:`fastirl.backends.base`) or raises ``ImportError`` /
``RuntimeError`` with the reason it is unavailable.
"""

from __future__ import annotations

import importlib
from functools import cache

import torch

from .base import Backend, LogitSpec, RowStats

__all__ = ["Backend", "LogitSpec", "RowStats", "available_backends", "get_backend",
           "resolve_backend", "for_dtype", "BACKENDS"]

# name -> "module:attribute" of a zero-argument loader.
# "triton" and "cuda" are the same design (cuBLAS GEMMs + one fused epilogue
# kernel per chunk, see fastirl.backends.gemm_epilogue) with Triton or CUDA
# epilogue kernels; "triton-fused" never stores logits (Triton GEMM tiles with
# the reductions fused in) and is only used when asked for by name.
BACKENDS: dict[str, str] = {
    "torch": "fastirl.backends.torch_chunked:load",
    "triton": "fastirl.backends.triton_kernels:load",
    "triton-fused": "fastirl.backends.triton_kernels:load_fused",
    "cpu": "fastirl.backends.native:load_cpu",
    "cuda": "fastirl.backends.native:load_cuda",
}

# Preference order of ``backend="auto"`` per device type.  CUDA: the Triton
# epilogue first (no compiler needed at run time; the kernels the CPU tests run
# under the interpreter), then the CUDA one, whose extension must be built.
_AUTO = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


@cache
def _load(name: str) -> Backend:
    module, attr = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), attr)()


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises RuntimeError saying why if it cannot load."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    try:
        return _load(name)
    except (ImportError, RuntimeError, OSError) as exc:
        raise RuntimeError(f"fastirl backend {name!r} is not available: {exc}") from exc


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that load and support ``device``."""
    device = torch.device(device)
    names = []
    for name in BACKENDS:
        try:
            if get_backend(name).supports(device):
                names.append(name)
        except RuntimeError:
            pass
    return names


def for_dtype(backend: Backend, dtype: torch.dtype) -> Backend:
    """``backend``, or the PyTorch backend when ``backend`` does not compute in
    ``dtype`` (float64 for every backend but "torch"): the one place where
    inputs a backend does not take are routed elsewhere."""
    return backend if dtype in backend.dtypes else get_backend("torch")


def resolve_backend(name: "str | Backend", device: torch.device,
                    dtype: torch.dtype | None = None) -> Backend:
    """``name`` or, for "auto", the fastest backend available on ``device``;
    with ``dtype``, the PyTorch backend instead where that one does not compute
    in ``dtype`` (see :func:`for_dtype`).  A backend object (e.g. a
    vocabulary-parallel wrapper) is returned as is."""
    if not isinstance(name, str):
        return name
    if name != "auto":
        backend = get_backend(name)
        if not backend.supports(device):
            raise ValueError(f"backend {name!r} does not support device {device}")
        return backend if dtype is None else for_dtype(backend, dtype)
    for candidate in _AUTO.get(device.type, ("torch",)):
        try:
            backend = get_backend(candidate)
        except RuntimeError:
            continue
        if backend.supports(device):
            return backend if dtype is None else for_dtype(backend, dtype)
    raise RuntimeError(f"no fastirl backend supports device {device}")
