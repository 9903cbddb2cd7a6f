"""Integrations with other libraries, loaded on first use.

``import fastirl`` never imports this package, and this package imports
``transformers`` only when one of its names is first looked up:

    from fastirl.integrations import IQTrainer, IQConfig, apply_fastirl

``global_num_items`` is :func:`fastirl.distributed.global_num_items` (it needs
no ``transformers``).
"""

from __future__ import annotations

import importlib

_TRANSFORMERS = ("IQConfig", "IQTrainer", "IQCausalLMOutput", "apply_fastirl", "unapply_fastirl",
                 "is_fastirl_applied", "set_loss_options", "extract_rewards")

__all__ = list(_TRANSFORMERS) + ["global_num_items"]


def __getattr__(name: str):
    if name == "global_num_items":
        from fastirl.distributed import global_num_items
        return global_num_items
    if name in _TRANSFORMERS:
        module = importlib.import_module(".transformers", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
