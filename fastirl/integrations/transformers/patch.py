"""``apply_fastirl``: make a Hugging Face causal LM return the fused IQ-Learn loss.

After ``apply_fastirl(model, **options)``, ``model(input_ids, labels=labels)``
runs the model's backbone for the final hidden states and calls
:func:`fastirl.iq_loss` with the LM head's weight (and bias), never building the
(tokens x vocab) logits; the output has ``loss`` set and ``logits=None``
(:mod:`.forward`).  A call without ``labels`` (e.g. from ``generate``) runs the
original forward.  So ``transformers.Trainer``, accelerate or any hand-written
loop trains with the IQ-Learn loss unchanged (TRL: use ``IQTrainer``).
``unapply_fastirl(model)`` undoes the patch.

The patch is an instance attribute ``model.forward`` (a bound method, so
``copy.deepcopy`` rebinds it to the copy) advertising the original signature
plus the keyword-only IQ inputs, so signature-based logic of ``generate`` and
``Trainer`` (column pruning, loss kwargs) keeps working.  A training step that
bypasses it raises (:mod:`.guard`).

Heads (:mod:`.head`): a plain linear head, PEFT ``modules_to_save=["lm_head"]``,
PEFT LoRA on the head (as the linear map ``[h, s h A^T] @ [W, B]^T``, trained
exactly), an FSDP2 ``DTensor`` weight (gathered) or a head that is its own FSDP2
unit or a ZeRO-3 partitioned weight (the loss runs through the head module's
``__call__`` so the framework gathers it and reduces its gradient).
"""

from __future__ import annotations

import inspect
import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from fastirl import options as fo
from fastirl.engine import PRECISE

from .anatomy import backbone, config_softcap, hidden_scale, hidden_states, lm_head, unwrap
from .forward import make_forward
from .guard import install_guard, reaches, remove_guard
from .head import full, head_device, through_head
from .state import State, drop_state, set_state, state_of

__all__ = ["apply_fastirl", "unapply_fastirl", "is_fastirl_applied", "fastirl_options",
           "set_loss_options", "last_metrics", "LOSS_OPTIONS"]

# Options of fastirl.iq_loss that apply_fastirl stores on the model.
LOSS_OPTIONS = fo.names(fo.ModuleOptions)


def _check_options(options: dict) -> dict:
    fo.module_options(options, "apply_fastirl()")      # validates values eagerly
    return options


@torch.no_grad()
def _verify(model: nn.Module, state: State) -> None:
    """Checks on a 6-token input that lm_head(backbone hidden) reproduces the
    model's logits, so a model whose head is not a plain linear map of the
    backbone's output (e.g. BertForMaskedLM's transform) fails loudly."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = lm_head(model)
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
        hidden, _ = hidden_states(model, {"input_ids": ids, "use_cache": False})
        if hidden.shape[:-1] != logits.shape[:-1] or hidden.shape[-1] != full(head.weight).shape[1]:
            raise TypeError(f"fastirl cannot use {type(model).__name__}: its backbone's hidden "
                            f"states {tuple(hidden.shape)} do not feed its LM head "
                            f"{tuple(head.weight.shape)}")
        z = through_head(head, hidden.to(head_device(head)), F.linear,
                         scale=state.hidden_scale).float()
    finally:
        model.train(was_training)
    cap = state.options.get("softcap")
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    ref = logits.float()
    scale = 1.0 + ref.abs().max().item()
    tol = (1e-3 if head.weight.dtype in PRECISE else 5e-2) * scale
    err = (z - ref).abs().max().item()
    if not math.isfinite(err) or err > tol:
        raise TypeError(
            f"fastirl cannot reproduce the logits of {type(model).__name__} as "
            f"lm_head(backbone hidden states){' with softcap' if cap else ''} (max error "
            f"{err:.3g} > {tol:.3g}): its head is not a linear map of the last hidden state "
            f"(e.g. a masked-LM transform), or the model scales its logits in a way fastirl does "
            f"not know. Pass verify=False only if you know the options reproduce it.")


def _install(target: nn.Module, state: State, original) -> None:
    state.original = original
    state.installed = types.MethodType(make_forward(state.signature, original), target)
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
        **options: the options of :func:`fastirl.iq_loss` listed below;
            ``softcap`` defaults to the model config's ``final_logit_softcapping``.

    The patched forward also accepts keyword-only ``shift_labels`` (already
    aligned targets), ``is_expert`` ((B,) bool, online IQ-Learn), ``done`` ((B, T)
    bool, token-aligned like labels: the token is a terminal action),
    ``num_items_in_batch`` (normaliser: under data parallelism
    :func:`fastirl.distributed.global_num_items`), ``return_metrics`` and
    ``return_logits``.  With ``position_ids`` (packed batches) a 0 starts a new
    sequence; no value is bootstrapped, and no token predicted, across it.
    Under ``torch.autocast`` the loss runs its GEMMs in the autocast dtype and
    returns float32.  Calling it again updates the options.  Returns ``model``.
    """
    target = unwrap(model)
    config = getattr(target, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"fastirl supports decoder-only causal LMs; {type(target).__name__} is "
                        f"an encoder-decoder model")
    lm_head(target)
    backbone(target)
    options = dict(options)
    if options.get("softcap") is None:
        options["softcap"] = config_softcap(target)
    _check_options(options)

    state = state_of(target)
    if state is not None:
        state.options, state.fused, state.return_metrics = options, fused, return_metrics
        state.hidden_scale, state.active, state.bypassed = hidden_scale(target), True, None
        current = target.__dict__.get("forward")
        if current is not state.installed and not reaches(current, state.installed.__func__):
            # Something replaced the patch (e.g. TRL's fused LM head): install over it.
            _install(target, state, current)
    else:
        original = target.__dict__.get("forward")
        signature = inspect.signature(original if original is not None else target.forward)
        state = State(options=options, fused=fused, return_metrics=return_metrics,
                      hidden_scale=hidden_scale(target), original=original,
                      signature=signature)
        set_state(target, state)
        _install(target, state, original)
    install_guard(target)
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
    target = unwrap(model)
    state = state_of(target)
    if state is None:
        return model
    remove_guard(target)
    if target.__dict__.get("forward") is state.installed:
        if state.original is None:
            del target.forward
        else:
            target.forward = state.original
        drop_state(target)
    else:
        state.active = False
    return model


def is_fastirl_applied(model: nn.Module) -> bool:
    """True iff a call of ``model`` with labels computes fastirl's loss: the patch
    is active, ``model.forward`` is it (or a wrapper that calls it, e.g.
    accelerate's autocast), and no training step was seen bypassing it."""
    target = unwrap(model)
    state = state_of(target, active=True)
    if state is None or state.bypassed is not None:
        return False
    current = target.__dict__.get("forward")
    return current is state.installed or reaches(current, state.installed.__func__)


def fastirl_options(model: nn.Module) -> dict | None:
    """The loss options of a patched model (None if not patched)."""
    state = state_of(unwrap(model), active=True)
    return None if state is None else dict(state.options)


def set_loss_options(model: nn.Module, **options) -> None:
    """Change loss options of a patched model in place (no re-verification), e.g.
    ``td_weight`` during a warm-up.  Values are validated."""
    state = state_of(unwrap(model))
    if state is None:
        raise ValueError("set_loss_options: the model is not patched by apply_fastirl")
    state.options = _check_options({**state.options, **options})


def last_metrics(model: nn.Module) -> dict | None:
    state = state_of(unwrap(model))
    return None if state is None else state.last_metrics


apply_fastirl.__doc__ += fo.options_table(fo.ModuleOptions)
