"""Hugging Face ``transformers`` integration of fastirl.

* :func:`apply_fastirl` / :func:`unapply_fastirl`: patch a causal LM so that
  ``model(input_ids, labels=labels)`` returns the fused IQ-Learn loss with
  ``logits=None`` (works with ``Trainer``, TRL's ``SFTTrainer``, any loop).
* :class:`IQConfig` / :class:`IQTrainer`: a ``Trainer`` for offline and online
  IQ-Learn with metric logging.
* :func:`extract_rewards`: per-token implicit rewards of a model.
* :func:`global_num_items`: the token count over all ranks, for loss
  normalisation in custom distributed loops.
"""

from .config import IQConfig
from .patch import (IQCausalLMOutput, apply_fastirl, extract_rewards, fastirl_options,
                    global_num_items, is_fastirl_applied, shift_labels, unapply_fastirl)
from .trainer import IQTrainer, mix_batches

__all__ = ["IQConfig", "IQTrainer", "IQCausalLMOutput", "apply_fastirl", "unapply_fastirl",
           "is_fastirl_applied", "fastirl_options", "extract_rewards", "global_num_items",
           "shift_labels", "mix_batches"]
