"""Integrations with other libraries, loaded on first use.

``import fastirl`` never imports this package, and this package imports
``transformers`` only when one of its names is first looked up:

    from fastirl.integrations import IQTrainer, IQConfig, apply_fastirl
"""

from __future__ import annotations

import importlib

_TRANSFORMERS = ("IQConfig", "IQTrainer", "IQCausalLMOutput", "apply_fastirl", "unapply_fastirl",
                 "is_fastirl_applied", "set_loss_options", "extract_rewards", "global_num_items")

__all__ = list(_TRANSFORMERS)


def __getattr__(name: str):
    if name in _TRANSFORMERS:
        module = importlib.import_module(".transformers", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
