"""``fastirl-train``: IQ-Learn fine-tuning from the command line (the counterpart of ``trl sft``).

Arguments are parsed by TRL's own parser (``trl.TrlParser``) from four groups:

* :class:`TrainScriptArguments`: the dataset (a hub name, a local JSON / JSONL /
  Parquet / CSV file or a folder of them), its splits, and how to read the model
  file (``gguf_file``, ``tokenizer_name_or_path``);
* :class:`~fastirl.integrations.IQConfig`: everything of TRL's ``SFTConfig`` (and
  of ``transformers.TrainingArguments``) plus the loss options (``td_weight``,
  ``gamma``, ..., ``loss_backend``, ``loss_memory``, ``td_weight_warmup_steps``);
* ``trl.ModelConfig``: the model path, ``dtype``, ``attn_implementation`` and the
  LoRA flags (``use_peft``, ``lora_r``, ``lora_target_modules``...);
* ``trl.DatasetMixtureConfig``: a mixture of datasets (``datasets:`` in the YAML
  file given with ``--config``).

``--config file.yaml`` sets any of these fields; the command line overrides it.
Example::

    fastirl-train --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \\
        --dataset_name train.jsonl --output_dir out --max_length 1024 \\
        --td_weight 0.1 --use_peft --lora_r 16 --lora_target_modules all-linear

Training, progress bar, logging (the IQ metrics ``nll``, ``td_penalty``,
``reward``, ``value``, ``entropy`` next to ``loss``), checkpoints and
``--resume_from_checkpoint`` (a checkpoint folder, or ``true`` for the last one
in ``output_dir``) are those of TRL's ``SFTTrainer``, which ``IQTrainer`` is.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass, field

from trl import ScriptArguments

__all__ = ["TrainScriptArguments", "make_parser", "load_data", "load_model", "main", "train"]

# File extensions of local datasets -> the `datasets` builder that reads them.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
             ".arrow": "arrow", ".txt": "text"}


@dataclass
class TrainScriptArguments(ScriptArguments):
    """TRL's ``ScriptArguments`` (``dataset_name``, ``dataset_config``,
    ``dataset_train_split``, ``dataset_test_split``, ``dataset_streaming``) where
    ``dataset_name`` may also be a local file or folder, plus how to read the model
    file and where evaluation data come from."""

    gguf_file: str | None = field(
        default=None,
        metadata={"help": "Name of a GGUF file inside `model_name_or_path`: the model and the "
                          "tokenizer are read from it (weights de-quantised to `dtype`)."})
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer to use (default: the model's own)."})
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Evaluation data from another hub name or local file (its split "
                          "`dataset_test_split`, or its only split). Default: the split "
                          "`dataset_test_split` of `dataset_name`, else a `test_split_size` "
                          "share of the training split."})


def make_parser(prog: str | None = "fastirl-train"):
    """``TrlParser`` over (TrainScriptArguments, IQConfig, ModelConfig,
    DatasetMixtureConfig)."""
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    from .config import IQConfig
    return TrlParser((TrainScriptArguments, IQConfig, ModelConfig,
                      DatasetMixtureConfig), prog=prog,
                     description="IQ-Learn fine-tuning of a causal LM with fastirl's IQTrainer "
                                 "(TRL's SFTTrainer training the IQ-Learn loss, fused with the "
                                 "LM head). Any field can also come from --config file.yaml.")


# ---------------------------------------------------------------------------- data

def _load_one(name: str, config: str | None, streaming: bool):
    """A ``DatasetDict`` from a hub name, a local data file (or glob), or a folder."""
    from datasets import load_dataset
    path = os.path.expanduser(name)
    files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else (
        [path] if os.path.isfile(path) else [])
    if files:
        exts = {os.path.splitext(f)[1].lower() for f in files}
        builders = {_BUILDERS.get(e) for e in exts}
        if len(builders) != 1 or None in builders:
            raise ValueError(f"fastirl-train: cannot read {name!r} as a dataset: local files must "
                             f"all be one of {sorted(_BUILDERS)} (got {sorted(exts)})")
        return load_dataset(builders.pop(), data_files=files, streaming=streaming)
    return load_dataset(path if os.path.isdir(path) else name, name=config, streaming=streaming)


def load_data(script_args, training_args, dataset_args):
    """(train, eval or None) following TRL's ``sft`` script: a mixture from
    ``datasets`` (YAML) wins over ``dataset_name``."""
    from trl import get_dataset

    strategy = getattr(training_args, "eval_strategy", "no")
    want_eval = str(getattr(strategy, "value", strategy)) != "no"
    if dataset_args.datasets:
        if script_args.dataset_name:
            print("fastirl-train: both `datasets` and `dataset_name` are given; using `datasets`",
                  file=sys.stderr)
        data = get_dataset(dataset_args)
    elif script_args.dataset_name:
        data = _load_one(script_args.dataset_name, script_args.dataset_config,
                         script_args.dataset_streaming)
    else:
        raise ValueError("fastirl-train: give a dataset: --dataset_name NAME_OR_FILE, or "
                         "`datasets:` in the --config file")
    split = script_args.dataset_train_split
    if split not in data:
        if len(data) == 1 and not dataset_args.datasets:
            split = next(iter(data))           # a single local file: its only split
        else:
            raise ValueError(f"fastirl-train: the dataset has no split {split!r} (it has "
                             f"{list(data)}); set --dataset_train_split")
    train = data[split]
    if not want_eval:
        return train, None
    test = script_args.dataset_test_split
    if script_args.eval_dataset_name:
        extra = _load_one(script_args.eval_dataset_name, None, script_args.dataset_streaming)
        if test not in extra and len(extra) != 1:
            raise ValueError(f"fastirl-train: {script_args.eval_dataset_name!r} has no split "
                             f"{test!r} (it has {list(extra)})")
        return train, extra[test] if test in extra else extra[next(iter(extra))]
    if test in data and test != split:
        return train, data[test]
    size = dataset_args.test_split_size
    if size:
        parts = train.train_test_split(test_size=size, seed=training_args.seed)
        return parts["train"], parts["test"]
    raise ValueError(f"fastirl-train: evaluation is on (--eval_strategy "
                     f"{training_args.eval_strategy}) but the dataset has no split {test!r}: "
                     f"set --dataset_test_split, --eval_dataset_name or --test_split_size")


# ---------------------------------------------------------------------------- model

def _model_init_kwargs(model_args, training_args) -> dict:
    kwargs = dict(revision=model_args.model_revision,
                  trust_remote_code=training_args.trust_remote_code,
                  attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def _plain_weights(model) -> None:
    """transformers marks a model read from GGUF as quantized (its Trainer then refuses
    to train it), though the weights are de-quantised into plain tensors: unmark it."""
    model.hf_quantizer = None
    model.is_quantized = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def load_model(script_args, training_args, model_args):
    """(model, tokenizer): the model name when TRL can load it itself (then
    ``training_args.model_init_kwargs`` carries the options, as in TRL's script),
    or a loaded model for a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_args.model_name_or_path
    if not path:
        raise ValueError("fastirl-train: give the model: --model_name_or_path NAME_OR_FOLDER")
    kwargs = _model_init_kwargs(model_args, training_args)
    tokenizer = None
    tok_path = script_args.tokenizer_name_or_path
    if tok_path or script_args.gguf_file:
        tok_kwargs = {"revision": model_args.model_revision,
                      "trust_remote_code": training_args.trust_remote_code}
        if script_args.gguf_file and not tok_path:
            tok_kwargs["gguf_file"] = script_args.gguf_file
        tokenizer = AutoTokenizer.from_pretrained(tok_path or path, **tok_kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if not script_args.gguf_file:
        training_args.model_init_kwargs = kwargs
        return path, tokenizer
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError("fastirl-train: --load_in_4bit / --load_in_8bit do not apply to a "
                         "GGUF file")
    dtype = kwargs.pop("dtype", None)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=script_args.gguf_file,
                                                 dtype=dtype or torch.float32, **kwargs)
    _plain_weights(model)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    training_args.model_init_kwargs = None
    return model, tokenizer


def _resume(value):
    """``--resume_from_checkpoint``: a folder, or true / last for the newest
    checkpoint in ``output_dir`` (the Trainer finds it)."""
    if isinstance(value, str) and value.strip().lower() in ("true", "last", "latest", "yes", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", ""):
        return None
    return value


# ---------------------------------------------------------------------------- main

def train(script_args, training_args, model_args, dataset_args):
    """Builds an ``IQTrainer`` from the parsed arguments, trains, saves the model
    to ``output_dir``; returns the trainer."""
    import transformers
    from packaging.version import Version
    from trl import get_peft_config, get_quantization_config

    from .trainer import IQTrainer

    train_data, eval_data = load_data(script_args, training_args, dataset_args)
    model, tokenizer = load_model(script_args, training_args, model_args)
    kwargs = {}
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    trainer = IQTrainer(model=model, args=training_args, train_dataset=train_data,
                        eval_dataset=eval_data, processing_class=tokenizer,
                        peft_config=get_peft_config(model_args), **kwargs)
    trainer.train(resume_from_checkpoint=_resume(training_args.resume_from_checkpoint))
    trainer.accelerator.print("fastirl-train: training done")
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"fastirl-train: model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if Version(transformers.__version__) >= Version("5.18.0") and hasattr(trainer, "end"):
        trainer.end()            # closes the trackers and the process group
    return trainer


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    try:
        script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(argv)
    except ValueError as exc:
        if "bf16" in str(exc) and "use_cpu" in str(exc):
            raise SystemExit(f"fastirl-train: {exc}\nIQConfig, like TRL's SFTConfig, trains in "
                             f"bf16 by default: without a GPU add --use_cpu (bf16 autocast on the "
                             f"CPU) or --use_cpu --bf16 false (float32).") from None
        raise
    train(script_args, training_args, model_args, dataset_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
