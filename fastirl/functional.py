"""The public functional API."""

from __future__ import annotations

from typing import Literal

import torch
from torch._subclasses.fake_tensor import is_fake

from . import _validate as check
from . import engine
from . import traced as fused_op
from .backends import BACKENDS
from .backends.base import acc_dtype
from .objective import IQOptions, metrics, plan_rows

__all__ = ["iq_loss", "iq_loss_from_logits", "implicit_rewards"]

Divergence = Literal["chi2", "total_variation", "hellinger", "js", "kl", "kl_fix"]
Reduction = Literal["mean", "sum", "none"]
Scalar = float | torch.Tensor       # a Python number or a 0-d CPU tensor

OPTIONS_DOC = """
    Keyword options (shared by every entry point):
        gamma (float in [0, 1]): discount of the next-state value. Default 1.
            gamma, td_weight, temperature and softcap take a Python number or a
            0-d CPU tensor (e.g. from a schedule; read without a device sync).
        td_weight (float >= 0): lambda, weight of the TD regulariser r^2.
            0 with temperature 1 is exactly the mean token cross-entropy. Default 0.1.
        temperature (float > 0): tau; V = tau * logsumexp(z / tau). Default 1.
        ignore_index (int): target value of rows that are not actions. Default -100.
        reduction ("mean" | "sum" | "none"): "none" returns l_t of shape (B, T)
            (0 on non-action rows, weights not normalised).
        position_ids ((B, T) int >= 0, optional): packed sequences; a 0 starts a sequence.
        done ((B, T) bool, optional): explicit terminal actions; then row t+1 of
            the same sequence is bootstrapped from whenever not done_t.
        is_expert ((B,) bool, optional): online mode; expert sequences vs samples.
        divergence: "chi2" (default), "total_variation", "hellinger", "js", "kl", "kl_fix".
        value_term ("value_expert" | "value" | "v0", optional): the value term
            (default "value_expert" offline, "value" online).
        td_rows ("expert" | "all"): rows of the TD regulariser (IQ-Learn "chi" vs
            "regularize"). Default "expert".
        detach_next_value (bool): stop the gradient through V_{t+1}. Default False.
        softcap (float > 0, optional): z <- c * tanh(z / c) before everything.
        num_items_in_batch (int or scalar tensor, optional): replaces the
            normalisers N (N_all and N_E) of reduction="mean", e.g. the token
            count of a whole gradient-accumulation step.
        return_metrics (bool): also return a dict of detached means over action
            rows: nll, td_penalty, reward, value, entropy, accuracy.
        backend ("auto" | "torch" | "triton" | "cpu" | "cuda", or an object
            implementing :class:`fastirl.backends.base.Backend`): compute backend.
        preset ("default" | "fast" | "highest"): precision/speed trade-off:
            "default" GEMMs in the input dtype with float32 accumulation and
            deterministic gradients; "fast" allows atomics; "highest" runs the
            GEMMs on float32 copies of bf16/fp16 inputs.
        chunk_size (int, optional): rows per chunk (default: from a memory budget).
        process_group (iq_loss only, optional): vocabulary parallelism; ``weight``
            (and ``bias``) are this rank's contiguous vocabulary shard, ``targets``
            global ids; see :mod:`fastirl.distributed`.
"""


def _traced(backend, *tensors) -> bool:
    """Whether a call takes the traced path (:mod:`fastirl.traced`): under
    torch.compile, or with meta / fake tensors, which hold no values to check."""
    if not isinstance(backend, str):
        return False            # backend objects run eagerly (the engine calls them)
    if torch.compiler.is_compiling():
        return True
    return any(isinstance(t, torch.Tensor) and (t.device.type == "meta" or is_fake(t))
               for t in tensors)


