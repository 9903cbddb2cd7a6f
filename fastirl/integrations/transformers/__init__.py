"""Hugging Face integration of fastirl (transformers, TRL, PEFT).

* :class:`IQConfig` / :class:`IQTrainer`: TRL's ``SFTConfig`` / ``SFTTrainer``
  training the IQ-Learn loss (switch from SFT by class names only).
* :func:`apply_fastirl` / :func:`unapply_fastirl`: patch a causal LM so that
  ``model(input_ids, labels=labels)`` returns the fused IQ-Learn loss with
  ``logits=None`` (``transformers.Trainer``, accelerate or any loop).  Anything
  that bypasses the patch in a training step (TRL's ``SFTTrainer`` and its own
  fused LM head, Liger's forward) raises a ``RuntimeError``.
* :func:`extract_rewards`: per-token implicit rewards of a model.
* :func:`global_num_items`: the token count over all ranks, for loss
  normalisation in custom distributed loops.
"""

from .config import IQConfig
from .patch import (IQCausalLMOutput, apply_fastirl, extract_rewards, fastirl_options,
                    global_num_items, is_fastirl_applied, set_loss_options, shift_labels,
                    unapply_fastirl)
from .trainer import IQTrainer, mix_batches

__all__ = ["IQConfig", "IQTrainer", "IQCausalLMOutput", "apply_fastirl", "unapply_fastirl",
           "is_fastirl_applied", "fastirl_options", "set_loss_options", "extract_rewards",
           "global_num_items", "shift_labels", "mix_batches"]
