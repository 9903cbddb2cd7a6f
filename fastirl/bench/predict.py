"""Predictions by variant name: the fastirl variants of :mod:`.model` and the
peers of :mod:`.peers` (both built on the launch costs of :mod:`.launches`)
behind one function (``predict``), for the command line, the calibration and
``fastirl-bench``."""

from __future__ import annotations

from dataclasses import replace

import torch

from fastirl.backends import chunking

from . import peers
from .launches import (DEFAULT_OPTIONS, Options, Prediction, Shape, calibrate_cpu,
                       torch_has_addmm_out_dtype)
from .model import CUDA_FASTIRL, fastirl_cpu, fastirl_gpu, torch_backend, variant_name
from .variants import split_variant
from fastirl.backends.hardware import Hardware

__all__ = ["cuda_variants", "cpu_variants", "predict", "predict_all", "predict_ms",
           "predict_point", "bench_hardware", "sweep"]


def cuda_variants() -> list[str]:
    """The variants of the sweep tables: fastirl's CUDA backends, the anchors
    fastirl-bench measures on CUDA, the floor."""
    return ([variant_name(b, p) for b, p in CUDA_FASTIRL]
            + ["liger", "cce", "naive", "matmul-floor"])


def cpu_variants() -> list[str]:
    return ["fastirl-cpu", "fastirl-torch", "naive", "matmul-floor"]


def _split(variant: str) -> tuple[str, str]:
    rest = variant[len("fastirl-"):]
    for preset in ("fast", "highest"):
        if rest.endswith("-" + preset):
            return rest[: -len(preset) - 1], preset
    return rest, "default"


def predict(variant: str, s: Shape, hw: Hardware, *, softcap: bool = False,
            single_pass: bool = True, chunk_size: int | None = None,
            memory: "str | int | None" = None, need_weight: bool = True,
            options: Options | None = None, **peer_kw) -> Prediction:
    """The modelled launches of ``variant`` (a fastirl-bench variant name, with
    its ``@`` suffix if any: ``fastirl-triton@compact``, ``fastirl-cpu@512MiB``,
    ``fastirl-cpu@4096``; or a peer of :data:`fastirl.bench.peers.PEERS`) at
    ``s``.  chunk_size / memory: the engine's explicit chunk_size / memory
    setting (a suffix wins), else the library's defaults; need_weight=False:
    a frozen head (no dW) where the variant models one."""
    opts = options or DEFAULT_OPTIONS
    mode = "IQ"
    try:
        base, mem, chunk = split_variant(variant)
    except ValueError as exc:
        raise ValueError(f"roofline: {exc}") from None
    memory = mem if mem is not None else memory
    chunk_size = chunk if chunk is not None else chunk_size
    if base in peers.PEERS:
        kw = dict(peer_kw, need_weight=need_weight) if not need_weight else peer_kw
        ops, peak, note, mode = peers.PEERS[base](s, hw, opts, softcap=softcap, **kw)
    elif base.startswith("fastirl-"):
        backend, preset = _split(base)
        if backend.endswith("-ce"):
            backend, mode = backend[:-3], "CE"
        if hw.kind == "cpu":
            if backend == "cpu":
                ops, peak, note = fastirl_cpu(s, hw, softcap=softcap, chunk_size=chunk_size,
                                              memory=memory, need_weight=need_weight,
                                              opts=opts)
            elif backend == "torch":
                if (memory is not None and memory != "fast") or not need_weight:
                    raise ValueError("roofline: memory settings and the frozen head are "
                                     "modelled for the cpu backend on a CPU, not torch")
                ops, peak, note = torch_backend(s, hw, opts, softcap=softcap, epi="poly",
                                                chunk_size=chunk_size)
            else:
                raise ValueError(f"roofline: {variant!r} is not a CPU variant")
        else:
            ops, peak, note = fastirl_gpu(backend, preset, s, hw, opts, softcap=softcap,
                                          single_pass=single_pass, memory=memory,
                                          need_weight=need_weight, chunk_size=chunk_size)
    else:
        raise ValueError(f"roofline: unknown variant {variant!r}")
    return Prediction(variant, mode, ops, hw, s, peak, note, calibrated=opts.calibrated)


def predict_all(s: Shape, hw: Hardware, variants: list[str] | None = None,
                **kw) -> list[Prediction]:
    names = variants or (cuda_variants() if hw.kind == "cuda" else cpu_variants())
    preds = [predict(v, s, hw, **kw) for v in names]
    floor = predict("matmul-floor", s, hw, options=kw.get("options"),
                    need_weight=kw.get("need_weight", True)).seconds
    for p in preds:
        p.vs_floor = p.seconds / floor
    return preds


def bench_hardware(device: torch.device, threads: int | None = None) -> Hardware:
    """The figures ``fastirl-bench`` predicts with: this CPU calibrated (about
    two seconds), or the known GPU matching the CUDA device's name."""
    if device.type == "cpu":
        return calibrate_cpu(seconds=2.0, threads=threads)
    return chunking.hardware_for(device)


def predict_point(variant: str, *, tokens: int, hidden: int, vocab: int, dtype: str,
                  hw: Hardware, loss_preset: str = "default",
                  inputs: str = "lm") -> Prediction | None:
    """The prediction (forward+backward time, peak extra memory) of a
    ``fastirl-bench`` variant (``@`` suffix included), or None for the
    variants the model does not cover on this device."""
    name, at, suffix = variant.partition("@")
    if name.startswith("fastirl-") and name.endswith("-ce"):
        name = name[:-3]
    if name.startswith("fastirl-") and loss_preset != "default":
        if hw.kind == "cpu":
            return None
        name = f"{name}-{loss_preset}"
    known = cpu_variants() if hw.kind == "cpu" else cuda_variants()
    if name not in known:
        return None
    opts = replace(DEFAULT_OPTIONS, inputs=inputs, addmm_out_dtype=torch_has_addmm_out_dtype())
    try:
        return predict(name + at + suffix, Shape(tokens, hidden, vocab, dtype), hw, options=opts)
    except (ValueError, ImportError):
        return None


def predict_ms(variant: str, *, tokens: int, hidden: int, vocab: int, dtype: str,
               hw: Hardware, loss_preset: str = "default", inputs: str = "lm") -> float | None:
    """Predicted forward+backward milliseconds of a ``fastirl-bench`` variant,
    or None for the variants the model does not cover on this device."""
    p = predict_point(variant, tokens=tokens, hidden=hidden, vocab=vocab, dtype=dtype, hw=hw,
                      loss_preset=loss_preset, inputs=inputs)
    return None if p is None else p.seconds * 1e3


def sweep(base: Shape, hw: Hardware, tokens: list[int], variants: list[str] | None = None,
          **kw) -> dict[int, list[Prediction]]:
    return {n: predict_all(replace(base, tokens=n), hw, variants, **kw) for n in tokens}
