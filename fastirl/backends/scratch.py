"""Scratch memory reused across the chunks of one loss call, on the CPU.

The CPU allocator hands a large request (above glibc's mmap threshold, at most
32 MiB) to the kernel each time and gives it back on free, so a fresh logits
block per chunk is a fresh set of pages, each zero-filled on its first touch:
at B=4 T=1024 H=512 V=32000 in bf16 (65 MB blocks, 32 MB dW slabs) a
forward+backward spent about a quarter of its time there.  Inside
``with scope():`` the CPU backend takes its block and its low-precision dW slab from one
buffer per slot instead, grown when a request is larger, freed when the scope
closes.  A slot's memory is the caller's until it asks for that slot again:
each chunk is done with its block before the next chunk's is taken (the
engine's loops run chunk after chunk).  The engine closes the scope before it
makes dW in the weight's dtype, so the planned peak (:mod:`fastirl.memory`) is
unchanged.  Other devices, or no open scope: a plain ``torch.empty``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

import torch

__all__ = ["scope", "empty"]

_slots: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fastirl_scratch",
                                                                    default=None)


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Reuse scratch buffers until the block ends (nested scopes share the outer one's)."""
    if _slots.get() is not None:
        yield
        return
    token = _slots.set({})
    try:
        yield
    finally:
        _slots.reset(token)


def empty(slot: str, shape: tuple[int, ...], dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape``: the memory of ``slot``
    within an open scope on the CPU (its previous contents are overwritten by
    the caller), else a new tensor."""
    slots = _slots.get()
    if slots is None or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    buf = slots.get(slot)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        slots[slot] = None            # the old buffer goes before the larger one is made
        buf = slots[slot] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)
