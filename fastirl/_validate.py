"""Argument checks with messages that name the argument and what was expected."""

from __future__ import annotations

import math

import torch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(name: str, t, *, ndim: tuple[int, ...] | int | None = None, floating=False,
           integer=False, boolean=False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (token ids), got {t.dtype}")
    if boolean and t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {t.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions, "
                             f"got {_describe(t)}")
    return t


def same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                             f"move them to the same device")


def shape(name: str, t: torch.Tensor | None, expected: tuple[int, ...], what: str) -> None:
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {_describe(t)}")


def targets_and_positions(targets: torch.Tensor, vocab: int, ignore_index: int,
                          position_ids: torch.Tensor | None,
                          extra: torch.Tensor | None = None) -> bool:
    """Value checks of the (B, T) ids: targets in [0, vocab) or ignore_index, and
    position_ids >= 0.  One host read (a device sync on CUDA) for both flags
    and for ``extra`` (a bool the caller needs anyway); returns ``extra``.
    Callers skip it for meta / fake tensors, which hold no values."""
    bad_t = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    flags = [bad_t.any(), torch.zeros((), dtype=torch.bool, device=targets.device)
             if position_ids is None else (position_ids < 0).any()]
    if extra is not None:
        flags.append(extra.to(targets.device).reshape(()))
    found = torch.stack(flags).tolist()
    if found[0]:
        value = targets[bad_t][0].item()
        raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {value}")
    if found[1]:
        value = position_ids[position_ids < 0][0].item()
        raise ValueError(f"position_ids must be >= 0 (a 0 starts a sequence); found {value}")
    return bool(found[2]) if extra is not None else False


def batch(main_name: str, main: torch.Tensor, targets, position_ids, done, is_expert) -> None:
    """Types and shapes of targets and the sequence tensors (no values)."""
    tensor("targets", targets, ndim=(1, 2), integer=True)
    lead = tuple(main.shape[:-1])
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets must have shape {lead} (the leading dimensions of "
                         f"{main_name}), got shape {tuple(targets.shape)}")
    same_device(main_name, main, targets=targets, position_ids=position_ids, done=done,
                is_expert=is_expert)
    if position_ids is not None:
        tensor("position_ids", position_ids, integer=True)
        shape("position_ids", position_ids, lead, "one position per target")
    if done is not None:
        tensor("done", done, boolean=True)
        shape("done", done, lead, "one flag per target")
    if is_expert is not None:
        tensor("is_expert", is_expert, boolean=True)
        shape("is_expert", is_expert, (1,) if targets.dim() == 1 else lead[:1],
              "one flag per sequence")


def linear(hidden, weight, bias, *, mixed_ok: bool = False) -> None:
    """Types and shapes of the LM-head inputs (no values); ``mixed_ok``: under
    autocast, which casts them to one dtype."""
    tensor("hidden", hidden, ndim=(2, 3), floating=True)
    tensor("weight", weight, ndim=2, floating=True)
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape (vocab, {H}) to match hidden's last dimension "
                         f"{H}, got shape {tuple(weight.shape)}")
    same_device("hidden", hidden, weight=weight, bias=bias)
    if weight.dtype != hidden.dtype and not mixed_ok:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype} "
                        f"(or run under torch.autocast)")
    if bias is not None:
        tensor("bias", bias, ndim=1, floating=True)
        shape("bias", bias, (weight.shape[0],), "one per vocabulary entry")
        if bias.dtype != hidden.dtype and not mixed_ok:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")


def class_weights(ce_weight, vocab: int | None, device: torch.device) -> None:
    """``ce_weight``: a (vocab,) float tensor on the inputs' device (``vocab``
    None: a length checked elsewhere)."""
    if ce_weight is None:
        return
    tensor("ce_weight", ce_weight, ndim=1, floating=True)
    if vocab is not None:
        shape("ce_weight", ce_weight, (vocab,), "one weight per vocabulary entry")
    if ce_weight.device != device:
        raise ValueError(f"ce_weight is on {ce_weight.device} but the inputs are on {device}; "
                         f"move them to the same device")


def sequences(targets: torch.Tensor, position_ids, done, *, coupling: str | None) -> None:
    """Flattened (N,) rows with a term that couples row t to row t+1 (``coupling``
    says which) must say where sequences start: reading every row as one
    sequence would bootstrap the last token of each sequence from the first of
    the next."""
    if targets.dim() == 1 and coupling and position_ids is None and done is None \
            and targets.shape[0] > 1:
        raise ValueError(
            f"flattened (N,) targets with {coupling}: each row's loss reads the next row's "
            f"value V_{{t+1}}, so fastirl needs to know where sequences end: pass (B, T) "
            f"batches, or position_ids (a 0 starts a sequence; position_ids=torch.arange(N) for one "
            f"sequence), or done. (Cross-entropy, td_weight=0, reads rows independently and "
            f"needs neither.)")


def num_items(value, *, read: bool = True) -> torch.Tensor | float | None:
    """``num_items_in_batch``: a positive count.  With ``read=False`` (meta / fake
    tensors, traced calls) a tensor's value is not read."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got {_describe(value)}")
        if value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"num_items_in_batch must be a real count, got dtype {value.dtype}")
        if not read:
            return value
        v = float(value.item())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    else:
        raise TypeError(f"num_items_in_batch must be a number or a scalar tensor, "
                        f"got {type(value).__name__}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"num_items_in_batch must be a positive finite count, got {v}")
    return value


# One spelling of dtypes for every command-line tool: torch's names, with the
# short forms accepted as synonyms.
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32",
               "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16", "half": "float16"}
CLI_DTYPES = ("float32", "bfloat16", "float16")


def dtype_arg(text: str) -> str:
    """argparse ``type=`` for a dtype: returns "float32", "bfloat16" or "float16";
    a bad value is refused by argparse before any work starts."""
    import argparse

    name = DTYPE_NAMES.get(str(text).strip().lower().removeprefix("torch."))
    if name is None:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(CLI_DTYPES)}; "
            f"or bf16, fp16, fp32)")
    return name


def positive_int(text: str) -> int:
    """argparse ``type=`` for a count >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected an integer >= 1")
    return value
