"""The LM head as the fused loss sees it: one head path for the loss, the
rewards and the check of ``apply_fastirl``.

:func:`through_head` calls ``fn(hidden', weight, bias)`` with operands for which
``head(hidden) == hidden' @ weight.T + bias``:

* a plain linear head gives its own weight (an FSDP2 / tensor-parallel
  ``DTensor`` is gathered with ``full_tensor()``, differentiable);
* PEFT LoRA on the head, ``z = W h + b + sum_a s_a B_a A_a drop_a(h)``, is the
  linear map ``[h, s_1 drop_1(h) A_1^T, ...] @ [W, B_1, ...]^T``: the fused loss
  trains W (if trainable), every A_a and B_a exactly, without logits;
* a head whose parameters exist only inside its own forward (an FSDP2 unit,
  a DeepSpeed ZeRO-3 partitioned weight) runs ``fn`` as the head's forward,
  through ``head.__call__``, so the framework's hooks gather the weight (and,
  for a loss, gather it again for backward and reduce its gradient), exactly as
  for a loss module that owns the head (``fastirl.distributed.FusedLMHeadLoss``).

Without ``torch.autocast`` the head's dtype decides (a bf16 backbone before an
fp32 head: the hidden states are cast to float32); under autocast
``fastirl.iq_loss`` / ``implicit_rewards`` cast themselves, as ``F.linear`` would.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastirl.functional import _autocast_dtype

__all__ = ["through_head", "head_operands", "head_device", "head_logits", "needs_module_call",
           "call_as", "full", "peft_layer", "HEAD_ALTERNATIVES"]

HEAD_ALTERNATIVES = ("train the whole head with modules_to_save=['lm_head'], put plain LoRA "
                     "(no DoRA or other variant) on it, or keep it frozen")


def peft_layer(head: nn.Module):
    """``head`` if it is a PEFT tuner layer (e.g. ``peft.tuners.lora.Linear``), else None."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    return head if isinstance(head, BaseTunerLayer) else None


def full(t):
    """The whole tensor of an FSDP2 / tensor-parallel ``DTensor`` (differentiable)."""
    if t is not None and type(t).__name__ == "DTensor" and hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


def head_operands(head: nn.Module, hidden: torch.Tensor):
    """``(hidden', weight, bias)`` with ``head(hidden) == hidden' @ weight.T + bias``
    (see the module docstring)."""
    layer = peft_layer(head)
    if layer is None:
        return hidden, full(head.weight), full(getattr(head, "bias", None))
    base = layer.get_base_layer()
    weight, bias = full(base.weight), full(getattr(base, "bias", None))
    if not isinstance(base, nn.Linear) or not hasattr(layer, "lora_A"):
        raise TypeError(
            f"fastirl cannot fuse the LM head {type(layer).__module__}.{type(layer).__name__}: PEFT "
            f"adapters other than LoRA on lm_head are not supported; {HEAD_ALTERNATIVES}.")
    if layer.disable_adapters or layer.merged:
        return hidden, weight, bias
    columns, blocks = [hidden], [weight]
    for name in layer.active_adapters:
        if name not in layer.lora_A.keys():
            continue
        if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name):
            raise TypeError(
                f"fastirl cannot fuse PEFT LoRA adapter {name!r} on the LM head: it uses a LoRA "
                f"variant (e.g. DoRA), which is not a linear map of the hidden state; "
                f"{HEAD_ALTERNATIVES}.")
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        scaling = layer.scaling[name]
        x = layer.lora_dropout[name](hidden.to(lora_a.weight.dtype))
        columns.append(F.linear(x, lora_a.weight) * scaling)
        blocks.append(lora_b.weight)
        if lora_b.bias is not None:
            extra = lora_b.bias * scaling
            bias = extra if bias is None else bias + extra
    if len(columns) == 1:
        return hidden, weight, bias
    dtype = weight.dtype
    return (torch.cat([c.to(dtype) for c in columns], dim=-1),
            torch.cat([w.to(dtype) for w in blocks], dim=1), bias)


def _one_dtype(hidden, weight, bias):
    """Without autocast, the head's dtype decides (fastirl needs one dtype);
    under autocast the loss casts itself."""
    if _autocast_dtype(hidden.device) is not None:
        return hidden, weight, bias
    dtype = weight.dtype
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return (hidden if hidden.dtype == dtype else hidden.to(dtype)), weight, bias


def needs_module_call(module: nn.Module) -> bool:
    """Modules whose parameters only exist inside their own forward: an FSDP2
    unit (``fully_shard(module)``) or a DeepSpeed ZeRO-3 partitioned weight."""
    if hasattr(getattr(module, "weight", None), "ds_id"):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


def call_as(module: nn.Module, fn: Callable, *args, **kwargs):
    """Runs ``fn(*args, **kwargs)`` as ``module``'s forward, through
    ``module.__call__``, so the sharding framework's hooks run around it."""
    previous = module.__dict__.get("forward")
    module.forward = fn
    try:
        return module(*args, **kwargs)
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def head_device(head: nn.Module) -> torch.device:
    weight = head.get_base_layer().weight if peft_layer(head) is not None else head.weight
    return weight.device


def through_head(head: nn.Module, hidden: torch.Tensor, fn: Callable, *,
                 scale: float | None = None):
    """``fn(hidden', weight, bias)`` on the operands of ``head`` (see the module
    docstring); ``scale`` multiplies the hidden states first (logit scaling).
    ``hidden`` must be on :func:`head_device`."""
    if scale is not None:
        hidden = hidden * scale

    def run(h):
        return fn(*_one_dtype(*head_operands(head, h)))

    if not needs_module_call(head):
        return run(hidden)
    if peft_layer(head) is not None:
        raise TypeError(
            "fastirl cannot gather a sharded (FSDP2 unit or ZeRO-3) LM head that carries a PEFT "
            f"adapter; {HEAD_ALTERNATIVES}, or do not shard lm_head on its own.")
    return call_as(head, run, hidden)


def head_logits(head: nn.Module, hidden: torch.Tensor, *, scale: float | None = None,
                softcap=None) -> torch.Tensor:
    """The model's logits from final hidden states (evaluation with
    ``return_logits=True``): the head module applied as the model does, soft-capped."""
    if scale is not None:
        hidden = hidden * scale
    logits = head(hidden.to(head_device(head)))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits
