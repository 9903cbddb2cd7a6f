"""What a patched model's forward does.

With ``labels`` (or ``shift_labels``) it runs the backbone for the final hidden
states and calls :func:`fastirl.iq_loss` on the LM head's operands
(:mod:`.head`), under the caller's ``torch.autocast`` if any (the loss handles
it: GEMMs in the autocast dtype, statistics and gradients accumulated in
float32, the loss in float32); the output has ``loss`` set and ``logits=None``.
Without labels (``generate``) it runs the original forward."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

import fastirl as _fastirl
from fastirl import options as fo
from fastirl import reference as _reference

from . import batch as _batch
from .anatomy import hidden_states, lm_head, router_aux_loss, router_aux_loss_coef, text_config
from .head import head_device, head_logits, through_head
from .state import State, state_of

__all__ = ["IQCausalLMOutput", "make_forward", "fused_loss", "logits_loss", "EXTRA_INPUTS"]

# transformers >= 5.x names the output's KV cache `cache` (`past_key_values` before).
_CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
                else "past_key_values")

# Keyword-only inputs the patched forward adds to the model's signature: the
# loss's per-call inputs in HF's conventions (done token-aligned), and switches.
EXTRA_INPUTS = ("shift_labels", "is_expert", "done", "num_items_in_batch", "return_metrics",
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


def fused_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *,
               options: dict, position_ids=None, done_rows=None, is_expert=None,
               num_items_in_batch=None, return_metrics=False, hidden_scale=None):
    """The one place where the integration calls :func:`fastirl.iq_loss`.

    ``hidden`` (B, T, H) final hidden states, ``targets`` aligned (B, T)."""
    head = lm_head(model)
    device = head_device(head)
    if hidden.device != device:             # a model split across devices (device_map)
        hidden, targets, position_ids, done_rows, is_expert = _batch.to_device(
            device, hidden, targets, position_ids, done_rows, is_expert)
    num_items_in_batch = _batch.positive_count(num_items_in_batch)

    def loss(h, weight, bias):
        return _fastirl.iq_loss(h, weight, targets, bias=bias, position_ids=position_ids,
                                done=done_rows, is_expert=is_expert,
                                num_items_in_batch=num_items_in_batch,
                                return_metrics=return_metrics, **options)

    return through_head(head, hidden, loss, scale=hidden_scale)


def logits_loss(logits: torch.Tensor, targets: torch.Tensor, *, options: dict, position_ids=None,
                done_rows=None, is_expert=None, num_items_in_batch=None, return_metrics=False):
    """The same loss from materialised (already soft-capped) logits, with the naive
    reference implementation: the "without fastirl" baseline."""
    opts = {k: v for k, v in options.items() if k in fo.OBJECTIVE_NAMES and k != "softcap"}
    return _reference.iq_loss_from_logits(logits.float(), targets, position_ids=position_ids,
                                          done=done_rows, is_expert=is_expert,
                                          num_items_in_batch=num_items_in_batch,
                                          return_metrics=return_metrics, **opts)


def _patched_forward(self, state: State, args, kwargs):
    extra = {k: kwargs.pop(k) for k in EXTRA_INPUTS if k in kwargs}
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
    for name in ("ignore_index", "logits_to_keep", "return_dict"):
        arguments.pop(name, None)
    if arguments.get("use_cache") is None:
        arguments["use_cache"] = False
    router = "output_router_logits" in state.signature.parameters
    if router and arguments.get("output_router_logits") is None:
        arguments["output_router_logits"] = bool(
            getattr(text_config(self), "output_router_logits", False))
    want_metrics = bool(extra.get("return_metrics", state.return_metrics))
    options = state.options
    ignore_index = options.get("ignore_index", _batch.IGNORE_INDEX)
    position_ids = arguments.get("position_ids")
    targets = _batch.targets(labels, shifted, position_ids, ignore_index)
    is_expert = extra.get("is_expert")
    common = dict(options=options, position_ids=position_ids,
                  done_rows=_batch.shift_done(extra.get("done")),
                  is_expert=None if is_expert is None else is_expert.bool(),
                  num_items_in_batch=num_items, return_metrics=want_metrics)
    logits = None
    if state.fused:
        hidden, out = hidden_states(self, arguments)
        result = fused_loss(self, hidden, targets, hidden_scale=state.hidden_scale, **common)
        if extra.get("return_logits"):
            logits = head_logits(lm_head(self), hidden, scale=state.hidden_scale,
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
            aux_loss = router_aux_loss(self, out, arguments.get("attention_mask"))
        loss = loss + router_aux_loss_coef(self) * aux_loss.to(loss.device)
    if metrics is not None:
        metrics["num_actions"] = (targets != ignore_index).sum()
    state.last_metrics = metrics
    cache = {_CACHE_FIELD: getattr(out, _CACHE_FIELD, None)}
    return IQCausalLMOutput(loss=loss, logits=logits, **cache,
                            hidden_states=getattr(out, "hidden_states", None),
                            attentions=getattr(out, "attentions", None), iq_metrics=metrics,
                            aux_loss=aux_loss, router_logits=getattr(out, "router_logits", None))


def _patched_signature(signature: inspect.Signature) -> inspect.Signature:
    params = list(signature.parameters.values())
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in params}
    for name in EXTRA_INPUTS:
        if name not in names:
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
    params += var_kw or [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return signature.replace(parameters=[self_param] + params)


def make_forward(signature: inspect.Signature, original):
    """The function installed as ``model.forward``.  ``original`` is what it
    replaced (None: the class's forward).  An installation that is no longer the
    model's current one (apply_fastirl ran again over a wrapper) or an inactive
    patch passes every call through to its own ``original``."""

    def forward(self, *args, **kwargs):
        state = state_of(self, active=True)
        if state is None or state.installed.__func__ is not forward:
            kwargs = {k: v for k, v in kwargs.items() if k not in EXTRA_INPUTS}
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
