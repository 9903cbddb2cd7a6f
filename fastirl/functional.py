"""The public functional API: ``iq_loss``, ``iq_loss_from_logits``, ``implicit_rewards``.

Each entry point parses its options once (:mod:`fastirl.options`), checks its
tensors' types and shapes (:mod:`fastirl._validate`), decides the GEMM dtype
(autocast), and hands one :class:`~fastirl.compute.Call` down: to the traced
op under ``torch.compile`` and for meta / fake tensors (:mod:`fastirl.traced`),
else to :func:`fastirl.compute.compute`.  Vocabulary parallelism
(``process_group``) wraps the backend after every local check has passed
(:mod:`fastirl.vocab_parallel`).
"""

from __future__ import annotations

import inspect
from typing import Literal, overload

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from typing_extensions import Unpack

from . import _validate as check
from . import options as opts
from . import traced
from .compute import Call, compute
from .objective import coupling
from .options import LinearOptions, LogitsOptions, RewardOptions

__all__ = ["iq_loss", "iq_loss_from_logits", "implicit_rewards"]

Metrics = dict[str, Tensor]


def _traced(backend, *tensors) -> bool:
    """Whether a call takes the traced path (:mod:`fastirl.traced`): under
    torch.compile, or with meta / fake tensors, which hold no values to check."""
    if not isinstance(backend, str):
        return False            # backend objects run eagerly (the engine calls them)
    if torch.compiler.is_compiling():
        return True
    return any(isinstance(t, torch.Tensor) and (t.device.type == "meta" or is_fake(t))
               for t in tensors)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of ``torch.autocast`` on ``device``'s type, None when it is off
    (or the device type has none, e.g. meta)."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except RuntimeError:
        pass
    return None


def _call(entry: str, main: Tensor, weight, targets: Tensor, kwargs: dict, *,
          allowed: tuple[str, ...], where: str, metrics: bool, predictions: bool):
    """Parses the options and checks every tensor of one call (no values read).
    Returns (call, traced).  With a process group, every local check runs first;
    then all ranks agree (a failing rank tells the others, so none waits)."""
    group = kwargs.get("process_group")
    try:
        call, is_traced = _checked(entry, main, weight, targets, kwargs, allowed=allowed,
                                   where=where, metrics=metrics, predictions=predictions)
    except (ValueError, TypeError) as exc:
        if group is not None:
            from .vocab_parallel import fail_together
            fail_together(group, exc, main if isinstance(main, Tensor) else None)
        raise
    if group is not None:
        from .vocab_parallel import shard_call
        call = shard_call(call, group)
    return call, is_traced


def _checked(entry: str, main: Tensor, weight, targets: Tensor, kwargs: dict, *,
             allowed: tuple[str, ...], where: str, metrics: bool, predictions: bool):
    backend = kwargs.get("backend", "auto")
    is_traced = kwargs.get("process_group") is None and _traced(
        backend, main, weight, kwargs.get("bias"), targets)
    iq, run, t = opts.parse(kwargs, allowed=allowed, where=where, read=not is_traced)
    if entry == "rewards":          # per-row values only: no loss options, no normaliser
        iq = iq.replace(td_weight=0.0, reduction="none")
    autocast = None
    if entry == "logits":
        check.tensor("logits", main, ndim=(2, 3), floating=True)
        vocab = main.shape[-1]
    else:
        autocast = _autocast_dtype(main.device) if isinstance(main, Tensor) else None
        check.linear(main, weight, t.get("bias"), mixed_ok=autocast is not None)
        vocab = weight.shape[0]
    name = "logits" if entry == "logits" else "hidden"
    check.batch(name, main, targets, t.get("position_ids"), t.get("done"), t.get("is_expert"))
    check.sequences(targets, t.get("position_ids"), t.get("done"),
                    coupling=coupling(iq, online=t.get("is_expert") is not None,
                                      loss=entry != "rewards"))
    num = check.num_items(t.get("num_items_in_batch"), read=not is_traced)
    if num is not None and iq.reduction != "mean":
        raise ValueError(f"num_items_in_batch replaces the normaliser of reduction='mean'; "
                         f"with reduction={iq.reduction!r} it would be ignored: leave it out "
                         f"(or divide the summed loss yourself)")
    if iq.ce_weight is not None and iq.label_smoothing:
        raise ValueError("ce_weight together with label_smoothing is not supported: "
                         "F.cross_entropy weighs the smoothing term by the class weights, which "
                         "needs a weighted logit sum per row; use one of the two")
    # (a weight shard's vocabulary is not the global one: vocab_parallel checks the length)
    check.class_weights(iq.ce_weight, None if t.get("process_group") is not None else vocab,
                        main.device)
    call = Call(entry, main, weight, t.get("bias"), targets, t.get("position_ids"),
                t.get("done"), t.get("is_expert"), num, iq, run, metrics=metrics,
                predictions=predictions,
                # under autocast the GEMMs run in its dtype, as F.linear's would (float64
                # is never cast); logits are read as they are (autocast runs losses in fp32)
                compute_dtype=main.dtype if autocast is None or main.dtype == torch.float64
                else autocast,
                vocab=vocab)
    return call, is_traced


