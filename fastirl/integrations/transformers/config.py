"""``IQConfig``: TRL's ``SFTConfig`` with the IQ-Learn options."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from fastirl.objective import DIVERGENCES, TD_ROWS, VALUE_TERMS, IQOptions

__all__ = ["IQConfig"]


@dataclass
class IQConfig(SFTConfig):
    r"""Training arguments of :class:`IQTrainer`: every field of TRL's ``SFTConfig``
    (datasets, chat templates, ``completion_only_loss``, ``assistant_only_loss``,
    ``packing``, ``padding_free``, ``model_init_kwargs``, and all of
    ``transformers.TrainingArguments``) plus the IQ-Learn loss options (the
    objective is described in ``docs/objective.md``).

    With ``td_weight=0`` and ``temperature=1`` the loss is the usual token
    cross-entropy (MLE).  ``online_mix > 0`` switches to online IQ-Learn: every
    ``online_every`` optimizer steps completions are sampled from the current
    policy for the batch's prompts and mixed in as non-expert sequences.
    ``loss_type`` must stay TRL's NLL (the IQ loss replaces it).
    """

    # ---- objective
    gamma: float = field(default=1.0, metadata={"help": "Discount of the next-state value, in [0, 1]."})
    td_weight: float = field(
        default=0.1,
        metadata={"help": "Weight lambda >= 0 of the TD regulariser r^2 (chi^2 divergence; "
                          "lambda = 1/(4 alpha) in IQ-Learn's notation). 0 gives MLE."})
    temperature: float = field(
        default=1.0, metadata={"help": "Soft-value temperature tau > 0: V = tau logsumexp(z / tau); "
                                       "the policy is softmax(z / tau)."})
    divergence: str = field(
        default="chi2", metadata={"help": "Divergence of the reward term.",
                                  "choices": list(DIVERGENCES)})
    value_term: str | None = field(
        default=None,
        metadata={"help": "Value term: 'value_expert' (offline default), 'value' (online default: "
                          "over expert and sampled rows) or 'v0'.",
                  "choices": list(VALUE_TERMS)})
    td_rows: str = field(
        default="expert",
        metadata={"help": "Rows of the TD regulariser: 'expert' (IQ-Learn 'chi') or 'all' "
                          "('regularize', online).", "choices": list(TD_ROWS)})
    detach_next_value: bool = field(
        default=False, metadata={"help": "Stop the gradient through V(s_{t+1}) (a target value)."})
    softcap: float | None = field(
        default=None,
        metadata={"help": "Final logit soft-cap c: z <- c tanh(z / c). Default: the model "
                          "config's final_logit_softcapping (Gemma 2), else none."})
    td_weight_warmup_steps: int = field(
        default=0,
        metadata={"help": "Raise the TD weight linearly from 0 to `td_weight` over this many "
                          "optimizer steps (0: no warm-up)."})
    # ---- implementation
    fused_loss: bool = field(
        default=True,
        metadata={"help": "Compute the loss fused with the LM head (no logits). False builds the "
                          "logits and uses the naive reference loss (debugging, benchmarks)."})
    loss_backend: str = field(
        default="auto", metadata={"help": "fastirl backend: 'auto', 'torch', 'triton', 'cpu', 'cuda'."})
    loss_preset: str = field(
        default="default", metadata={"help": "fastirl precision preset: 'default', 'fast', 'highest'."})
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Rows per fastirl chunk (default: from a memory budget)."})
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
        IQOptions(gamma=self.gamma, td_weight=self.td_weight, temperature=self.temperature,
                  divergence=self.divergence, softcap=self.softcap, value_term=self.value_term,
                  td_rows=self.td_rows, detach_next_value=self.detach_next_value)
        if self.online_mix < 0:
            raise ValueError(f"online_mix must be >= 0, got {self.online_mix}")
        if self.online_every < 1:
            raise ValueError(f"online_every must be >= 1, got {self.online_every}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.online_prompt_length is not None and self.online_prompt_length < 1:
            raise ValueError(f"online_prompt_length must be >= 1, got {self.online_prompt_length}")
        if self.td_weight_warmup_steps < 0:
            raise ValueError(f"td_weight_warmup_steps must be >= 0, got "
                             f"{self.td_weight_warmup_steps}")
        super().__post_init__()
        if self.loss_type not in ("nll", "chunked_nll"):      # chunked_nll: older TRL's NLL
            raise ValueError(f"loss_type={self.loss_type!r} selects one of TRL's own losses; IQConfig "
                             f"trains the IQ-Learn loss (td_weight=0 is the NLL). Leave loss_type at "
                             f"'nll'.")
        if self.label_smoothing_factor:
            raise ValueError("label_smoothing_factor is not supported by the IQ-Learn loss; set it "
                             "to 0")

    def loss_options(self) -> dict:
        """Options for :func:`apply_fastirl` / :func:`fastirl.iq_loss`."""
        options = dict(gamma=self.gamma, td_weight=self.td_weight, temperature=self.temperature,
                       divergence=self.divergence, value_term=self.value_term,
                       td_rows=self.td_rows, detach_next_value=self.detach_next_value,
                       backend=self.loss_backend, preset=self.loss_preset,
                       chunk_size=self.loss_chunk_size)
        if self.softcap is not None:
            options["softcap"] = self.softcap
        return options