def _options(gamma, td_weight, temperature, ignore_index, reduction, divergence, softcap,
             value_term, td_rows, detach_next_value, backend, preset, chunk_size, *,
             traced: bool = False) -> IQOptions:
    if not isinstance(backend, str):
        if not all(hasattr(backend, a) for a in ("forward", "backward", "rows_per_chunk")):
            raise TypeError(f"backend must be a backend name or an object implementing "
                            f"fastirl.backends.base.Backend, got {type(backend).__name__}")
    elif backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    if preset not in engine.PRESETS:
        raise ValueError(f"preset must be one of {sorted(engine.PRESETS)}, got {preset!r}")
    check.chunk_size(chunk_size)
    hyper = dict(gamma=gamma, td_weight=td_weight, temperature=temperature, softcap=softcap)
    for name, value in hyper.items():
        if isinstance(value, torch.Tensor):
            value = check.hyper_tensor(name, value)
            # A 0-d CPU tensor: read now (no device sync) and checked as a number
            # by IQOptions, or, on the traced path, checked when the fused op runs.
            hyper[name] = value if traced else value.item()
    return IQOptions(ignore_index=ignore_index, reduction=reduction, divergence=divergence,
                     value_term=value_term, td_rows=td_rows,
                     detach_next_value=bool(detach_next_value), **hyper)


_DEFAULTS = dict(gamma=1.0, td_weight=0.1, temperature=1.0, ignore_index=-100, reduction="mean",
                 divergence="chi2", softcap=None, value_term=None, td_rows="expert",
                 detach_next_value=False, backend="auto", preset="default", chunk_size=None)


def check_options(**options) -> None:
    """Validates keyword options of the loss functions (used by the modules)."""
    _options(**{name: options.get(name, default) for name, default in _DEFAULTS.items()})


def _batch(main_name, main, targets, position_ids, done, is_expert):
    """Checks the types and shapes of targets and the sequence tensors (no values)."""
    check.tensor("targets", targets, ndim=(1, 2), integer=True)
    lead = tuple(main.shape[:-1])
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets must have shape {lead} (the leading dimensions of "
                         f"{main_name}), got shape {tuple(targets.shape)}")
    check.same_device(main_name, main, targets=targets, position_ids=position_ids, done=done,
                      is_expert=is_expert)
    if position_ids is not None:
        check.tensor("position_ids", position_ids, integer=True)
        check.shape("position_ids", position_ids, lead, "one position per target")
    if done is not None:
        check.tensor("done", done, boolean=True)
        check.shape("done", done, lead, "one flag per target")
    if is_expert is not None:
        check.tensor("is_expert", is_expert, boolean=True)
        check.shape("is_expert", is_expert, (1,) if targets.dim() == 1 else lead[:1],
                    "one flag per sequence")


def _linear(hidden, weight, bias) -> None:
    """Checks the types and shapes of the LM-head inputs (no values)."""
    check.tensor("hidden", hidden, ndim=(2, 3), floating=True)
    check.tensor("weight", weight, ndim=2, floating=True)
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape (vocab, {H}) to match hidden's last dimension "
                         f"{H}, got shape {tuple(weight.shape)}")
    check.same_device("hidden", hidden, weight=weight, bias=bias)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None:
        check.tensor("bias", bias, ndim=1, floating=True)
        check.shape("bias", bias, (weight.shape[0],), "one per vocabulary entry")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")


def compute(entry: str, main, weight, bias, targets, position_ids, done, is_expert, num_items,
            opts: IQOptions, *, backend, preset: str, chunk_size, want_metrics: bool,
            vocab: int | None = None):
    """The part of every entry point that reads values, after the type and shape
    checks: value checks (targets in range, position_ids >= 0, the count), the
    row plan and the engine.  ``entry``: "linear" (main = hidden) or "logits".
    Returns the loss (scalar, or (B, T) / (N,) for reduction="none"), the per-row
    tensors of the engine, the plan and whether the batch was flat."""
    flat = targets.dim() == 1
    if flat:
        row = lambda t: None if t is None else t.unsqueeze(0)  # noqa: E731
        targets, position_ids, done = row(targets), row(position_ids), row(done)
    targets = targets.long()
    if vocab is None:
        vocab = main.shape[-1] if entry == "logits" else weight.shape[0]
    check.values(targets, vocab, opts.ignore_index, position_ids)
    plan = plan_rows(targets, opts, position_ids=position_ids, done=done, is_expert=is_expert,
                     num_items_in_batch=check.num_items(num_items), dtype=acc_dtype(main.dtype))
    run = dict(backend=backend, preset=engine.PRESETS[preset], chunk_size=chunk_size,
               want_metrics=want_metrics)
    if entry == "logits":
        loss, rows = engine.run_logits(main.reshape(-1, main.shape[-1]), plan, opts, **run)
    else:
        loss, rows = engine.run_linear(main.reshape(-1, main.shape[-1]), weight, bias, plan,
                                       opts, **run)
    if opts.reduction == "none":
        loss = plan.scatter(loss)
        loss = loss.squeeze(0) if flat else loss
    return loss, rows, plan, flat


