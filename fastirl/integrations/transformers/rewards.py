"""``extract_rewards``: per-token implicit rewards of a causal LM, through the
same head path as the loss (:mod:`.head`): a LoRA adapter on ``lm_head``
counts, a sharded head is gathered by its framework's hooks."""

from __future__ import annotations

import torch
from torch import nn

import fastirl as _fastirl
from fastirl import options as fo

from . import batch as _batch
from .anatomy import config_softcap, hidden_scale, hidden_states, lm_head, unwrap
from .head import call_as, head_device, needs_module_call, through_head
from .state import state_of

__all__ = ["extract_rewards"]

# Options of fastirl.implicit_rewards that a patched model holds (not per-call tensors).
_REWARD_OPTIONS = tuple(n for n in fo.names(fo.RewardOptions) if n not in fo.PER_CALL_NAMES)


def _options(model: nn.Module, given: dict) -> dict:
    """The patch's reward options (its gamma, temperature, softcap, backend...),
    else the config's soft cap; ``given`` values (not None) override them."""
    state = state_of(model, active=True)
    options = {} if state is None else {k: v for k, v in state.options.items()
                                        if k in _REWARD_OPTIONS}
    if options.get("softcap") is None:
        options["softcap"] = config_softcap(model)
    options.update({k: v for k, v in given.items() if v is not None})
    return options


@torch.no_grad()
def extract_rewards(model: nn.Module, batch: dict, *, gamma: float | None = None,
                    temperature: float | None = None, softcap: float | None = None,
                    ignore_index: int | None = None) -> torch.Tensor:
    """Per-token implicit rewards r_t = Q(s_t, a_t) - gamma d_t V(s_{t+1}) of a causal LM.

    ``batch``: ``input_ids`` (B, T) and optionally ``attention_mask``, ``labels``
    (default: input_ids with padding ignored), ``position_ids`` (packed), ``done``.
    Returns float32 (B, T) aligned with ``input_ids``: ``rewards[b, t]`` is the
    reward of emitting token ``input_ids[b, t]`` (0 at t = 0 and where the label
    is ignored).  gamma / temperature / softcap / ignore_index default to the
    options of :func:`apply_fastirl` if the model is patched, else to the
    defaults of :func:`fastirl.implicit_rewards` and the config's
    ``final_logit_softcapping``.  The model runs in eval mode (no dropout, also
    none in a LoRA adapter), its LM head as the loss reads it: PEFT LoRA on
    ``lm_head`` included, a head sharded by FSDP2 or ZeRO-3 gathered by the
    framework.  Never builds the logits.
    """
    target = unwrap(model)
    head = lm_head(target)
    options = _options(target, dict(gamma=gamma, temperature=temperature, softcap=softcap,
                                     ignore_index=ignore_index))
    ignore = options.get("ignore_index", _batch.IGNORE_INDEX)
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids if attention_mask is None else \
            input_ids.masked_fill(attention_mask == 0, ignore)
    position_ids = batch.get("position_ids")
    inputs = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    targets = _batch.targets(labels, None, position_ids, ignore)
    done = _batch.shift_done(batch.get("done"))
    scale = hidden_scale(target)

    def rewards(**inputs):
        hidden, _ = hidden_states(target, inputs)
        hidden, rows, pos, done_rows = _batch.to_device(head_device(head), hidden, targets,
                                                        position_ids, done)
        return through_head(head, hidden, lambda h, w, b: _fastirl.implicit_rewards(
            h, w, rows, bias=b, position_ids=pos, done=done_rows, **options), scale=scale)

    was_training = target.training
    target.eval()
    try:
        # An FSDP2 root unit gathers its own parameters (embeddings, a head in the
        # root) only in its forward: run the rewards as it.
        rows = call_as(target, rewards, **inputs) if needs_module_call(target) else \
            rewards(**inputs)
    finally:
        target.train(was_training)
    out = torch.zeros_like(rows)
    out[:, 1:] = rows[:, :-1]
    return out
