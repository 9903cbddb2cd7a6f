"""fastirl: IQ-Learn (inverse soft-Q) losses for language models, without logits.

    import fastirl
    loss = fastirl.iq_loss(hidden, lm_head.weight, targets)

See ``docs/objective.md`` for the mathematics and :func:`iq_loss`
for the options.
"""

from . import reference
from .backends import available_backends
from .engine import PRESETS
from .functional import implicit_rewards, iq_loss, iq_loss_from_logits
from .modules import IQLoss, LinearIQLoss
from .options import DIVERGENCES

__version__ = "0.1.0"

__all__ = ["iq_loss", "iq_loss_from_logits", "implicit_rewards", "IQLoss", "LinearIQLoss",
           "reference", "available_backends", "PRESETS", "DIVERGENCES", "__version__"]
