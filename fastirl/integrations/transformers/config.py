"""``IQConfig``: TRL's ``SFTConfig`` with the IQ-Learn options."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from trl import SFTConfig

from fastirl import options as fo

__all__ = ["IQConfig"]


def _field_type(opt: fo.Option):
    """A type HfArgumentParser parses: numbers that may be tensors become floats,
    byte budgets (memory) a string; choices stay Literals."""
    optional = fo._allows(opt.type, type(None))
    if opt.choices and fo._allows(opt.type, int):
        tp = str                        # "balanced" or a byte count, converted in loss_options
    elif opt.choices:
        tp = typing.Literal[opt.choices]
    elif opt.scalar or fo._allows(opt.type, float):
        tp = float
    elif fo._allows(opt.type, bool):
        tp = bool
    elif fo._allows(opt.type, int):
        tp = int
    else:
        tp = str
    return typing.Optional[tp] if optional else tp


# name of the IQConfig field -> the loss option it sets
CONFIG_FIELDS = {(o.spec.config or o.name): o.name for o in
                 (fo.OPTIONS[n] for n in fo.names(fo.ModuleOptions))
                 if o.spec.config is not None}


def _loss_fields(cls):
    """Adds one dataclass field per loss option of the declaration (before
    ``@dataclass`` reads the class)."""
    for field_name, name in CONFIG_FIELDS.items():
        opt = fo.OPTIONS[name]
        meta = {"help": opt.spec.doc}
        if opt.choices:
            meta["choices"] = list(opt.choices)
        cls.__annotations__[field_name] = _field_type(opt)
        setattr(cls, field_name, field(default=opt.default, metadata=meta))
    return cls


@dataclass
@_loss_fields
class IQConfig(SFTConfig):
    r"""Training arguments of :class:`IQTrainer`: every field of TRL's ``SFTConfig``
    (datasets, chat templates, ``completion_only_loss``, ``assistant_only_loss``,
    ``packing``, ``padding_free``, ``model_init_kwargs``, and all of
    ``transformers.TrainingArguments``) plus every option of the loss (one field
    per option of :mod:`fastirl.options`: gamma, td_weight, temperature,
    divergence, ..., and ``loss_backend``, ``loss_preset``, ``loss_chunk_size``,
    ``loss_memory`` for the run options; the objective is described in
    docs/objective.md).

    With ``td_weight=0`` and ``temperature=1`` the loss is the usual token
    cross-entropy (MLE); ``label_smoothing_factor`` (TrainingArguments') sets
    ``label_smoothing``.  ``online_mix > 0`` switches to online IQ-Learn: every
    ``online_every`` optimizer steps completions are sampled from the current
    policy for the batch's prompts and mixed in as non-expert sequences.
    ``loss_type`` must stay TRL's NLL (the IQ loss replaces it).
    """

    # ---- training schedule of the loss
    td_weight_warmup_steps: int = field(
        default=0,
        metadata={"help": "Raise the TD weight linearly from 0 to `td_weight` over this many "
                          "optimizer steps (0: no warm-up)."})
    # ---- implementation
    fused_loss: bool = field(
        default=True,
        metadata={"help": "Compute the loss fused with the LM head (no logits). False builds the "
                          "logits and uses the naive reference loss (debugging, benchmarks)."})
    eval_logits: bool = field(
        default=False,
        metadata={"help": "Return the (tokens x vocab) logits from evaluation and prediction, for "
                          "`compute_metrics` and `predict()`. Off by default: they cost the memory "
                          "the fused loss saves."})
    # ---- online IQ-Learn
    online_mix: float = field(
        default=0.0,
        metadata={"help": "Sampled (non-expert) sequences per expert sequence of a batch; 0 is "
                          "offline IQ-Learn. E.g. 0.5 samples completions for half of the "
                          "batch's prompts."})
    online_every: int = field(
        default=1,
        metadata={"help": "Sample new completions every this many optimizer steps; in between the "
                          "latest samples are replayed."})
    max_new_tokens: int = field(
        default=64, metadata={"help": "Maximum length of a sampled completion."})
    online_temperature: float | None = field(
        default=None, metadata={"help": "Sampling temperature (default: `temperature`, i.e. the "
                                        "policy softmax(z / tau) itself)."})
    online_top_k: int | None = field(default=None, metadata={"help": "Top-k sampling (default: off)."})
    online_top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (default: off)."})
    online_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Prompts of online sampling come from the dataset's `prompt` column, or "
                          "a conversation's messages up to its last user turn; for plain text they "
                          "are the tokens before the first label, at least this many (default 1)."})

    def __post_init__(self):
        if self.label_smoothing_factor and not self.label_smoothing:
            self.label_smoothing = self.label_smoothing_factor
        fo.module_options(self.loss_options(), "IQConfig")       # every loss option, validated
        if self.online_mix < 0:
            raise ValueError(f"online_mix must be >= 0, got {self.online_mix}")
        if self.online_every < 1:
            raise ValueError(f"online_every must be >= 1, got {self.online_every}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.online_prompt_length is not None and self.online_prompt_length < 1:
            raise ValueError(f"online_prompt_length must be >= 1, got {self.online_prompt_length}")
        if self.reduction != "mean":
            raise ValueError(f"reduction={self.reduction!r}: IQTrainer trains the mean loss, "
                             f"normalised by the Trainer's token count (num_items_in_batch); "
                             f"leave reduction at 'mean' (apply_fastirl in your own loop takes "
                             f"'sum' / 'none')")
        if self.td_weight_warmup_steps < 0:
            raise ValueError(f"td_weight_warmup_steps must be >= 0, got "
                             f"{self.td_weight_warmup_steps}")
        super().__post_init__()
        if self.loss_type not in ("nll", "chunked_nll"):      # chunked_nll: older TRL's NLL
            raise ValueError(f"loss_type={self.loss_type!r} selects one of TRL's own losses; IQConfig "
                             f"trains the IQ-Learn loss (td_weight=0 is the NLL). Leave loss_type at "
                             f"'nll'.")

    def loss_options(self) -> dict:
        """Options for :func:`apply_fastirl` / :func:`fastirl.iq_loss`."""
        out = {name: getattr(self, f) for f, name in CONFIG_FIELDS.items()}
        if isinstance(out.get("memory"), str) and out["memory"].isdigit():
            out["memory"] = int(out["memory"])          # a byte budget from the command line
        return out
