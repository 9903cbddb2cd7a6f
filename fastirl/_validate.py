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


def values(targets: torch.Tensor, vocab: int, ignore_index: int,
           position_ids: torch.Tensor | None) -> None:
    """Value checks of the (B, T) ids: targets in [0, vocab) or ignore_index, and
    position_ids >= 0.  One host read for both (a device sync on CUDA); callers
    skip it for meta / fake tensors, which hold no values."""
    bad_t = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    flags = [bad_t.any()]
    if position_ids is not None:
        flags.append((position_ids < 0).any())
    found = torch.stack(flags).tolist()
    if found[0]:
        value = targets[bad_t][0].item()
        raise ValueError(f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {value}")
    if len(found) > 1 and found[1]:
        value = position_ids[position_ids < 0][0].item()
        raise ValueError(f"position_ids must be >= 0 (a 0 starts a sequence); found {value}")


def hyper_tensor(name: str, value: torch.Tensor) -> torch.Tensor:
    """A hyper-parameter given as a tensor: 0-d, real, on the CPU (reading it is
    then no device sync).  Its value is checked where it is read."""
    if value.dim() != 0:
        raise ValueError(f"{name} must be a number or a 0-d tensor, got {_describe(value)}")
    if value.dtype == torch.bool or value.dtype.is_complex:
        raise TypeError(f"{name} must be a real number, got a tensor of dtype {value.dtype}")
    if value.device.type != "cpu":
        raise ValueError(f"{name} must be a number or a 0-d CPU tensor (reading a {value.device} "
                         f"tensor would synchronise the device), got {_describe(value)}")
    return value.detach()


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


def chunk_size(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {value!r}")


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
