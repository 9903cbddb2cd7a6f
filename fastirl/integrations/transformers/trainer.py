"""``IQTrainer``: a ``transformers.Trainer`` that trains a causal LM with IQ-Learn."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, Trainer

from .config import IQConfig
from .patch import apply_fastirl, last_metrics

__all__ = ["IQTrainer"]

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "done")


class IQTrainer(Trainer):
    """Trains a causal LM with the IQ-Learn loss fused with its LM head.

    The model is patched with :func:`apply_fastirl` (options from the
    :class:`IQConfig`), so ``compute_loss`` runs the backbone for the final
    hidden states and :func:`fastirl.iq_loss` on ``get_output_embeddings()``'s
    weight and bias: no (tokens x vocab) logits.  The batch needs ``input_ids``
    and token-aligned HF ``labels`` (-100 = not an action: prompt, padding);
    optional ``attention_mask``, ``position_ids`` (packed sequences),
    ``is_expert`` ((B,) bool) and ``done`` ((B, T) bool terminal actions).

    * Gradient accumulation and DDP: the loss is normalised by the Trainer's
      ``num_items_in_batch`` (action tokens of the whole accumulated batch,
      summed over ranks with ``average_tokens_across_devices``).  In online mode
      the expert and sampled rows have different normalisers (see the spec), so
      each micro-batch is normalised by its own counts instead.
    * Logs the IQ metrics (nll, td_penalty, reward, value, entropy,
      token_accuracy; eval_* in evaluation) averaged over each logging interval.
    * Evaluation returns the loss and metrics only: there are no logits.
    """

    _tag_names = ["fastirl", "iq-learn"]

    def __init__(self, model: nn.Module | str | None = None, args: IQConfig | None = None,
                 *pargs, **kwargs):
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(model)
        if model is None:
            raise ValueError("IQTrainer needs a causal LM model")
        if args is None:
            args = IQConfig(output_dir="iq_output")
        elif not isinstance(args, IQConfig):
            raise TypeError(f"args must be an IQConfig (a TrainingArguments subclass with the IQ "
                            f"options), got {type(args).__name__}")
        apply_fastirl(model, fused=args.fused_loss, return_metrics=True, **args.loss_options())
        super().__init__(model, args, *pargs, **kwargs)
        # The patched forward accepts num_items_in_batch: let the Trainer count tokens.
        self.model_accepts_loss_kwargs = True
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list), "eval": defaultdict(list)}
        self._online_samples: dict[str, torch.Tensor] | None = None
        self._online_step: int | None = None

    # ------------------------------------------------------------------ the loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        training = model.training
        inputs = dict(inputs)
        if inputs.get("labels") is None and inputs.get("shift_labels") is None:
            raise ValueError("IQTrainer needs token-aligned `labels` in the batch (-100 on "
                             "tokens that are not actions); use e.g. "
                             "DataCollatorForLanguageModeling(tokenizer, mlm=False)")
        online = training and self.args.online_mix > 0
        if online and inputs.get("labels") is None:
            raise ValueError("online IQ-Learn needs `labels` (not only shift_labels) to find "
                             "the prompts")
        counted = num_items_in_batch is not None
        if online:
            inputs = self._mix_online(model, inputs)
            num_items_in_batch = None          # per-micro-batch N_E and N_all (see class doc)
        outputs = self._iq_forward(model, inputs, num_items_in_batch)
        loss = outputs["loss"]
        self._record(outputs, "train" if training else "eval")
        if online:
            self._record_online(inputs)
        if training and counted:
            # With num_items_in_batch the Trainer takes the loss as already scaled for
            # gradient accumulation (it does not divide it by the number of steps).
            if online:       # a per-micro-batch mean: scale it here
                loss = loss / getattr(self, "current_gradient_accumulation_steps",
                                      self.args.gradient_accumulation_steps)
            elif self.args.average_tokens_across_devices:
                # Sum over this rank's tokens / global count; DDP averages gradients over ranks.
                loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1
                               else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    def _iq_forward(self, model, inputs, num_items_in_batch):
        """The single call of the loss: the (possibly DDP-wrapped) patched model."""
        kwargs = {"return_metrics": True}
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return model(**inputs, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ metrics

    def _record(self, outputs, mode: str) -> None:
        metrics = outputs.get("iq_metrics") if hasattr(outputs, "get") else None
        if metrics is None:
            metrics = last_metrics(self.model)
        if not metrics:
            return
        names = {"accuracy": "token_accuracy"}
        for key, value in metrics.items():
            self._metrics[mode][names.get(key, key)].append(value.detach().float().reshape(()))

    def _record_online(self, inputs) -> None:
        flags = inputs["is_expert"]
        sampled = ~flags
        labels = inputs["labels"]
        tokens = (labels[sampled, 1:] != -100).sum(dim=1).float()
        self._metrics["train"]["online_samples"].append(sampled.sum().float())
        if tokens.numel():
            self._metrics["train"]["online_sample_tokens"].append(tokens.mean())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stored = self._metrics[mode]
        if stored:
            keys = sorted(stored)
            device = self.args.device
            means = torch.stack([torch.stack(stored[k]).mean().to(device) for k in keys])
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            prefix = "eval_" if mode == "eval" else ""
            logs = {**logs, **{prefix + k: v for k, v in zip(keys, means.tolist())}}
            stored.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ online IQ-Learn

    def _mix_online(self, model, inputs):
        step = self.state.global_step
        if self._online_samples is None or step % self.args.online_every == 0:
            self._online_samples = self._sample(model, inputs)
            self._online_step = step
        return mix_batches(inputs, self._online_samples, pad_token_id=self._pad_id(model))

    def _pad_id(self, model) -> int:
        unwrapped = self.accelerator.unwrap_model(model)
        gen = getattr(unwrapped, "generation_config", None)
        for value in (getattr(gen, "pad_token_id", None), getattr(gen, "eos_token_id", None)):
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        return 0

    def _eos_ids(self, model) -> list[int]:
        unwrapped = self.accelerator.unwrap_model(model)
        gen = getattr(unwrapped, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    @torch.no_grad()
    def _sample(self, model, inputs) -> dict[str, torch.Tensor]:
        """Completions of the current policy for the batch's prompts, as a batch of
        token-aligned sequences with labels on the completion only."""
        args = self.args
        ids, labels = inputs["input_ids"], inputs["labels"]
        attn = inputs.get("attention_mask")
        B, T = ids.shape
        n = max(1, round(args.online_mix * B))
        prompts = []
        for i in range(n):
            b = i % B
            valid = attn[b].bool() if attn is not None else torch.ones(T, dtype=torch.bool,
                                                                        device=ids.device)
            acts = (labels[b, 1:] != -100).nonzero()
            first = int(acts[0]) + 1 if acts.numel() else int(valid.sum())
            first = max(first, args.online_prompt_length or 1)
            prompt = ids[b, :first][valid[:first]]
            if prompt.numel() == 0:
                prompt = ids[b, valid][:1]
            prompts.append(prompt)
        pad = self._pad_id(model)
        P = max(p.numel() for p in prompts)
        prompt_ids = ids.new_full((n, P), pad)
        prompt_mask = torch.zeros(n, P, dtype=torch.long, device=ids.device)
        for i, p in enumerate(prompts):                       # left padding for generation
            prompt_ids[i, P - p.numel():] = p
            prompt_mask[i, P - p.numel():] = 1
        unwrapped = self.accelerator.unwrap_model(model)
        temperature = args.online_temperature or args.temperature
        gen_config = GenerationConfig(
            max_new_tokens=args.max_new_tokens, do_sample=True, temperature=temperature,
            top_k=args.online_top_k or 0, top_p=args.online_top_p, pad_token_id=pad,
            eos_token_id=self._eos_ids(model) or None, use_cache=True)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            out = unwrapped.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                     generation_config=gen_config)
        finally:
            unwrapped.train(was_training)
        completions = out[:, P:]
        eos = self._eos_ids(model)
        seqs, comp_lens = [], []
        for i, p in enumerate(prompts):
            c = completions[i]
            length = c.numel()
            if eos:
                hits = torch.isin(c, torch.tensor(eos, device=c.device)).nonzero()
                if hits.numel():
                    length = int(hits[0]) + 1                 # keep the EOS action
            seqs.append(torch.cat([p, c[:length]]))
            comp_lens.append(length)
        L = max(s.numel() for s in seqs)
        sample_ids = ids.new_full((n, L), pad)
        sample_labels = torch.full((n, L), -100, dtype=labels.dtype, device=ids.device)
        sample_mask = torch.zeros(n, L, dtype=torch.long, device=ids.device)
        done = torch.zeros(n, L, dtype=torch.bool, device=ids.device)
        for i, (s, p, c) in enumerate(zip(seqs, prompts, comp_lens)):
            sample_ids[i, :s.numel()] = s
            sample_mask[i, :s.numel()] = 1
            sample_labels[i, p.numel():s.numel()] = s[p.numel():]
            if c:
                done[i, s.numel() - 1] = True
        samples = {"input_ids": sample_ids, "attention_mask": sample_mask,
                   "labels": sample_labels, "done": done}
        if "position_ids" in inputs:
            samples["position_ids"] = (sample_mask.cumsum(1) - 1).clamp(min=0)
        return samples


def _pad_to(t: torch.Tensor, length: int, value) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    pad = t.new_full((t.shape[0], length - t.shape[1]) + tuple(t.shape[2:]), value)
    return torch.cat([t, pad], dim=1)


def mix_batches(expert: dict[str, Any], samples: dict[str, torch.Tensor], *,
                pad_token_id: int = 0) -> dict[str, Any]:
    """Concatenates an expert batch and a batch of sampled sequences (right padding)
    and marks them with ``is_expert``.  ``done`` is kept only if the expert batch
    has it (a sampled completion's last token is terminal)."""
    B, S = expert["input_ids"].shape[0], samples["input_ids"].shape[0]
    L = max(expert["input_ids"].shape[1], samples["input_ids"].shape[1])
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": -100,
            "position_ids": 0, "done": False}
    device = expert["input_ids"].device
    mixed = {}
    keys = [k for k in _SEQUENCE_KEYS if k in expert and expert[k] is not None]
    if "attention_mask" not in keys:
        keys.append("attention_mask")
        expert = {**expert, "attention_mask": torch.ones_like(expert["input_ids"])}
    for key in keys:
        e = expert[key]
        s = samples.get(key)
        if s is None:
            raise ValueError(f"online mode cannot mix batch key {key!r}")
        mixed[key] = torch.cat([_pad_to(e, L, fill[key]), _pad_to(s.to(e.dtype), L, fill[key])])
    unknown = [k for k in expert if k not in keys and k != "is_expert"]
    if unknown:
        raise ValueError(f"online mode supports batches of {list(_SEQUENCE_KEYS)} and "
                         f"is_expert; got extra keys {unknown}")
    flags = expert.get("is_expert")
    flags = torch.ones(B, dtype=torch.bool, device=device) if flags is None else flags.bool()
    mixed["is_expert"] = torch.cat([flags, torch.zeros(S, dtype=torch.bool, device=device)])
    return mixed