def _run(call: Call, is_traced: bool):
    """The loss (and extras) of a checked call."""
    if is_traced:
        return traced.call(call)
    result = compute(call)
    if not (call.metrics or call.predictions):
        return result.loss
    extras = result.metrics(call.iq) if call.metrics else {}
    if call.predictions:
        extras["predicted"] = result.predictions(call.iq.ignore_index)
    return result.loss, extras


@overload
def iq_loss(hidden: Tensor, weight: Tensor, targets: Tensor, *,
            return_metrics: Literal[False] = False, return_predictions: Literal[False] = False,
            **options: Unpack[LinearOptions]) -> Tensor: ...
@overload
def iq_loss(hidden: Tensor, weight: Tensor, targets: Tensor, *, return_metrics: bool = False,
            return_predictions: bool = False,
            **options: Unpack[LinearOptions]) -> tuple[Tensor, Metrics]: ...
def iq_loss(hidden, weight, targets, *, return_metrics=False, return_predictions=False,
            **options):
    """IQ-Learn loss of a language model head, without materialising the logits.

    Args:
        hidden: (B, T, H) final hidden states (float32 / bfloat16 / float16 /
            float64), or (N, H) rows (see "Flattened rows" below).
        weight: (V, H) LM head weight (``lm_head.weight``; with tied embeddings the
            embedding matrix), same dtype and device as ``hidden`` (any float
            dtypes under ``torch.autocast``).
        targets: (B, T) (or (N,)) integer token ids, aligned: ``hidden[b, t]``
            predicts ``targets[b, t]`` (shift Hugging Face ``labels`` by one
            first); ``ignore_index`` marks prompt / padding rows.
        return_metrics: also return a dict of detached means over action rows:
            nll (the cross-entropy, for perplexity), td_penalty, reward, value,
            entropy, accuracy, z_loss.
        return_predictions: also return (in the same dict) ``predicted``, the
            argmax token of every action row (``ignore_index`` elsewhere), the
            targets' shape.

    With logits z_t = W h_t + b, soft value V_t = tau logsumexp(z_t / tau),
    target logit q_t = z_t[a_t], implicit reward r_t = q_t - gamma d_t V_{t+1}
    (d_t: row t+1 continues the same sequence) and action mask m_t, the default
    (offline chi^2) loss is

        L = sum_t m_t [ (V_t - q_t) + td_weight * r_t^2 ] / sum_t m_t

    (``td_weight=0``: the mean token cross-entropy; the default td_weight=0.1 is
    *not* on the cross-entropy scale: log ``metrics["nll"]`` for perplexity),
    and the general form of docs/objective.md with the options below.

    Precision: the GEMMs run in the inputs' dtype, or under ``torch.autocast``
    in its dtype (as ``F.linear`` would); every reduction and the weight
    gradient accumulate in float32 (float64 for float64 inputs).  The loss,
    per-token losses and metrics come back in float32 (float64); gradients in
    each input's own dtype.  An all-ignored batch gives 0 and zero gradients;
    non-finite hidden states give NaN.

    Flattened rows: with (N, H) input, the rows are one sequence only if you say
    so.  Whenever the options couple row t to row t+1 (td_weight > 0, and other
    variants: see docs/objective.md), (N, H) input needs ``position_ids`` or
    ``done``; cross-entropy (td_weight=0) does not.

    Returns:
        the loss (scalar, or the targets' shape for reduction="none"), or
        ``(loss, metrics)`` with ``return_metrics`` / ``return_predictions``.
    """
    call, is_traced = _call("linear", hidden, weight, targets, options,
                            allowed=_LINEAR, where="iq_loss()", metrics=return_metrics,
                            predictions=return_predictions)
    return _run(call, is_traced)


