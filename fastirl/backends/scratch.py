"""Scratch memory reused across the chunks of one loss call, on the CPU.

glibc serves a request above its mmap threshold (which adapts upwards, to 32 MiB
at most) with fresh pages from the kernel and returns them on free, so a logits
block that large, fresh per chunk, is zero-filled page by page every chunk: at
B=4 T=1024 H=512 V=32000 in bf16 (65 MB blocks) that was 10-15 % of a
forward+backward.  Inside ``with scope():`` such a request takes the memory of
its slot instead (one buffer per slot, grown when a request is larger, freed
when the scope closes); smaller ones stay plain allocations, which malloc
reuses by itself, so the plans with small blocks keep their memory exactly.
A slot's memory is the caller's until it asks for that slot again: each chunk
is done with its block before the next chunk's is taken (the engine's loops run
chunk after chunk).  The engine closes the scope before it makes dW in the
weight's dtype, so the planned peak (:mod:`fastirl.memory`) is unchanged.
Other devices, or no open scope: a plain ``torch.empty``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

import torch

__all__ = ["scope", "empty"]

# Requests from this size on use a slot: glibc's largest mmap threshold.
MIN_BYTES = 32 << 20

_slots: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fastirl_scratch",
                                                                    default=None)


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Reuse scratch buffers until the block ends.  A nested scope (a loss computed
    while another one's chunk holds its block) has slots of its own."""
    token = _slots.set({})
    try:
        yield
    finally:
        _slots.reset(token)


def empty(slot: str, shape: tuple[int, ...], dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape``: within an open scope on
    the CPU, the memory of ``slot`` when it holds enough or the request is of at
    least MIN_BYTES (its previous contents are the caller's to overwrite), else a
    new tensor."""
    slots = _slots.get()
    if slots is None or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    buf = slots.get(slot)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        if n * dtype.itemsize < MIN_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        slots[slot] = None            # the old buffer goes before the larger one is made
        buf = slots[slot] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)
