"""Hugging Face integration of fastirl (transformers, TRL, PEFT).

* :class:`IQConfig` / :class:`IQTrainer`: TRL's ``SFTConfig`` / ``SFTTrainer``
  training the IQ-Learn loss (switch from SFT by class names only).
* :func:`apply_fastirl` / :func:`unapply_fastirl`: patch a causal LM so that
  ``model(input_ids, labels=labels)`` returns the fused IQ-Learn loss with
  ``logits=None`` (``transformers.Trainer``, accelerate or any loop).  Anything
  that bypasses the patch in a training step (TRL's ``SFTTrainer`` and its own
  fused LM head, Liger's forward) raises a ``RuntimeError``.
* :func:`extract_rewards`: per-token implicit rewards of a model.
* :func:`global_num_items`: :func:`fastirl.distributed.global_num_items`, the
  ``num_items_in_batch`` of a custom distributed loop.

Modules, one job each: ``anatomy`` (where the head, backbone and config are),
``head`` (the LM head as the loss reads it), ``batch`` (HF labels -> aligned
rows), ``state`` (what a patched model holds), ``forward`` (the patched
forward and the loss call), ``guard`` (never silent), ``patch`` (apply /
unapply), ``rewards``, ``config`` and ``trainer`` (TRL).
"""

from fastirl.distributed import global_num_items

from .batch import shift_labels
from .config import IQConfig
from .forward import IQCausalLMOutput
from .patch import (apply_fastirl, fastirl_options, is_fastirl_applied, set_loss_options,
                    unapply_fastirl)
from .rewards import extract_rewards
from .trainer import IQTrainer, mix_batches

__all__ = ["IQConfig", "IQTrainer", "IQCausalLMOutput", "apply_fastirl", "unapply_fastirl",
           "is_fastirl_applied", "fastirl_options", "set_loss_options", "extract_rewards",
           "global_num_items", "shift_labels", "mix_batches"]
