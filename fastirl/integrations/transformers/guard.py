"""Never silent: a forward pre-hook on the backbone checks that, in a training
step (train mode, gradients on), the backbone runs inside fastirl's patched
forward.  If something replaced or bypasses it (TRL's ``SFTTrainer`` installs
its own fused LM head over the forward and trains its NLL; Liger's patch;
another library's ``apply_*``), the step raises a ``RuntimeError`` naming it,
and the patch records the bypass (``is_fastirl_applied`` then answers False)."""

from __future__ import annotations

import torch
from torch import nn

from .anatomy import backbone, backbone_name
from .state import state_of

__all__ = ["install_guard", "remove_guard", "reaches"]

_OWNER = "_fastirl_guard"        # backbone.__dict__ entry: the patched model it guards


def reaches(fn, target) -> bool:
    """Whether the callable ``fn`` is ``target`` or wraps it (``__wrapped__`` chains of
    ``functools.wraps``, e.g. accelerate's autocast / fp32-output wrappers)."""
    seen = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        fn = getattr(fn, "__func__", fn)
        if fn is target:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def _describe(fn) -> str:
    fn = getattr(fn, "__func__", fn)
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{name}"


def _guard_hook(module: nn.Module, args, kwargs):
    """Forward pre-hook of the backbone: in a training step the backbone must run
    inside fastirl's forward, else something computes another loss on the
    patched model: raise instead of training it."""
    model = module.__dict__.get(_OWNER)
    state = None if model is None else state_of(model, active=True)
    if state is None or state.depth > 0:
        return None
    if not (module.training and torch.is_grad_enabled()):
        return None
    current = model.__dict__.get("forward")
    if current is not None and not reaches(current, state.installed.__func__):
        what = (f"model.forward is now {_describe(current)}, installed over fastirl's patch "
                f"(e.g. TRL's SFTTrainer adds its own fused LM head, "
                f"trl.trainer.utils.add_fused_lm_head, and computes its NLL there; Liger's "
                f"apply_liger_kernel_to_* replaces the forward with its fused cross-entropy)")
    else:
        what = ("the backbone was called outside the patched forward (e.g. a loss that calls "
                f"model.{backbone_name(model)}(...) directly, or the class forward "
                f"{_describe(type(model).forward)} called explicitly)")
    state.bypassed = what
    raise RuntimeError(
        f"fastirl: {type(model).__name__} was patched by apply_fastirl to train the IQ-Learn loss, "
        f"but this training step bypasses it: {what}. Training would silently use another loss. "
        f"Use fastirl.integrations.IQTrainer / IQConfig (TRL's SFTTrainer / SFTConfig with the "
        f"IQ loss) instead of SFTTrainer, or call apply_fastirl(model, ...) again after the "
        f"other patch so that fastirl's forward is outermost, or unapply_fastirl(model) to "
        f"train the other loss deliberately.")


def install_guard(model: nn.Module) -> None:
    base = backbone(model)
    base.__dict__[_OWNER] = model
    if not any(h is _guard_hook for h in base._forward_pre_hooks.values()):
        base.register_forward_pre_hook(_guard_hook, with_kwargs=True)


def remove_guard(model: nn.Module) -> None:
    base = backbone(model)
    base.__dict__.pop(_OWNER, None)
    for key, hook in list(base._forward_pre_hooks.items()):
        if hook is _guard_hook:
            del base._forward_pre_hooks[key]
            base._forward_pre_hooks_with_kwargs.pop(key, None)
