"""``IQTrainer``: TRL's ``SFTTrainer`` with the IQ-Learn loss fused with the LM head."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from trl import SFTTrainer

from .anatomy import router_aux_loss_coef
from .config import IQConfig
from .data import (IQ_COLUMNS, IQCollator, example_prompt_ids, has_iq_columns, hf_dataset,
                   mix_batches, pad_only_tokenizer, pretokenized, refuse_lora_on_head)
from .patch import apply_fastirl, set_loss_options

__all__ = ["IQTrainer", "mix_batches"]

# Metrics logged token-weighted (mean over the action tokens of the logging interval).
_METRIC_NAMES = {"nll": "nll", "td_penalty": "td_penalty", "reward": "reward", "value": "value",
                 "entropy": "entropy", "accuracy": "mean_token_accuracy"}


class IQTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` training the IQ-Learn loss instead of cross-entropy.

    Switching from SFT is a change of class names: ``SFTTrainer`` ->
    ``IQTrainer``, ``SFTConfig`` -> :class:`IQConfig`.  TRL does everything but
    the loss: model loading (``model_init_kwargs``), every dataset format
    (text, prompt/completion, conversational ``messages`` with the chat
    template), ``completion_only_loss`` / ``assistant_only_loss`` (they choose
    the *action* tokens of the objective: labels -100 are not actions),
    ``packing`` / ``padding_free`` (``position_ids`` separate the sequences:
    no value is bootstrapped across them), ``peft_config``, the collator.

    The model is patched with :func:`apply_fastirl` (options from the config),
    so the loss runs the backbone for the final hidden states and
    :func:`fastirl.iq_loss` on the LM head's weight: no (tokens x vocab)
    logits.  Optional dataset columns: ``is_expert`` (bool per example) and
    ``done`` (token-aligned bool list, terminal actions; not with packing).
    Pre-tokenized data (``input_ids`` and ``labels``, -100 = not an action) may
    also come as a ``torch.utils.data.Dataset`` of dicts, and then needs no
    ``processing_class`` (only the pad id, from the model config, is used).

    * Gradient accumulation and data parallelism: the loss is normalised by
      the Trainer's ``num_items_in_batch`` (action tokens of the accumulated
      batch over all ranks).  With non-expert rows (online mode, or an
      ``is_expert`` column) expert and non-expert rows have different
      normalisers, so each micro-batch is normalised by its own.
    * Logged (TRL-style, token-weighted over each logging interval and over
      ranks): ``nll``, ``td_penalty``, ``reward``, ``value``, ``entropy``,
      ``mean_token_accuracy``, ``num_tokens`` (``eval_*`` in evaluation), and
      ``td_weight`` during a ``td_weight_warmup_steps`` warm-up; MoE models:
      ``aux_loss``; online mode: ``online_samples``, ``online_sample_tokens``.
    * Evaluation returns the loss and metrics; with ``eval_logits=True`` also
      the logits (for ``compute_metrics`` / ``predict``).
    * Online mode (``online_mix > 0``) samples completions for each example's
      real prompt: the dataset's ``prompt``, or a conversation's messages up to
      its last user turn (with the generation prompt), else the tokens before
      the first label.
    """

    _tag_names = ["trl", "sft", "fastirl", "iq-learn"]
    _name = "IQ"

    def __init__(self, model, args: IQConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None,
                 compute_loss_func=None, peft_config=None, **kwargs):
        """Arguments as ``trl.SFTTrainer`` (``compute_metrics``, ``callbacks``,
        ``optimizers``, ``formatting_func``... go to it unchanged); ``args`` must
        be an :class:`IQConfig`."""
        if args is None:
            args = IQConfig(output_dir="iq_output")
        elif not isinstance(args, IQConfig):
            raise TypeError(f"args must be an IQConfig (TRL's SFTConfig with the IQ options), got "
                            f"{type(args).__name__}")
        if compute_loss_func is not None:
            raise TypeError("IQTrainer trains the IQ-Learn loss: compute_loss_func is not "
                            "supported (subclass IQTrainer to change the loss)")
        if args.online_mix > 0 and (args.packing or args.padding_free):
            raise ValueError("online_mix > 0 does not support packing / padding_free: sampled "
                             "completions are mixed in as separate padded rows")
        refuse_lora_on_head(peft_config)
        train_dataset, eval_dataset = hf_dataset(train_dataset), hf_dataset(eval_dataset)
        if processing_class is None and isinstance(model, nn.Module) and pretokenized(train_dataset):
            processing_class = pad_only_tokenizer(model)
        self._online_prompts = args.online_mix > 0
        if peft_config is not None:
            kwargs["peft_config"] = peft_config
        super().__init__(model, args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        # After SFTTrainer, whose fused LM head (NLL) wraps the forward: fastirl's is outermost.
        apply_fastirl(self.model, fused=args.fused_loss, return_metrics=True,
                      **args.loss_options())
        # The patched forward takes num_items_in_batch: let the Trainer count tokens.
        self.model_accepts_loss_kwargs = True
        if has_iq_columns(self.train_dataset, self.eval_dataset):
            self.data_collator = IQCollator(self.data_collator)
        self._iq_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._online_samples: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ data

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func,
                         dataset_name):
        if (getattr(self, "_online_prompts", False) and dataset_name == "train"
                and "input_ids" not in (dataset.column_names or [])):
            dataset = dataset.map(example_prompt_ids, fn_kwargs={
                "tokenizer": processing_class, "chat_template": getattr(self, "chat_template", None)})
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func,
                                        dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            c for c in IQ_COLUMNS if c not in self._signature_columns]

    # ------------------------------------------------------------------ the loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        prompts = inputs.pop("prompt_ids", None)
        if inputs.get("labels") is None and inputs.get("shift_labels") is None:
            raise ValueError("IQTrainer needs token-aligned `labels` in the batch (-100 on tokens "
                             "that are not actions)")
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        online = mode == "train" and self.args.online_mix > 0
        if online and inputs.get("labels") is None:
            raise ValueError("online IQ-Learn needs `labels` (not only shift_labels)")
        self._warm_up()
        counted = num_items_in_batch is not None
        if online:
            inputs = self._mix_online(model, inputs, prompts)
        # Expert and non-expert rows have different normalisers (N_E, N_all): the
        # Trainer's single token count cannot stand for both, so normalise per micro-batch.
        per_batch = inputs.get("is_expert") is not None
        if per_batch:
            num_items_in_batch = None
        kwargs = {"return_metrics": True}
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        if return_outputs and self.args.eval_logits:
            kwargs["return_logits"] = True
        outputs = model(**inputs, **kwargs)
        loss = outputs["loss"]
        aux = outputs.get("aux_loss")
        weighted_aux = None
        if aux is not None:     # the patch added it as the model does; TRL's coef, scaled below
            loss = loss - router_aux_loss_coef(model) * aux.to(loss.device)
            if self.aux_loss_enabled:
                weighted_aux = self.router_aux_loss_coef * aux.to(loss.device)
        if mode == "train" and counted:
            # With num_items_in_batch the Trainer takes the loss as already scaled for
            # gradient accumulation (it does not divide it by the number of steps).
            steps = getattr(self, "current_gradient_accumulation_steps",
                            self.args.gradient_accumulation_steps)
            if per_batch:                       # a per-micro-batch mean: scale it here
                loss = loss / steps
            elif self.args.average_tokens_across_devices:
                # Sum over this rank's tokens / global count; DDP averages gradients over ranks.
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if weighted_aux is not None:
                weighted_aux = weighted_aux / steps
        if weighted_aux is not None:
            loss = loss + weighted_aux
        self._record(outputs, inputs, mode, online)
        return (loss, outputs) if return_outputs else loss

    def _warm_up(self) -> None:
        steps = self.args.td_weight_warmup_steps
        if steps > 0:
            frac = min(1.0, self.state.global_step / steps) if self.model.training else 1.0
            set_loss_options(self.model, td_weight=self.args.td_weight * frac)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only or not self.args.eval_logits:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), outputs.logits, inputs.get("labels")

    # ------------------------------------------------------------------ metrics

    def _record(self, outputs, inputs, mode: str, online: bool) -> None:
        sums = self._iq_sums[mode]
        metrics = outputs.get("iq_metrics")
        if metrics:
            n = metrics["num_actions"].detach().float()
            for key, name in _METRIC_NAMES.items():
                sums[name] += metrics[key].detach().float() * n
            sums["_actions"] += n
        aux = outputs.get("aux_loss")
        if aux is not None:
            sums["aux_loss"] += aux.detach().float()
            sums["_calls"] += 1.0
        if mode == "train":
            if "attention_mask" in inputs and not online:
                tokens = inputs["attention_mask"].sum()
            elif "attention_mask" in inputs:
                tokens = inputs["attention_mask"][inputs["is_expert"]].sum()
            else:
                tokens = torch.tensor(inputs["input_ids"].numel())
            self._total_train_tokens += int(
                self.accelerator.gather_for_metrics(tokens.reshape(1).to(self.args.device)).sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            if self.args.td_weight_warmup_steps > 0:
                self._metrics[mode]["td_weight"] = [
                    self.args.td_weight * min(1.0, self.state.global_step
                                              / self.args.td_weight_warmup_steps)]
        if online:
            sampled = ~inputs["is_expert"]
            sample_tokens = (inputs["labels"][sampled, 1:] != -100).sum(dim=1).float()
            sums["online_samples"] += sampled.sum().float()
            sums["online_sample_tokens"] += sample_tokens.sum()
            sums["_online_steps"] += 1.0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        sums = self._iq_sums[mode]
        if sums:
            keys = sorted(sums)
            device = self.args.device
            values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32).to(device).reshape(())
                                  for k in keys])
            values = self.accelerator.reduce(values, reduction="sum")
            total = dict(zip(keys, values.tolist()))
            prefix = "eval_" if mode == "eval" else ""
            actions = max(total.pop("_actions", 0.0), 1.0)
            calls = max(total.pop("_calls", 0.0), 1.0)
            online_steps = max(total.pop("_online_steps", 0.0), 1.0)
            for name in _METRIC_NAMES.values():
                if name in total:
                    logs[prefix + name] = total.pop(name) / actions
            if "aux_loss" in total:
                logs[prefix + "aux_loss"] = total.pop("aux_loss") / calls
            if "online_samples" in total:
                samples = total.pop("online_samples")
                logs["online_sample_tokens"] = total.pop("online_sample_tokens") / max(samples, 1.0)
                logs["online_samples"] = samples / online_steps
            sums.clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ online IQ-Learn

    def _mix_online(self, model, inputs, prompts):
        step = self.state.global_step
        if self._online_samples is None or step % self.args.online_every == 0:
            self._online_samples = self._sample(model, inputs, prompts)
        return mix_batches(inputs, self._online_samples, pad_token_id=self._pad_id(model))

    def _generation_config(self, model):
        return getattr(self.accelerator.unwrap_model(model), "generation_config", None)

    def _pad_id(self, model) -> int:
        gen = self._generation_config(model)
        candidates = (getattr(self.processing_class, "pad_token_id", None),
                      getattr(gen, "pad_token_id", None), getattr(gen, "eos_token_id", None))
        for value in candidates:
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        return 0

    def _eos_ids(self, model) -> list[int]:
        eos = getattr(self._generation_config(model), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.processing_class, "eos_token_id", None)
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    def _prompts(self, inputs, prompts) -> list[torch.Tensor]:
        """One prompt per example: its ``prompt_ids`` (the real prompt), else the
        tokens before its first label (at least ``online_prompt_length``)."""
        ids, labels = inputs["input_ids"], inputs["labels"]
        attn = inputs.get("attention_mask")
        B, T = ids.shape
        out = []
        for b in range(B):
            given = None if prompts is None else prompts[b]
            if given is not None and given.numel() > 0:
                out.append(given.to(ids.device))
                continue
            valid = attn[b].bool() if attn is not None else torch.ones(T, dtype=torch.bool,
                                                                        device=ids.device)
            acts = (labels[b, 1:] != -100).nonzero()
            first = int(acts[0]) + 1 if acts.numel() else int(valid.sum())
            first = max(first, self.args.online_prompt_length or 1)
            prompt = ids[b, :first][valid[:first]]
            out.append(prompt if prompt.numel() else ids[b, valid][:1])
        return out

    @torch.no_grad()
    def _sample(self, model, inputs, prompts) -> dict[str, torch.Tensor]:
        """Completions of the current policy for the batch's prompts, as a batch of
        token-aligned sequences with labels on the completion only."""
        args = self.args
        ids = inputs["input_ids"]
        all_prompts = self._prompts(inputs, prompts)
        n = max(1, round(args.online_mix * ids.shape[0]))
        chosen = [all_prompts[i % len(all_prompts)] for i in range(n)]
        pad = self._pad_id(model)
        P = max(p.numel() for p in chosen)
        prompt_ids = ids.new_full((n, P), pad)
        prompt_mask = torch.zeros(n, P, dtype=torch.long, device=ids.device)
        for i, p in enumerate(chosen):                        # left padding for generation
            prompt_ids[i, P - p.numel():] = p
            prompt_mask[i, P - p.numel():] = 1
        unwrapped = self.accelerator.unwrap_model(model)
        temperature = args.online_temperature or args.temperature
        eos = self._eos_ids(model)
        gen_config = GenerationConfig(
            max_new_tokens=args.max_new_tokens, do_sample=True, temperature=temperature,
            top_k=args.online_top_k or 0, top_p=args.online_top_p, pad_token_id=pad,
            eos_token_id=eos or None, use_cache=True)
        was_training = unwrapped.training
        unwrapped.eval()
        try:
            out = unwrapped.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                     generation_config=gen_config)
        finally:
            unwrapped.train(was_training)
        completions = out[:, P:]
        seqs, comp_lens = [], []
        for i, p in enumerate(chosen):
            c = completions[i]
            length = c.numel()
            if eos:
                hits = torch.isin(c, torch.tensor(eos, device=c.device)).nonzero()
                if hits.numel():
                    length = int(hits[0]) + 1                 # keep the EOS action
            seqs.append(torch.cat([p, c[:length]]))
            comp_lens.append(length)
        L = max(s.numel() for s in seqs)
        labels = inputs["labels"]
        sample_ids = ids.new_full((n, L), pad)
        sample_labels = torch.full((n, L), -100, dtype=labels.dtype, device=ids.device)
        sample_mask = torch.zeros(n, L, dtype=torch.long, device=ids.device)
        done = torch.zeros(n, L, dtype=torch.bool, device=ids.device)
        for i, (s, p, c) in enumerate(zip(seqs, chosen, comp_lens)):
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
