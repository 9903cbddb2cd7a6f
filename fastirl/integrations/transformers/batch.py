"""Hugging Face batches -> the loss's aligned rows.

HF ``labels`` and ``done`` are token-aligned (the label of token t sits at t);
``fastirl`` reads rows: hidden state t predicts token t+1.  With
``position_ids`` (packed sequences) a 0 starts a sequence, and the row before
it predicts nothing."""

from __future__ import annotations

import torch

from fastirl import options as fo

__all__ = ["shift_labels", "targets", "shift_done", "positive_count", "to_device",
           "IGNORE_INDEX"]

IGNORE_INDEX = fo.OPTIONS["ignore_index"].default


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """HF ``labels`` (token-aligned) -> aligned targets: ``targets[:, t] = labels[:, t+1]``,
    last column ``ignore_index`` (hidden state t predicts token t+1)."""
    out = torch.full_like(labels, ignore_index)
    out[..., :-1] = labels[..., 1:]
    return out


def targets(labels, shifted, position_ids, ignore_index: int) -> torch.Tensor:
    """The aligned targets of a batch: ``shifted`` (already aligned, e.g. a
    collator's ``shift_labels``) or the shifted ``labels``; in a packed batch the
    row before each sequence start is masked."""
    if shifted is not None:
        out = shifted
    elif labels is not None:
        out = shift_labels(labels, ignore_index)
    else:
        raise ValueError("labels or shift_labels is required for the IQ loss")
    if position_ids is not None and out.dim() == 2 and out.shape[1] > 1:
        # Masked unconditionally: testing for starts first would be a host sync.
        starts = position_ids[:, 1:] == 0
        out = out.clone()
        out[:, :-1] = out[:, :-1].masked_fill(starts, ignore_index)
    return out


def shift_done(done):
    """Token-aligned ``done`` (token t is a terminal action) -> row flags."""
    if done is None:
        return None
    done = done.bool()
    rows = torch.zeros_like(done)
    rows[:, :-1] = done[:, 1:]
    return rows


def positive_count(num_items):
    """``num_items_in_batch`` as the loss takes it: a count of 0 (no action
    anywhere: the loss is 0 anyway) becomes 1; any positive value, also the
    fractional ``global count / world size`` of
    :func:`fastirl.distributed.global_num_items`, is kept.  No host read."""
    if num_items is None:
        return None
    if torch.is_tensor(num_items):
        return torch.where(num_items > 0, num_items, torch.ones_like(num_items))
    return num_items if num_items > 0 else 1


def to_device(device: torch.device, *tensors):
    """``tensors`` on ``device`` (anything else as it is): a model split across devices."""
    return tuple(t.to(device) if torch.is_tensor(t) else t for t in tensors)
