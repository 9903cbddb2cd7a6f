"""``apply_fastirl``: make a Hugging Face causal LM return the fused IQ-Learn loss.

After ``apply_fastirl(model, **options)``, ``model(input_ids, labels=labels)``
runs the model's backbone for the final hidden states and calls
:func:`fastirl.iq_loss` with the LM head's weight (and bias), never building the
(tokens x vocab) logits; the output has ``loss`` set and ``logits=None``.  A call
without ``labels`` (e.g. from ``generate``) runs the original forward.  So
``transformers.Trainer``, accelerate or any hand-written loop trains with the
IQ-Learn loss unchanged (TRL: use ``IQTrainer``).  ``unapply_fastirl(model)``
undoes the patch.

The patch is an instance attribute ``model.forward`` (a bound method, so
``copy.deepcopy`` rebinds it to the copy) advertising the original signature
plus the keyword-only IQ inputs, so signature-based logic of ``generate`` and
``Trainer`` (column pruning, loss kwargs) keeps working.

Never silent: a forward pre-hook on the backbone checks that, in a training
step (train mode, gradients on), the backbone runs inside the patched forward.
If something replaced or bypasses it (TRL's ``SFTTrainer`` installs its own
fused LM head over the forward and trains its NLL; Liger's patch; another
library's ``apply_*``), the step raises a ``RuntimeError`` naming it, and
:func:`is_fastirl_applied` answers False.

Heads: a plain linear head, PEFT ``modules_to_save=["lm_head"]``, PEFT LoRA on
the head (as the linear map ``[h, s h A^T] @ [W, B]^T``, trained exactly), an
FSDP2 ``DTensor`` weight (gathered) or a head that is its own FSDP2 unit or a
ZeRO-3 partitioned weight (the loss runs through the head module's ``__call__``
so the framework gathers it and reduces its gradient).
"""

from __future__ import annotations

import inspect
import math
import sys
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

import fastirl as _fastirl
from fastirl import reference as _reference
from fastirl import options as _options

__all__ = ["apply_fastirl", "unapply_fastirl", "is_fastirl_applied", "extract_rewards",
           "global_num_items", "IQCausalLMOutput", "LOSS_OPTIONS", "shift_labels"]

_STATE = "_fastirl_state"

# Options of fastirl.iq_loss that apply_fastirl stores on the model.
LOSS_OPTIONS = _options.names(_options.ModuleOptions)
_OBJECTIVE_OPTIONS = _options.OBJECTIVE_NAMES

# transformers >= 5.x names the output's KV cache `cache` (`past_key_values` before).
_CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
                else "past_key_values")

# Keyword-only inputs the patched forward adds to the model's signature.
_EXTRA_INPUTS = ("shift_labels", "is_expert", "done", "num_items_in_batch", "return_metrics",
                 "return_logits")


