"""What ``apply_fastirl`` keeps on a patched model: one :class:`State` record in
the model's ``__dict__`` (so ``copy.deepcopy`` copies it with the model)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["State", "state_of", "set_state", "drop_state"]

_KEY = "_fastirl_state"


@dataclass
class State:
    options: dict[str, Any]          # fastirl.iq_loss options (validated)
    fused: bool                      # False: the same loss from materialised logits
    return_metrics: bool
    hidden_scale: float | None       # logits = W (scale * h): Granite / Cohere logit scaling
    original: Any                    # what the current installation replaced (None: the class's)
    signature: inspect.Signature     # of the original forward, without self
    installed: Any = None            # the bound method installed as model.forward
    active: bool = True
    depth: int = 0                   # > 0 while a fastirl forward of this model runs
    bypassed: str | None = None      # what ran the backbone without fastirl's loss, if seen
    last_metrics: dict[str, torch.Tensor] | None = None

    def call_original(self, model: nn.Module, *args, **kwargs):
        if self.original is not None:
            return self.original(*args, **kwargs)
        return type(model).forward(model, *args, **kwargs)


def state_of(model: nn.Module, *, active: bool = False) -> State | None:
    """The patch state of ``model`` (the unwrapped Hugging Face model), None if
    it is not patched (or, with ``active``, if the patch was undone)."""
    state = model.__dict__.get(_KEY)
    if state is None or (active and not state.active):
        return None
    return state


def set_state(model: nn.Module, state: State) -> None:
    model.__dict__[_KEY] = state


def drop_state(model: nn.Module) -> None:
    model.__dict__.pop(_KEY, None)