def row_metrics(rows, plan, opts) -> dict[str, torch.Tensor]:
    return metrics(rows["target_logit"], rows["value"], rows["reward"], rows["entropy"],
                   rows["argmax"], plan, opts)


def rewards(rows, plan, flat) -> torch.Tensor:
    """Implicit rewards of the action rows, (B, T) (or (N,)), 0 elsewhere."""
    r = rows["reward"]
    r = plan.scatter(torch.where(plan.action, r, torch.zeros_like(r)))
    return r.squeeze(0) if flat else r


def _loss(entry, traced, main, weight, bias, targets, position_ids, done, is_expert,
          num_items_in_batch, opts, *, backend, preset, chunk_size, return_metrics, vocab=None):
    """After the type and shape checks: the loss through the op of the traced path
    or through :func:`compute`."""
    num = check.num_items(num_items_in_batch, read=not traced)
    if traced:
        return fused_op.call(entry, main, weight, bias, targets, position_ids, done, is_expert,
                             num, opts, backend=backend, preset=preset, chunk_size=chunk_size,
                             return_metrics=return_metrics)
    loss, rows, plan, _ = compute(entry, main, weight, bias, targets, position_ids, done,
                                  is_expert, num, opts, backend=backend, preset=preset,
                                  chunk_size=chunk_size, want_metrics=return_metrics,
                                  vocab=vocab)
    return (loss, row_metrics(rows, plan, opts)) if return_metrics else loss


def iq_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
            bias: torch.Tensor | None = None, gamma: Scalar = 1.0, td_weight: Scalar = 0.1,
            temperature: Scalar = 1.0, ignore_index: int = -100, reduction: Reduction = "mean",
            position_ids: torch.Tensor | None = None, done: torch.Tensor | None = None,
            is_expert: torch.Tensor | None = None, divergence: Divergence = "chi2",
            softcap: Scalar | None = None, num_items_in_batch: int | torch.Tensor | None = None,
            value_term: str | None = None, td_rows: str = "expert",
            detach_next_value: bool = False, return_metrics: bool = False,
            backend: str = "auto", preset: str = "default", chunk_size: int | None = None,
            process_group=None):
    """IQ-Learn loss of a language model head, without materialising the logits.

    Args:
        hidden: (B, T, H) (or (N, H)) float32 / bfloat16 / float16 final hidden states.
        weight: (V, H) LM head weight, same dtype and device as ``hidden``.
        targets: (B, T) (or (N,)) integer token ids, aligned: ``hidden[b, t]``
            predicts ``targets[b, t]`` (shift HF ``labels`` by one first).
        bias: optional (V,) LM head bias.

    With logits z_t = W h_t + b, Q-values z, soft value V_t = tau logsumexp(z_t/tau),
    q_t = z_t[a_t], implicit reward r_t = q_t - gamma d_t V_{t+1} (d_t: row t+1
    continues the same sequence) and action mask m_t, the default (offline
    chi^2) loss is

        L = sum_t m_t [ (V_t - q_t) + td_weight * r_t^2 ] / sum_t m_t

    and the general IQ-Learn form of ``docs/objective.md`` with the
    options below.  Reductions and weight gradients accumulate in float32; the
    loss and gradients come back in the input dtype.  All-ignored batches give
    0 with zero gradients; non-finite hidden values give NaN.

    Returns:
        the loss (scalar, or (B, T) for reduction="none"), or ``(loss, metrics)``
        with ``return_metrics=True``.
    """
    traced = process_group is None and _traced(backend, hidden, weight, bias, targets)
    opts = _options(gamma, td_weight, temperature, ignore_index, reduction, divergence, softcap,
                    value_term, td_rows, detach_next_value, backend, preset, chunk_size,
                    traced=traced)
    vocab = None
    if process_group is not None:   # weight / bias are this rank's vocabulary shard
        from .distributed import vocab_parallel
        backend, vocab = vocab_parallel(process_group, weight, backend, batch=dict(
            hidden=hidden, targets=targets, position_ids=position_ids, done=done,
            is_expert=is_expert, num_items_in_batch=num_items_in_batch))
    _linear(hidden, weight, bias)
    _batch("hidden", hidden, targets, position_ids, done, is_expert)
    return _loss("linear", traced, hidden, weight, bias, targets, position_ids, done, is_expert,
                 num_items_in_batch, opts, backend=backend, preset=preset, chunk_size=chunk_size,
                 return_metrics=return_metrics, vocab=vocab)