@dataclass
class IQCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` with ``logits=None`` (unless asked for with
    ``return_logits=True``) and, when asked for, the IQ metrics (detached means
    over action rows: nll, td_penalty, reward, value, entropy, accuracy, and
    ``num_actions``, their number).  MoE models also get the router's
    ``aux_loss`` (already added to ``loss``, weighted by the config's
    ``router_aux_loss_coef``, as the model's own forward does) and
    ``router_logits``."""

    iq_metrics: dict[str, torch.Tensor] | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class _State:
    options: dict[str, Any]          # fastirl.iq_loss options
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

    def call_original(self, model, *args, **kwargs):
        if self.original is not None:
            return self.original(*args, **kwargs)
        return type(model).forward(model, *args, **kwargs)


# ----------------------------------------------------------------------------- model anatomy


def _unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / FSDP-style wrappers and PEFT models."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()          # peft.PeftModel
        elif type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "module"):
            model = model.module
    return model


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            return config.get_text_config()
        except Exception:  # noqa: BLE001 - fall back to the top-level config
            return config
    return config


def _lm_head(model: nn.Module) -> nn.Module:
    name = type(model).__name__
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise TypeError(
            f"fastirl needs a causal language model with an LM head, but {name}."
            f"get_output_embeddings() returned None: it is a bare backbone (or not a language "
            f"model). Load it with AutoModelForCausalLM (e.g. LlamaForCausalLM, not LlamaModel).")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"fastirl needs the LM head of {name} to be a linear layer with a 2-d "
                        f"weight (vocab, hidden); got {type(head).__name__}")
    return head


def _backbone(model: nn.Module) -> nn.Module:
    """The module whose ``last_hidden_state`` feeds the LM head."""
    base = getattr(model, "base_model", model)
    if base is model and hasattr(model, "get_decoder"):
        base = model.get_decoder()
    if base is model or base is None:
        raise TypeError(f"fastirl could not find the decoder backbone of {type(model).__name__} "
                        f"(no base_model / get_decoder() / model attribute)")
    return base


def _hidden_scale(model: nn.Module) -> float | None:
    """Models that scale the logits by a constant: z = s * W h = W (s h)."""
    config = _text_config(model)
    scaling = getattr(config, "logits_scaling", None)        # Granite: logits / scaling
    if isinstance(scaling, (int, float)) and scaling != 1:
        return 1.0 / float(scaling)
    scale = getattr(config, "logit_scale", None)              # Cohere: logits * scale
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        return float(scale)
    return None


def _hidden_states(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, Any]:
    out = _backbone(model)(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden, out


# ----------------------------------------------------------------------------- batch helpers


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF ``labels`` (token-aligned) -> aligned targets: ``targets[:, t] = labels[:, t+1]``,
    last column ``ignore_index`` (hidden state t predicts token t+1)."""
    targets = torch.full_like(labels, ignore_index)
    targets[..., :-1] = labels[..., 1:]
    return targets


def _targets(labels, shifted, position_ids, ignore_index):
    if shifted is not None:
        targets = shifted
    elif labels is not None:
        targets = shift_labels(labels, ignore_index)
    else:
        raise ValueError("labels or shift_labels is required for the IQ loss")
    if position_ids is not None and targets.dim() == 2 and targets.shape[1] > 1:
        # Packed batch: the row before a sequence start predicts nothing (masked
        # unconditionally: testing for starts first would be a host sync).
        starts = position_ids[:, 1:] == 0
        targets = targets.clone()
        targets[:, :-1] = targets[:, :-1].masked_fill(starts, ignore_index)
    return targets


def _shift_done(done):
    if done is None:
        return None
    done = done.bool()
    rows = torch.zeros_like(done)
    rows[:, :-1] = done[:, 1:]
    return rows


def _match_dtypes(hidden, weight, bias):
    """Under autocast, the LM head would run in the autocast dtype: cast to it.
    Otherwise the head's dtype decides (fastirl needs one dtype)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = weight.dtype
    cast = lambda t: None if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
    return (hidden if hidden.dtype == dtype else hidden.to(dtype),
            weight if weight.dtype == dtype else weight.to(dtype),
            bias if cast(bias) is None else cast(bias))


class _NoAutocast:
    def __init__(self, device_type: str):
        self.device_type = device_type
        self.ctx = None

    def __enter__(self):
        if torch.is_autocast_enabled(self.device_type):
            self.ctx = torch.autocast(self.device_type, enabled=False)
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _metric_options(options):
    return {k: v for k, v in options.items() if k in _OBJECTIVE_OPTIONS}


# ----------------------------------------------------------------------------- the loss


def _peft_layer(head: nn.Module):
    """``head`` if it is a PEFT tuner layer (e.g. ``peft.tuners.lora.Linear``), else None."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    return head if isinstance(head, BaseTunerLayer) else None


_HEAD_ALTERNATIVES = ("train the whole head with modules_to_save=['lm_head'], put plain LoRA "
                      "(no DoRA or other variant) on it, or keep it frozen")


def _head_operands(head: nn.Module, hidden: torch.Tensor):
    """``(hidden', weight, bias)`` with ``head(hidden) == hidden' @ weight.T + bias``.

    A plain linear head gives its own weight.  PEFT LoRA on the head,
    ``z = W h + b + sum_a s_a B_a A_a drop_a(h)``, is the linear map
    ``[h, s_1 drop_1(h) A_1^T, ...] @ [W, B_1, ...]^T``: the fused loss trains W
    (if trainable), every A_a and B_a exactly, without logits.  An FSDP2
    ``DTensor`` weight is gathered (``full_tensor()``, differentiable)."""
    layer = _peft_layer(head)
    if layer is None:
        weight, bias = head.weight, getattr(head, "bias", None)
        return hidden, _full(weight), _full(bias)
    base = layer.get_base_layer()
    weight, bias = _full(base.weight), _full(getattr(base, "bias", None))
    if not isinstance(base, nn.Linear) or not hasattr(layer, "lora_A"):
        raise TypeError(
            f"fastirl cannot fuse the LM head {type(layer).__module__}.{type(layer).__name__}: PEFT "
            f"adapters other than LoRA on lm_head are not supported; {_HEAD_ALTERNATIVES}.")
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
                f"{_HEAD_ALTERNATIVES}.")
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


def _full(t):
    """The whole tensor of an FSDP2 / tensor-parallel ``DTensor`` (differentiable)."""
    if t is not None and type(t).__name__ == "DTensor" and hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


def _needs_module_call(head: nn.Module) -> bool:
    """Heads whose parameters only exist inside their own forward: an FSDP2 unit
    (``fully_shard(lm_head)``) or a DeepSpeed ZeRO-3 partitioned weight."""
    if hasattr(getattr(head, "weight", None), "ds_id"):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(head, FSDPModule)


def _call_as_head(head: nn.Module, fn, hidden: torch.Tensor):
    """Runs ``fn(hidden)`` as ``head``'s forward, through ``head.__call__``, so the
    sharding framework's hooks gather the head's parameters for the loss, gather
    them again for the backward pass, and reduce their gradients (FSDP2's
    pre-forward / post-backward hooks, ZeRO-3's module hooks), exactly as for a
    loss module that owns the head (``fastirl.distributed.FusedLMHeadLoss``)."""
    if _peft_layer(head) is not None:
        raise TypeError(
            "fastirl cannot gather a sharded (FSDP2 unit or ZeRO-3) LM head that carries a PEFT "
            f"adapter; {_HEAD_ALTERNATIVES}, or do not shard lm_head on its own.")
    previous = head.__dict__.get("forward")
    head.forward = fn
    try:
        return head(hidden)
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def fused_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *,
               options: dict, position_ids=None, done_rows=None, is_expert=None,
               num_items_in_batch=None, return_metrics=False, hidden_scale=None):
    """The one place where the integration calls :func:`fastirl.iq_loss`.

    ``hidden`` (B, T, H) final hidden states, ``targets`` aligned (B, T)."""
    head = _lm_head(model)
    device = _head_device(head)
    if hidden.device != device:             # a model split across devices (device_map)
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        hidden, targets, position_ids = move(hidden), move(targets), move(position_ids)
        done_rows, is_expert = move(done_rows), move(is_expert)
    if hidden_scale is not None:
        hidden = hidden * hidden_scale
    if num_items_in_batch is not None and torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.clamp(min=1)
    elif num_items_in_batch is not None:
        num_items_in_batch = max(num_items_in_batch, 1)

    def loss(h):
        h, weight, bias = _match_dtypes(*_head_operands(head, h))
        with _NoAutocast(h.device.type):
            return _fastirl.iq_loss(h, weight, targets, bias=bias, position_ids=position_ids,
                                    done=done_rows, is_expert=is_expert,
                                    num_items_in_batch=num_items_in_batch,
                                    return_metrics=return_metrics, **options)

    return _call_as_head(head, loss, hidden) if _needs_module_call(head) else loss(hidden)


def _head_device(head: nn.Module) -> torch.device:
    weight = head.get_base_layer().weight if _peft_layer(head) is not None else head.weight
    return weight.device


def head_logits(model: nn.Module, hidden: torch.Tensor, *, hidden_scale=None,
                softcap=None) -> torch.Tensor:
    """The model's logits from final hidden states (for evaluation with
    ``return_logits=True``): ``lm_head`` applied as the model does, soft-capped."""
    head = _lm_head(model)
    if hidden_scale is not None:
        hidden = hidden * hidden_scale
    logits = head(hidden.to(_head_device(head)))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def logits_loss(logits: torch.Tensor, targets: torch.Tensor, *, options: dict, position_ids=None,
                done_rows=None, is_expert=None, num_items_in_batch=None, return_metrics=False):
    """The same loss from materialised (already soft-capped) logits, with the naive
    reference implementation: the "without fastirl" baseline."""
    opts = _metric_options(options)
    opts.pop("softcap", None)                       # the model's logits are already capped
    return _reference.iq_loss_from_logits(logits.float(), targets, position_ids=position_ids,
                                          done=done_rows, is_expert=is_expert,
                                          num_items_in_batch=num_items_in_batch,
                                          return_metrics=return_metrics, **opts)


def _router_aux_loss(model: nn.Module, out, attention_mask):
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
    config = _text_config(model)
    num_experts = getattr(model, "num_experts", None)
    if num_experts is None:
        num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    top_k = getattr(model, "num_experts_per_tok", None) or config.num_experts_per_tok
    return func(out.router_logits, num_experts, top_k, attention_mask)


def router_aux_loss_coef(model: nn.Module) -> float:
    """The weight the model's own forward gives its router aux loss."""
    target = _unwrap(model)
    coef = getattr(target, "router_aux_loss_coef", None)
    if coef is None:
        coef = getattr(_text_config(target), "router_aux_loss_coef", 0.0)
    return float(coef)


def _patched_forward(self, state: _State, args, kwargs):
    extra = {k: kwargs.pop(k) for k in _EXTRA_INPUTS if k in kwargs}
    bound = state.signature.bind(*args, **kwargs)
    arguments = dict(bound.arguments)
    for p in state.signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(p.name, {}))
    labels = arguments.pop("labels", None)
    shifted = extra.get("shift_labels", arguments.pop("shift_labels", None))
    if labels is None and shifted is None:
        return state.call_original(self, *args, **kwargs)

    num_items = extra.get("num_items_in_batch", arguments.pop("num_items_in_batch", None))
    arguments.pop("ignore_index", None)
    arguments.pop("logits_to_keep", None)
    arguments.pop("return_dict", None)
    if arguments.get("use_cache") is None:
        arguments["use_cache"] = False
    router = "output_router_logits" in state.signature.parameters
    if router and arguments.get("output_router_logits") is None:
        arguments["output_router_logits"] = bool(
            getattr(_text_config(self), "output_router_logits", False))
    want_metrics = bool(extra.get("return_metrics", state.return_metrics))
    options = state.options
    position_ids = arguments.get("position_ids")
    targets = _targets(labels, shifted, position_ids, options.get("ignore_index", -100))
    done_rows = _shift_done(extra.get("done"))
    is_expert = extra.get("is_expert")
    if is_expert is not None:
        is_expert = is_expert.bool()
    common = dict(options=options, position_ids=position_ids, done_rows=done_rows,
                  is_expert=is_expert, num_items_in_batch=num_items, return_metrics=want_metrics)
    logits = None
    if state.fused:
        hidden, out = _hidden_states(self, arguments)
        result = fused_loss(self, hidden, targets, hidden_scale=state.hidden_scale, **common)
        if extra.get("return_logits"):
            logits = head_logits(self, hidden, hidden_scale=state.hidden_scale,
                                 softcap=options.get("softcap"))
    else:
        out = state.call_original(self, **arguments)
        logits = out.logits
        result = logits_loss(logits, targets, **common)
        if not extra.get("return_logits"):
            logits = None
    loss, metrics = result if want_metrics else (result, None)
    aux_loss = None
    if router and arguments.get("output_router_logits"):
        aux_loss = getattr(out, "aux_loss", None) if not state.fused else None
        if aux_loss is None:
            aux_loss = _router_aux_loss(self, out, arguments.get("attention_mask"))
        loss = loss + router_aux_loss_coef(self) * aux_loss.to(loss.device)
    if metrics is not None:
        metrics["num_actions"] = (targets != options.get("ignore_index", -100)).sum()
    state.last_metrics = metrics
    cache = {_CACHE_FIELD: getattr(out, _CACHE_FIELD, None)}
    return IQCausalLMOutput(loss=loss, logits=logits, **cache,
                            hidden_states=getattr(out, "hidden_states", None),
                            attentions=getattr(out, "attentions", None), iq_metrics=metrics,
                            aux_loss=aux_loss, router_logits=getattr(out, "router_logits", None))


def _patched_signature(signature: inspect.Signature) -> inspect.Signature:
    params = [p for p in signature.parameters.values()]
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in params}
    for name in _EXTRA_INPUTS:
        if name not in names:
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
    params += var_kw or [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return signature.replace(parameters=[self_param] + params)


def _make_forward(signature: inspect.Signature, original):
    """The function installed as ``model.forward``.  ``original`` is what it
    replaced (None: the class's forward).  An installation that is no longer the
    model's current one (apply_fastirl ran again over a wrapper) or an inactive
    patch passes every call through to its own ``original``."""

    def forward(self, *args, **kwargs):
        state: _State | None = self.__dict__.get(_STATE)
        if state is None or not state.active or state.installed.__func__ is not forward:
            kwargs = {k: v for k, v in kwargs.items() if k not in _EXTRA_INPUTS}
            if original is not None:
                return original(*args, **kwargs)
            return type(self).forward(self, *args, **kwargs)
        state.depth += 1
        try:
            return _patched_forward(self, state, args, kwargs)
        finally:
            state.depth -= 1

    forward.__signature__ = _patched_signature(signature)
    forward.__doc__ = ("fastirl-patched forward: with labels, returns the fused IQ-Learn loss and "
                       "logits=None; without, the original forward.")
    return forward


def _reaches(fn, target) -> bool:
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


_GUARD = "_fastirl_guard"


def _guard_hook(backbone: nn.Module, args, kwargs):
    """Forward pre-hook of the backbone: in a training step (train mode, grad
    enabled) the backbone must run inside fastirl's forward, else something
    computes another loss on the patched model: raise instead of training it."""
    model = backbone.__dict__.get(_GUARD)
    state: _State | None = None if model is None else model.__dict__.get(_STATE)
    if state is None or not state.active or state.depth > 0:
        return None
    if not (backbone.training and torch.is_grad_enabled()):
        return None
    current = model.__dict__.get("forward")
    if current is not None and not _reaches(current, state.installed.__func__):
        what = (f"model.forward is now {_describe(current)}, installed over fastirl's patch "
                f"(e.g. TRL's SFTTrainer adds its own fused LM head, "
                f"trl.trainer.utils.add_fused_lm_head, and computes its NLL there; Liger's "
                f"apply_liger_kernel_to_* replaces the forward with its fused cross-entropy)")
    else:
        what = ("the backbone was called outside the patched forward (e.g. a loss that calls "
                f"model.{_backbone_name(model)}(...) directly, or the class forward "
                f"{_describe(type(model).forward)} called explicitly)")
    state.bypassed = what
    raise RuntimeError(
        f"fastirl: {type(model).__name__} was patched by apply_fastirl to train the IQ-Learn loss, "
        f"but this training step bypasses it: {what}. Training would silently use another loss. "
        f"Use fastirl.integrations.IQTrainer / IQConfig (TRL's SFTTrainer / SFTConfig with the "
        f"IQ loss) instead of SFTTrainer, or call apply_fastirl(model, ...) again after the "
        f"other patch so that fastirl's forward is outermost, or unapply_fastirl(model) to "
        f"train the other loss deliberately.")


def _backbone_name(model: nn.Module) -> str:
    backbone = _backbone(model)
    for name, child in model.named_children():
        if child is backbone:
            return name
    return "base_model"


def _install_guard(model: nn.Module) -> None:
    backbone = _backbone(model)
    backbone.__dict__[_GUARD] = model
    if not any(h is _guard_hook for h in backbone._forward_pre_hooks.values()):
        backbone.register_forward_pre_hook(_guard_hook, with_kwargs=True)


def _remove_guard(model: nn.Module) -> None:
    backbone = _backbone(model)
    backbone.__dict__.pop(_GUARD, None)
    for key, hook in list(backbone._forward_pre_hooks.items()):
        if hook is _guard_hook:
            del backbone._forward_pre_hooks[key]
            backbone._forward_pre_hooks_with_kwargs.pop(key, None)


# ----------------------------------------------------------------------------- public API


def _check_options(options: dict) -> dict:
    _options.module_options(options, "apply_fastirl()")      # validates values eagerly
    return options


@torch.no_grad()
def _verify(model: nn.Module, state: _State) -> None:
    """Checks on a 6-token input that lm_head(backbone hidden) reproduces the
    model's logits, so a model whose head is not a plain linear map of the
    backbone's output (e.g. BertForMaskedLM's transform) fails loudly."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = _lm_head(model)
    device = head.weight.device if emb is None else emb.weight.device
    if device.type == "meta" or head.weight.device.type == "meta":
        return
    vocab = head.weight.shape[0]
    ids = (torch.arange(6, device=device) * 7 + 3).remainder(vocab).unsqueeze(0)
    was_training = model.training
    model.eval()                              # also the head's adapter dropout
    try:
        out = state.call_original(model, input_ids=ids, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        hidden, _ = _hidden_states(model, {"input_ids": ids, "use_cache": False})
        if hidden.shape[:-1] != logits.shape[:-1] or hidden.shape[-1] != _full(head.weight).shape[1]:
            raise TypeError(f"fastirl cannot use {type(model).__name__}: its backbone's hidden "
                            f"states {tuple(hidden.shape)} do not feed its LM head "
                            f"{tuple(head.weight.shape)}")
        if state.hidden_scale is not None:
            hidden = hidden * state.hidden_scale
        if _needs_module_call(head):
            z = head(hidden).float()
        else:
            hidden, weight, bias = _head_operands(head, hidden.to(_head_device(head)))
            z = F.linear(hidden.to(weight.dtype), weight, bias).float()
    finally:
        model.train(was_training)
    weight = head.weight
    cap = state.options.get("softcap")
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    ref = logits.float()
    scale = 1.0 + ref.abs().max().item()
    tol = (1e-3 if weight.dtype in (torch.float32, torch.float64) else 5e-2) * scale
    err = (z - ref).abs().max().item()
    if not math.isfinite(err) or err > tol:
        raise TypeError(
            f"fastirl cannot reproduce the logits of {type(model).__name__} as "
            f"lm_head(backbone hidden states){' with softcap' if cap else ''} (max error "
            f"{err:.3g} > {tol:.3g}): its head is not a linear map of the last hidden state "
            f"(e.g. a masked-LM transform), or the model scales its logits in a way fastirl does "
            f"not know. Pass verify=False only if you know the options reproduce it.")


def _install(target: nn.Module, state: _State, original) -> None:
    state.original = original
    state.installed = types.MethodType(_make_forward(state.signature, original), target)
    target.forward = state.installed


def apply_fastirl(model: nn.Module, *, fused: bool = True, return_metrics: bool = False,
                  verify: bool = True, **options) -> nn.Module:
    """Patch a causal LM so that ``model(..., labels=labels)`` returns the IQ-Learn
    loss (``logits=None``), computed by :func:`fastirl.iq_loss` from the final
    hidden states and ``model.get_output_embeddings()`` without building logits.

    Args:
        model: a Hugging Face causal LM (``*ForCausalLM``, ``GPT2LMHeadModel``...),
            possibly inside DDP or a PEFT wrapper (the inner model is patched).
        fused: False computes the same loss from the model's materialised logits
            with :mod:`fastirl.reference` (a baseline for debugging and benchmarks).
        return_metrics: put the IQ metrics in ``output.iq_metrics`` by default
            (per call: ``model(..., return_metrics=True)``).
        verify: check once, on a 6-token input, that the fused path reproduces
            the model's logits (raises TypeError for unsupported heads).
        **options: options of :func:`fastirl.iq_loss`: gamma, td_weight,
            temperature, ignore_index, divergence, softcap (default: the model
            config's ``final_logit_softcapping``), value_term, td_rows,
            detach_next_value, backend, preset, chunk_size.

    The patched forward also accepts keyword-only ``shift_labels`` (already
    aligned targets), ``is_expert`` ((B,) bool, online IQ-Learn), ``done`` ((B, T)
    bool, token-aligned like labels: the token is a terminal action),
    ``num_items_in_batch`` (normaliser, e.g. a global token count) and
    ``return_metrics``.  With ``position_ids`` (packed batches) a 0 starts a new
    sequence; no value is bootstrapped, and no token predicted, across it.
    Calling it again updates the options.  Returns ``model``.
    """
    target = _unwrap(model)
    config = getattr(target, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"fastirl supports decoder-only causal LMs; {type(target).__name__} is "
                        f"an encoder-decoder model")
    _lm_head(target)
    _backbone(target)
    options = dict(options)
    if options.get("softcap") is None:
        options["softcap"] = getattr(_text_config(target), "final_logit_softcapping", None)
    _check_options(options)

    state: _State | None = target.__dict__.get(_STATE)
    if state is not None:
        state.options, state.fused, state.return_metrics = options, fused, return_metrics
        state.hidden_scale, state.active, state.bypassed = _hidden_scale(target), True, None
        current = target.__dict__.get("forward")
        if current is not state.installed and not _reaches(current, state.installed.__func__):
            # Something replaced the patch (e.g. TRL's fused LM head): install over it.
            _install(target, state, current)
    else:
        original = target.__dict__.get("forward")
        signature = inspect.signature(original if original is not None else target.forward)
        state = _State(options=options, fused=fused, return_metrics=return_metrics,
                       hidden_scale=_hidden_scale(target), original=original,
                       signature=signature)
        target.__dict__[_STATE] = state
        _install(target, state, original)
    _install_guard(target)
    if verify:
        try:
            _verify(target, state)
        except Exception:
            unapply_fastirl(target)
            raise
    return model


def unapply_fastirl(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_fastirl`: the model computes its own loss and logits again.
    If something wrapped ``forward`` after the patch (e.g. accelerate's autocast
    wrapper), the patch stays in the chain but passes every call through."""
    target = _unwrap(model)
    state: _State | None = target.__dict__.get(_STATE)
    if state is None:
        return model
    _remove_guard(target)
    if target.__dict__.get("forward") is state.installed:
        if state.original is None:
            del target.forward
        else:
            target.forward = state.original
        del target.__dict__[_STATE]
    else:
        state.active = False
    return model


def is_fastirl_applied(model: nn.Module) -> bool:
    """True iff a call of ``model`` with labels computes fastirl's loss: the patch
    is active, ``model.forward`` is it (or a wrapper that calls it, e.g.
    accelerate's autocast), and no training step was seen bypassing it."""
    target = _unwrap(model)
    state: _State | None = target.__dict__.get(_STATE)
    if state is None or not state.active or state.bypassed is not None:
        return False
    current = target.__dict__.get("forward")
    return current is state.installed or _reaches(current, state.installed.__func__)


def fastirl_options(model: nn.Module) -> dict | None:
    """The loss options of a patched model (None if not patched)."""
    state = _unwrap(model).__dict__.get(_STATE)
    return dict(state.options) if state is not None and state.active else None


def set_loss_options(model: nn.Module, **options) -> None:
    """Change loss options of a patched model in place (no re-verification), e.g.
    ``td_weight`` during a warm-up.  Values are validated."""
    state: _State | None = _unwrap(model).__dict__.get(_STATE)
    if state is None:
        raise ValueError("set_loss_options: the model is not patched by apply_fastirl")
    state.options = _check_options({**state.options, **options})


def last_metrics(model: nn.Module) -> dict | None:
    state = _unwrap(model).__dict__.get(_STATE)
    return None if state is None else state.last_metrics


@torch.no_grad()
def extract_rewards(model: nn.Module, batch: dict, *, gamma: float | None = None,
                    temperature: float | None = None, softcap: float | None = None,
                    ignore_index: int = -100) -> torch.Tensor:
    """Per-token implicit rewards r_t = Q(s_t, a_t) - gamma d_t V(s_{t+1}) of a causal LM.

    ``batch``: ``input_ids`` (B, T) and optionally ``attention_mask``, ``labels``
    (default: input_ids with padding ignored), ``position_ids`` (packed), ``done``.
    Returns float32 (B, T) aligned with ``input_ids``: ``rewards[b, t]`` is the
    reward of emitting token ``input_ids[b, t]`` (0 at t = 0 and where the label
    is ignored).  gamma / temperature / softcap default to the options of
    :func:`apply_fastirl` if the model is patched, else 1, 1 and the config's
    ``final_logit_softcapping``.  Never builds the logits.
    """
    target = _unwrap(model)
    head = _lm_head(target)
    state = target.__dict__.get(_STATE)
    opts = dict(state.options) if state is not None and state.active else {}
    gamma = opts.get("gamma", 1.0) if gamma is None else gamma
    temperature = opts.get("temperature", 1.0) if temperature is None else temperature
    if softcap is None:
        softcap = opts.get("softcap", getattr(_text_config(target), "final_logit_softcapping",
                                              None))
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids if attention_mask is None else \
            input_ids.masked_fill(attention_mask == 0, ignore_index)
    position_ids = batch.get("position_ids")
    inputs = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    was_training = target.training
    target.eval()
    try:
        hidden, _ = _hidden_states(target, inputs)
    finally:
        target.train(was_training)
    scale = _hidden_scale(target)
    if scale is not None:
        hidden = hidden * scale
    weight, bias = head.weight, getattr(head, "bias", None)
    hidden = hidden.to(weight.device)
    hidden, weight, bias = _match_dtypes(hidden, weight, bias)
    targets = _targets(labels, None, position_ids, ignore_index).to(weight.device)
    done = _shift_done(batch.get("done"))
    move = lambda t: None if t is None else t.to(weight.device)  # noqa: E731
    with _NoAutocast(hidden.device.type):
        rows = _fastirl.implicit_rewards(hidden, weight, targets, bias=bias, gamma=gamma,
                                         temperature=temperature, ignore_index=ignore_index,
                                         position_ids=move(position_ids), done=move(done),
                                         softcap=softcap)
    rewards = torch.zeros_like(rows)
    rewards[:, 1:] = rows[:, :-1]
    return rewards


def global_num_items(labels: torch.Tensor, *, ignore_index: int = -100, shifted: bool = False,
                     process_group=None) -> torch.Tensor:
    """Number of action tokens of ``labels`` summed over all ranks (an all_reduce
    when ``torch.distributed`` is initialised): pass it as ``num_items_in_batch``
    and multiply the loss by the world size under DDP (which averages gradients),
    so every token weighs the same whatever rank it is on.  Sum the result over
    gradient-accumulation micro-batches first for accumulation.  ``labels`` are
    token-aligned HF labels (the first column is never a target) unless
    ``shifted``."""
    targets = labels if shifted else labels[..., 1:]
    count = (targets != ignore_index).sum().to(torch.int64)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend(process_group) == "nccl" and count.device.type != "cuda":
            count = count.cuda()
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=process_group)
    return count
