"""Where things are in a Hugging Face causal LM: the model inside wrappers, its
text config, its LM head and backbone, the logit scaling of its config, its
MoE router loss.  Reads the model; changes nothing."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = ["unwrap", "text_config", "lm_head", "backbone", "backbone_name", "hidden_scale",
           "config_softcap", "hidden_states", "router_aux_loss", "router_aux_loss_coef"]


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / FSDP1 / DeepSpeed-engine wrappers and
    PEFT models."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()          # peft.PeftModel
        elif type(model).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine") and \
                hasattr(model, "module"):
            model = model.module
    return model


def text_config(model: nn.Module):
    """The config of the language model (the text part of a multimodal config)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            return config.get_text_config()
        except Exception:  # noqa: BLE001 - fall back to the top-level config
            return config
    return config


def lm_head(model: nn.Module) -> nn.Module:
    """``model.get_output_embeddings()``, checked to be a linear layer."""
    name = type(model).__name__
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise TypeError(
            f"fastirl needs a causal language model with an LM head, but {name}."
            f"get_output_embeddings() returned None: it is a bare backbone (or not a language "
            f"model). Load it with AutoModelForCausalLM (e.g. LlamaForCausalLM, not LlamaModel).")
    weight = getattr(head, "weight", None)
    # a ZeRO-3 partitioned weight is empty outside its module's forward: its shape is ds_shape
    shape = getattr(weight, "ds_shape", getattr(weight, "shape", ()))
    if not isinstance(weight, torch.Tensor) or len(shape) != 2:
        raise TypeError(f"fastirl needs the LM head of {name} to be a linear layer with a 2-d "
                        f"weight (vocab, hidden); got {type(head).__name__}")
    return head


def backbone(model: nn.Module) -> nn.Module:
    """The module whose ``last_hidden_state`` feeds the LM head."""
    base = getattr(model, "base_model", model)
    if base is model and hasattr(model, "get_decoder"):
        base = model.get_decoder()
    if base is model or base is None:
        raise TypeError(f"fastirl could not find the decoder backbone of {type(model).__name__} "
                        f"(no base_model / get_decoder() / model attribute)")
    return base


def backbone_name(model: nn.Module) -> str:
    """The attribute name of the backbone (for messages)."""
    base = backbone(model)
    for name, child in model.named_children():
        if child is base:
            return name
    return "base_model"


def hidden_scale(model: nn.Module) -> float | None:
    """Models that scale the logits by a constant: z = s * W h = W (s h)."""
    config = text_config(model)
    scaling = getattr(config, "logits_scaling", None)        # Granite: logits / scaling
    if isinstance(scaling, (int, float)) and scaling != 1:
        return 1.0 / float(scaling)
    scale = getattr(config, "logit_scale", None)              # Cohere: logits * scale
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        return float(scale)
    return None


def config_softcap(model: nn.Module) -> float | None:
    """The final logit soft cap of the config (Gemma 2), None if it has none."""
    return getattr(text_config(model), "final_logit_softcapping", None)


def hidden_states(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, Any]:
    """``(final hidden states, the backbone's output)`` of a backbone call."""
    out = backbone(model)(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, out


def router_aux_loss(model: nn.Module, out, attention_mask):
    """The MoE load-balancing loss, computed by the model's own module function."""
    func = None
    for cls in type(model).__mro__:        # FSDP2 subclasses the model class
        module = sys.modules.get(cls.__module__)
        func = getattr(module, "load_balancing_loss_func", None)
        if func is not None:
            break
    if func is None:
        raise TypeError(f"fastirl: {type(model).__name__} returns router logits but its module "
                        f"has no load_balancing_loss_func; pass output_router_logits=False")
    config = text_config(model)
    num_experts = getattr(model, "num_experts", None)
    if num_experts is None:
        num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    top_k = getattr(model, "num_experts_per_tok", None) or config.num_experts_per_tok
    return func(out.router_logits, num_experts, top_k, attention_mask)


def router_aux_loss_coef(model: nn.Module) -> float:
    """The weight the model's own forward gives its router aux loss."""
    target = unwrap(model)
    coef = getattr(target, "router_aux_loss_coef", None)
    if coef is None:
        coef = getattr(text_config(target), "router_aux_loss_coef", 0.0)
    return float(coef)
