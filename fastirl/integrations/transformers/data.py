"""The data side of ``IQTrainer``: datasets TRL accepts, the IQ columns
(``prompt_ids``, ``is_expert``, ``done``) through the collator, real prompts
for online sampling, and mixing sampled sequences into an expert batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .anatomy import text_config

__all__ = ["mix_batches", "IQ_COLUMNS", "hf_dataset", "has_iq_columns", "pretokenized",
           "pad_only_tokenizer", "refuse_lora_on_head", "example_prompt_ids", "IQCollator"]

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "done")
# Dataset columns IQTrainer keeps next to TRL's (input_ids, labels, seq_lengths).
IQ_COLUMNS = ["prompt_ids", "is_expert", "done"]


def hf_dataset(data):
    """A map-style dataset of pre-tokenized rows (``torch.utils.data.Dataset`` or a
    list of dicts of tensors / lists) as a ``datasets.Dataset``, which TRL needs."""
    import datasets
    if data is None or isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
        return data
    if isinstance(data, dict):
        return {k: hf_dataset(v) for k, v in data.items()}
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        return data                            # TRL raises its own error
    rows = [{k: v.tolist() if torch.is_tensor(v) else v for k, v in data[i].items()}
            for i in range(len(data))]
    return datasets.Dataset.from_list(rows)


def has_iq_columns(*datasets) -> bool:
    for data in datasets:
        for part in (data.values() if isinstance(data, dict) else [data]):
            if set(IQ_COLUMNS) & set(getattr(part, "column_names", None) or []):
                return True
    return False


def pretokenized(data) -> bool:
    return data is not None and "input_ids" in (getattr(data, "column_names", None) or [])


def pad_only_tokenizer(model: nn.Module):
    """For pre-tokenized data without a tokenizer: TRL's collator needs only the pad
    id (the model config's pad, else eos, else 0)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    config = text_config(model)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    pad = 0 if pad is None else int(pad)
    tok = Tokenizer(models.WordLevel({"<pad>": pad}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<pad>")


def refuse_lora_on_head(peft_config) -> None:
    """TRL's SFTTrainer refuses adapters on the LM head; say what works instead."""
    targets = getattr(peft_config, "target_modules", None)
    if targets is None:
        return
    names = [targets] if isinstance(targets, str) else list(targets)
    if any(name in ("lm_head", "embed_out") or name.endswith(".lm_head") for name in names):
        raise ValueError(
            "IQTrainer: PEFT LoRA on the LM head (target_modules includes 'lm_head') is refused "
            "by TRL's SFTTrainer, which IQTrainer builds on. Alternatives: "
            "modules_to_save=['lm_head'] (trains the whole head exactly), LoRA on the other "
            "layers only, or apply_fastirl(model) with a transformers.Trainer or your own loop, "
            "where fastirl trains LoRA on lm_head exactly (no logits).")


def example_prompt_ids(example: dict, tokenizer, chat_template) -> dict:
    """The real prompt of a raw example, tokenized as at generation time: the
    ``prompt`` of a prompt/completion example, or a conversation up to its last
    user turn (with the generation prompt).  Empty for plain text."""
    kwargs = {"chat_template": chat_template} if chat_template else {}
    if "prompt" in example:
        prompt = example["prompt"]
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                return_dict=True, **kwargs)["input_ids"]
        else:
            ids = tokenizer(text=prompt)["input_ids"]
        return {"prompt_ids": list(ids)}
    messages = example.get("messages")
    if isinstance(messages, list):
        users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        if users:
            ids = tokenizer.apply_chat_template(messages[:users[-1] + 1], tokenize=True,
                                                add_generation_prompt=True, return_dict=True,
                                                **kwargs)["input_ids"]
            return {"prompt_ids": list(ids)}
    return {"prompt_ids": []}


@dataclass
class IQCollator:
    """TRL's collator plus the IQ columns: ``prompt_ids`` (a list of 1-d tensors),
    ``is_expert`` ((B,) bool) and ``done`` (padded like ``labels``)."""

    base: Any

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [dict(e) for e in examples]
        extra = {k: [e.pop(k) for e in examples] for k in IQ_COLUMNS if k in examples[0]}
        batch = self.base(examples)
        if "prompt_ids" in extra:
            batch["prompt_ids"] = [torch.as_tensor(p, dtype=torch.long) for p in extra["prompt_ids"]]
        if "is_expert" in extra:
            batch["is_expert"] = torch.as_tensor(extra["is_expert"], dtype=torch.bool)
        if "done" in extra:
            labels = batch["labels"]
            done = torch.zeros(labels.shape, dtype=torch.bool)
            rows = [torch.as_tensor(d, dtype=torch.bool) for d in extra["done"]]
            if labels.shape[0] == 1 and len(rows) > 1:            # padding-free: one row
                rows = [torch.cat(rows)]
            for i, d in enumerate(rows):
                done[i, :d.numel()] = d
            batch["done"] = done
        return batch


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
    mixed = {k: expert[k] for k in ("use_cache", "output_router_logits") if k in expert}
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
    unknown = [k for k in expert if k not in keys and k not in mixed and k != "is_expert"]
    if unknown:
        raise ValueError(f"online mode supports batches of {list(_SEQUENCE_KEYS)} and "
                         f"is_expert; got extra keys {unknown}")
    flags = expert.get("is_expert")
    flags = torch.ones(B, dtype=torch.bool, device=device) if flags is None else flags.bool()
    mixed["is_expert"] = torch.cat([flags, torch.zeros(S, dtype=torch.bool, device=device)])
    return mixed
