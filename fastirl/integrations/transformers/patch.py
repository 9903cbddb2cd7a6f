"""``apply_fastirl``: make a Hugging Face causal LM return the fused IQ-Learn loss.

After ``apply_fastirl(model, **options)``, ``model(input_ids, labels=labels)``
runs the model's backbone for the final hidden states and calls
:func:`fastirl.iq_loss` with the LM head's weight (and bias), never building the
(tokens x vocab) logits; the output has ``loss`` set and ``logits=None``.  A call
without ``labels`` (e.g. from ``generate``) runs the original forward.  So
``transformers.Trainer``, TRL's ``SFTTrainer`` or any hand-written loop trains
with the IQ-Learn loss unchanged.  ``unapply_fastirl(model)`` undoes the patch.

The patch is an instance attribute ``model.forward`` (a bound method, so
``copy.deepcopy`` rebinds it to the copy) advertising the original signature
plus the keyword-only IQ inputs, so signature-based logic of ``generate`` and
``Trainer`` (column pruning, loss kwargs) keeps working.
"""

from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

import fastirl as _fastirl
from fastirl import reference as _reference
from fastirl.objective import IQOptions

__all__ = ["apply_fastirl", "unapply_fastirl", "is_fastirl_applied", "extract_rewards",
           "global_num_items", "IQCausalLMOutput", "LOSS_OPTIONS", "shift_labels"]

_STATE = "_fastirl_state"

# Options of fastirl.iq_loss that apply_fastirl stores on the model.
LOSS_OPTIONS = ("gamma", "td_weight", "temperature", "ignore_index", "divergence", "softcap",
                "value_term", "td_rows", "detach_next_value", "backend", "preset", "chunk_size")
_OBJECTIVE_OPTIONS = tuple(IQOptions.__dataclass_fields__)

# Keyword-only inputs the patched forward adds to the model's signature.
_EXTRA_INPUTS = ("shift_labels", "is_expert", "done", "num_items_in_batch", "return_metrics")


@dataclass
class IQCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` with ``logits=None`` and, when asked for, the
    IQ metrics (detached means over action rows: nll, td_penalty, reward, value,
    entropy, accuracy)."""

    iq_metrics: dict[str, torch.Tensor] | None = None


@dataclass
class _State:
    options: dict[str, Any]          # fastirl.iq_loss options
    fused: bool                      # False: the same loss from materialised logits
    return_metrics: bool
    hidden_scale: float | None       # logits = W (scale * h): Granite / Cohere logit scaling
    original: Any                    # the instance forward replaced, or None (the class's)
    signature: inspect.Signature     # of the original forward, without self
    installed: Any = None            # the bound method installed as model.forward
    active: bool = True
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


def fused_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *,
               options: dict, position_ids=None, done_rows=None, is_expert=None,
               num_items_in_batch=None, return_metrics=False, hidden_scale=None):
    """The one place where the integration calls :func:`fastirl.iq_loss`.

    ``hidden`` (B, T, H) final hidden states, ``targets`` aligned (B, T)."""
    head = _lm_head(model)
    weight, bias = head.weight, getattr(head, "bias", None)
    if hidden.device != weight.device:      # a model split across devices (device_map)
        move = lambda t: None if t is None else t.to(weight.device)  # noqa: E731
        hidden, targets, position_ids = move(hidden), move(targets), move(position_ids)
        done_rows, is_expert = move(done_rows), move(is_expert)
    if hidden_scale is not None:
        hidden = hidden * hidden_scale
    hidden, weight, bias = _match_dtypes(hidden, weight, bias)
    if num_items_in_batch is not None and torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.clamp(min=1)
    elif num_items_in_batch is not None:
        num_items_in_batch = max(num_items_in_batch, 1)
    with _NoAutocast(hidden.device.type):
        return _fastirl.iq_loss(hidden, weight, targets, bias=bias, position_ids=position_ids,
                                done=done_rows, is_expert=is_expert,
                                num_items_in_batch=num_items_in_batch,
                                return_metrics=return_metrics, **options)


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


def _patched_forward(self, *args, **kwargs):
    state: _State | None = self.__dict__.get(_STATE)
    extra = {k: kwargs.pop(k) for k in _EXTRA_INPUTS if k in kwargs}
    if state is None:
        return type(self).forward(self, *args, **kwargs)
    if not state.active:
        return state.call_original(self, *args, **kwargs)

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
    if state.fused:
        hidden, out = _hidden_states(self, arguments)
        result = fused_loss(self, hidden, targets, hidden_scale=state.hidden_scale, **common)
    else:
        out = state.call_original(self, **arguments)
        result = logits_loss(out.logits, targets, **common)
    loss, metrics = result if want_metrics else (result, None)
    state.last_metrics = metrics
    return IQCausalLMOutput(loss=loss, logits=None,
                            past_key_values=getattr(out, "past_key_values", None),
                            hidden_states=getattr(out, "hidden_states", None),
                            attentions=getattr(out, "attentions", None), iq_metrics=metrics)


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


def _make_forward(signature: inspect.Signature):
    def forward(self, *args, **kwargs):
        return _patched_forward(self, *args, **kwargs)

    forward.__signature__ = _patched_signature(signature)
    forward.__doc__ = ("fastirl-patched forward: with labels, returns the fused IQ-Learn loss and "
                       "logits=None; without, the original forward.")
    return forward


# ----------------------------------------------------------------------------- public API


def _check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"unknown fastirl option(s) {unknown}; expected some of {LOSS_OPTIONS}")
    IQOptions(**_metric_options(options))            # validates values eagerly
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
    model.eval()
    try:
        out = state.call_original(model, input_ids=ids, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        hidden, _ = _hidden_states(model, {"input_ids": ids, "use_cache": False})
    finally:
        model.train(was_training)
    if hidden.shape[:-1] != logits.shape[:-1] or hidden.shape[-1] != head.weight.shape[1]:
        raise TypeError(f"fastirl cannot use {type(model).__name__}: its backbone's hidden states "
                        f"{tuple(hidden.shape)} do not feed its LM head {tuple(head.weight.shape)}")
    if state.hidden_scale is not None:
        hidden = hidden * state.hidden_scale
    weight = head.weight
    bias = getattr(head, "bias", None)
    z = F.linear(hidden.to(weight.dtype), weight, bias).float()
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
            f"{err:.3g} > {tol:.3g}): its head is not a plain linear map of the last hidden "
            f"state (e.g. a masked-LM transform, or a logit scaling fastirl does not know). "
            f"Pass verify=False only if you know the options reproduce it.")


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
        state.hidden_scale, state.active = _hidden_scale(target), True
    else:
        original = target.__dict__.get("forward")
        signature = inspect.signature(original if original is not None else target.forward)
        state = _State(options=options, fused=fused, return_metrics=return_metrics,
                       hidden_scale=_hidden_scale(target), original=original,
                       signature=signature)
        state.installed = types.MethodType(_make_forward(signature), target)
        target.__dict__[_STATE] = state
        target.forward = state.installed
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
    state = _unwrap(model).__dict__.get(_STATE)
    return state is not None and state.active


def fastirl_options(model: nn.Module) -> dict | None:
    """The loss options of a patched model (None if not patched)."""
    state = _unwrap(model).__dict__.get(_STATE)
    return dict(state.options) if state is not None and state.active else None


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