@overload
def iq_loss_from_logits(logits: Tensor, targets: Tensor, *,
                        return_metrics: Literal[False] = False,
                        return_predictions: Literal[False] = False,
                        **options: Unpack[LogitsOptions]) -> Tensor: ...
@overload
def iq_loss_from_logits(logits: Tensor, targets: Tensor, *, return_metrics: bool = False,
                        return_predictions: bool = False,
                        **options: Unpack[LogitsOptions]) -> tuple[Tensor, Metrics]: ...
def iq_loss_from_logits(logits, targets, *, return_metrics=False, return_predictions=False,
                        **options):
    """IQ-Learn loss from (B, T, V) (or (N, V)) logits; the same options, outputs
    and formula as :func:`iq_loss`.  Allocates no (B, T, V) tensor beyond the
    gradient itself."""
    call, is_traced = _call("logits", logits, None, targets, options, allowed=_LOGITS,
                            where="iq_loss_from_logits()", metrics=return_metrics,
                            predictions=return_predictions)
    return _run(call, is_traced)


@torch.no_grad()
def implicit_rewards(hidden: Tensor, weight: Tensor, targets: Tensor,
                     **options: Unpack[RewardOptions]) -> Tensor:
    """Per-token implicit rewards r_t = q_t - gamma d_t V_{t+1}: float32 (float64
    for float64 inputs), the targets' shape, 0 on non-action rows, no autograd
    graph.  Summed over a response (gamma = 1) they give tau log p(response |
    prompt) + V(prompt), so compare them within one prompt, with the gamma and
    temperature of training.

    The last action of every sequence has no next state: its reward is
    q_T = V_T + tau log p (about +V, large).  A sample cut at a length limit has
    not ended: pass ``done`` (True only at a real end) and set its last token's
    target to ``ignore_index``; every kept token then bootstraps from the state
    after it (docs/objective.md, "Reading rewards")."""
    call, is_traced = _call("rewards", hidden, weight, targets, options, allowed=_REWARDS,
                            where="implicit_rewards()", metrics=False, predictions=False)
    if is_traced:
        return traced.call(call)
    return compute(call).rewards()


_LINEAR = opts.names(LinearOptions)
_LOGITS = opts.names(LogitsOptions)
_REWARDS = opts.names(RewardOptions)

# What help() and inspect show: the options of the declaration, with their defaults.
_P = inspect.Parameter
_tensors = lambda *n: [_P(x, _P.POSITIONAL_OR_KEYWORD, annotation="Tensor") for x in n]  # noqa: E731
_flags = [_P("return_metrics", _P.KEYWORD_ONLY, default=False, annotation="bool"),
          _P("return_predictions", _P.KEYWORD_ONLY, default=False, annotation="bool")]
iq_loss.__signature__ = opts.signature(_tensors("hidden", "weight", "targets"), LinearOptions,
                                       _flags)
iq_loss_from_logits.__signature__ = opts.signature(_tensors("logits", "targets"), LogitsOptions,
                                                   _flags)
implicit_rewards.__signature__ = opts.signature(_tensors("hidden", "weight", "targets"),
                                                RewardOptions)
iq_loss.__doc__ += opts.options_table(LinearOptions)
iq_loss_from_logits.__doc__ += opts.options_table(LogitsOptions)
implicit_rewards.__doc__ += opts.options_table(RewardOptions)