def iq_loss_from_logits(logits: torch.Tensor, targets: torch.Tensor, *, gamma: Scalar = 1.0,
                        td_weight: Scalar = 0.1, temperature: Scalar = 1.0,
                        ignore_index: int = -100, reduction: Reduction = "mean",
                        position_ids: torch.Tensor | None = None,
                        done: torch.Tensor | None = None, is_expert: torch.Tensor | None = None,
                        divergence: Divergence = "chi2", softcap: Scalar | None = None,
                        num_items_in_batch: int | torch.Tensor | None = None,
                        value_term: str | None = None, td_rows: str = "expert",
                        detach_next_value: bool = False, return_metrics: bool = False,
                        backend: str = "auto", preset: str = "default",
                        chunk_size: int | None = None):
    """IQ-Learn loss from (B, T, V) (or (N, V)) logits; same options and formula as
    :func:`iq_loss`.  Allocates no (B, T, V) tensor beyond the gradient itself."""
    traced = _traced(backend, logits, targets)
    opts = _options(gamma, td_weight, temperature, ignore_index, reduction, divergence, softcap,
                    value_term, td_rows, detach_next_value, backend, preset, chunk_size,
                    traced=traced)
    check.tensor("logits", logits, ndim=(2, 3), floating=True)
    _batch("logits", logits, targets, position_ids, done, is_expert)
    return _loss("logits", traced, logits, None, None, targets, position_ids, done, is_expert,
                 num_items_in_batch, opts, backend=backend, preset=preset, chunk_size=chunk_size,
                 return_metrics=return_metrics)


@torch.no_grad()
def implicit_rewards(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                     bias: torch.Tensor | None = None, gamma: Scalar = 1.0,
                     temperature: Scalar = 1.0, ignore_index: int = -100,
                     position_ids: torch.Tensor | None = None, done: torch.Tensor | None = None,
                     softcap: Scalar | None = None, backend: str = "auto",
                     preset: str = "default", chunk_size: int | None = None) -> torch.Tensor:
    """Per-token implicit rewards r_t = q_t - gamma d_t V_{t+1} (float32, shape of
    ``targets``, 0 on non-action rows), without an autograd graph.  Summed over a
    response (gamma = 1) they give tau * log p(response | prompt) + V_0."""
    traced = _traced(backend, hidden, weight, bias, targets)
    opts = _options(gamma, 0.0, temperature, ignore_index, "none", "chi2", softcap, None,
                    "expert", False, backend, preset, chunk_size, traced=traced)
    _linear(hidden, weight, bias)
    _batch("hidden", hidden, targets, position_ids, done, None)
    if traced:
        return fused_op.call("rewards", hidden, weight, bias, targets, position_ids, done, None,
                             None, opts, backend=backend, preset=preset, chunk_size=chunk_size,
                             return_metrics=False)
    _, rows, plan, flat = compute("linear", hidden, weight, bias, targets, position_ids, done,
                                  None, None, opts, backend=backend, preset=preset,
                                  chunk_size=chunk_size, want_metrics=False)
    return rewards(rows, plan, flat)


iq_loss.__doc__ += OPTIONS_DOC
iq_loss_from_logits.__doc__ += OPTIONS_DOC
