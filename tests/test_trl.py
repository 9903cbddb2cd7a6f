"""IQTrainer / IQConfig on TRL's SFTTrainer / SFTConfig, and the guard that stops
a plain SFTTrainer from silently training cross-entropy on a patched model.

Tiny models and a tiny chat tokenizer built locally (tests/_hf.py)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

import fastirl  # noqa: E402
from fastirl.integrations import (IQConfig, IQTrainer, apply_fastirl,  # noqa: E402
                                  is_fastirl_applied, unapply_fastirl)

from _hf import (assert_grads_close, conversation, grads, reference_loss,  # noqa: E402
                 tiny_llama, tokenizer)

logging.getLogger("transformers").setLevel(logging.ERROR)
transformers.logging.set_verbosity_error()
Dataset = datasets.Dataset
OPTIONS = dict(td_weight=0.3, gamma=0.9)
IQ_METRICS = ("nll", "td_penalty", "reward", "value", "entropy", "mean_token_accuracy",
              "num_tokens")


def sft_kwargs(tmp_path, **kwargs) -> dict:
    defaults = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                    disable_tqdm=True, per_device_train_batch_size=2, max_steps=1, logging_steps=1,
                    bf16=False, gradient_checkpointing=False, dataloader_num_workers=0, seed=0)
    return {**defaults, **kwargs}


def iq_config(tmp_path, **kwargs) -> IQConfig:
    return IQConfig(**sft_kwargs(tmp_path, **{"loss_backend": "torch", **OPTIONS, **kwargs}))


@pytest.fixture
def spy(monkeypatch):
    """Every fastirl.iq_loss call of the integration: its targets and options."""
    calls = []
    real = fastirl.iq_loss

    def record(hidden, weight, targets, **kwargs):
        out = real(hidden, weight, targets, **kwargs)
        calls.append(dict(targets=targets.clone(), out=out, hidden_dtype=hidden.dtype, **kwargs))
        return out

    monkeypatch.setattr(fastirl, "iq_loss", record)
    return calls


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


def assistant_tokens(tok, messages) -> int:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    return sum(out["assistant_masks"])


# ----------------------------------------------------------------------------- the user's script


def test_trl_user_script_runs_with_class_names_only(tmp_path, spy):
    """Done-when of the issue: a TRL SFT script (messages + chat template,
    assistant-only loss, LoRA, packing) with SFTTrainer/SFTConfig renamed to
    IQTrainer/IQConfig trains the IQ loss and logs the IQ metrics."""
    tok = tokenizer()
    train = Dataset.from_list([{"messages": conversation(i)} for i in range(6)])
    # --- the user's script, TRL defaults (bf16 autocast, gradient checkpointing) ---
    args = IQConfig(output_dir=str(tmp_path), assistant_only_loss=True, packing=True,
                    max_length=64, per_device_train_batch_size=2, num_train_epochs=1,
                    logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                    disable_tqdm=True, td_weight=0.5, loss_backend="torch")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    trainer = IQTrainer(tiny_llama(), args=args, train_dataset=train, processing_class=tok,
                        peft_config=lora)
    trainer.train()
    # ------------------------------------------------------------------------------
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(k in h for h in logs for k in IQ_METRICS), logs
    assert all(math.isfinite(h["loss"]) and h["td_penalty"] > 0 for h in logs)
    assert is_fastirl_applied(trainer.model)
    # Packed (padding-free) rows: position_ids reach the objective, and the actions
    # are exactly the assistant tokens (with <|end|>) of every conversation.
    assert spy and all(c["position_ids"] is not None for c in spy)
    actions = sum(int((c["targets"] != -100).sum()) for c in spy)
    assert actions == sum(assistant_tokens(tok, conversation(i)) for i in range(6))
    assert all(c["td_weight"] == 0.5 for c in spy)


def test_packed_lora_loss_and_adapter_grads_equal_naive(tmp_path):
    """The same setup in fp32: loss and every LoRA gradient of a packed batch equal
    the naive loss on the model's own logits."""
    tok = tokenizer()
    train = Dataset.from_list([{"messages": conversation(i)} for i in range(4)])
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                           lora_dropout=0.0, init_lora_weights=False)
    args = iq_config(tmp_path, assistant_only_loss=True, packing=True, max_length=48,
                     per_device_train_batch_size=4)
    trainer = IQTrainer(tiny_llama(), args=args, train_dataset=train, processing_class=tok,
                        peft_config=lora)
    model = trainer.model
    batch = first_batch(trainer)
    assert "position_ids" in batch and (batch["position_ids"] == 0).sum() > 1
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    got = grads(model)
    assert got and all("lora_" in n for n in got)
    model.zero_grad()
    # (No deepcopy: TRL's fused-head wrapper would still call the original model.)
    unapply_fastirl(model)
    want = reference_loss(model, batch, **OPTIONS)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    want.backward()
    assert_grads_close(got, grads(model))


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "conversational_pc", "messages"])
def test_dataset_formats_train_the_same_tokens_as_sft(tmp_path, fmt):
    """Every TRL dataset format: IQTrainer's batch (input_ids, labels = actions) is
    SFTTrainer's, and the loss is the naive IQ loss on it."""
    tok = tokenizer()
    rows = []
    for i in range(4):
        chat = conversation(i)
        if fmt == "text":
            rows.append({"text": " ".join(m["content"] for m in chat)})
        elif fmt == "prompt_completion":
            rows.append({"prompt": chat[0]["content"], "completion": " " + chat[1]["content"]})
        elif fmt == "conversational_pc":
            rows.append({"prompt": chat[:3], "completion": chat[3:]})
        else:
            rows.append({"messages": chat})
    train = Dataset.from_list(rows)
    extra = dict(assistant_only_loss=True) if fmt == "messages" else {}
    sft = trl.SFTTrainer(tiny_llama(), args=trl.SFTConfig(**sft_kwargs(tmp_path, **extra)),
                         train_dataset=train, processing_class=tok)
    trainer = IQTrainer(tiny_llama(), args=iq_config(tmp_path, **extra), train_dataset=train,
                        processing_class=tok)
    want_batch, batch = first_batch(sft), first_batch(trainer)
    for key in ("input_ids", "labels", "attention_mask"):
        torch.testing.assert_close(batch[key], want_batch[key])
    if fmt != "text":                                  # prompts are not actions
        assert (batch["labels"] == -100).sum() > (batch["attention_mask"] == 0).sum()
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    naive = tiny_llama()
    torch.testing.assert_close(loss.double(), reference_loss(naive, batch, **OPTIONS),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- never silent


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_plain_sft_trainer_on_patched_model_raises(tmp_path, loss_type):
    """TRL's SFTTrainer installs its own fused LM head over the patched forward
    and computes its NLL there: the first training step raises instead."""
    tok = tokenizer()
    model = tiny_llama()
    apply_fastirl(model, backend="torch", **OPTIONS)
    assert is_fastirl_applied(model)
    train = Dataset.from_list([{"messages": conversation(i)} for i in range(2)])
    args = trl.SFTConfig(output_dir=str(tmp_path), loss_type=loss_type, max_steps=1,
                         report_to=[], use_cpu=True, save_strategy="no", bf16=False,
                         disable_tqdm=True, per_device_train_batch_size=2)
    trainer = trl.SFTTrainer(model, args=args, train_dataset=train, processing_class=tok)
    assert not is_fastirl_applied(model)               # TRL's forward is outermost now
    with pytest.raises(RuntimeError, match="add_fused_lm_head.*IQTrainer"):
        trainer.train()
    assert not is_fastirl_applied(model)
    # Re-applying puts fastirl's forward outermost again; the wrapper is passed through.
    apply_fastirl(model, backend="torch", **OPTIONS)
    assert is_fastirl_applied(model)
    batch = first_batch(trainer)
    model.train()
    out = model(**batch)
    assert out.logits is None and out.loss.item() > 0
    assert model.generate(batch["input_ids"][:1, :3], max_new_tokens=2).shape == (1, 5)


def test_bypass_by_calling_the_backbone_directly_raises():
    model = tiny_llama()
    apply_fastirl(model, backend="torch")
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(RuntimeError, match="outside the patched forward"):
        model.model(input_ids=ids)
    assert not is_fastirl_applied(model)
    with torch.no_grad():                                # not a training step: allowed
        model.model(input_ids=ids)
    model.eval()
    model.model(input_ids=ids)


def test_another_patch_over_the_forward_raises_and_names_it():
    """E.g. Liger's apply_liger_kernel_to_*: a forward of its own that runs the
    backbone and computes cross-entropy."""
    model = tiny_llama()
    apply_fastirl(model, backend="torch")

    def other_fused_cross_entropy(self, input_ids=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids).last_hidden_state
        logits = self.lm_head(hidden[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())

    model.forward = other_fused_cross_entropy.__get__(model)
    assert not is_fastirl_applied(model)
    model.train()
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(RuntimeError, match="other_fused_cross_entropy"):
        model(input_ids=ids, labels=ids)


def test_iqconfig_rejects_trl_losses(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        iq_config(tmp_path, loss_type="dft")
    # TrainingArguments' label smoothing is the loss's (label-smoothed CE at td_weight=0)
    assert iq_config(tmp_path, label_smoothing_factor=0.1).loss_options()["label_smoothing"] == 0.1
    with pytest.raises(ValueError, match="label_smoothing"):
        iq_config(tmp_path, label_smoothing=1.5)
    with pytest.raises(ValueError, match="td_weight_warmup_steps"):
        iq_config(tmp_path, td_weight_warmup_steps=-1)
    with pytest.raises(ValueError, match="reduction"):
        iq_config(tmp_path, reduction="sum")
    with pytest.raises(TypeError, match="IQConfig"):
        IQTrainer(tiny_llama(), trl.SFTConfig(**sft_kwargs(tmp_path)))


def test_docs_name_every_loss_field_of_iqconfig():
    """docs/huggingface.md names every loss field of IQConfig (the fields come
    from fastirl.options; defaults and meanings are in docs/options.md)."""
    from pathlib import Path

    from fastirl.integrations.transformers.config import CONFIG_FIELDS
    doc = (Path(__file__).resolve().parents[1] / "docs" / "huggingface.md").read_text()
    doc = " ".join(doc.split())
    for field, name in CONFIG_FIELDS.items():
        assert (f"`{field}`" if field == name else f"`{field}` (`{name}`)") in doc, field


# ----------------------------------------------------------------------------- training details


def test_td_weight_warmup_is_linear_from_zero(tmp_path, spy):
    tok = tokenizer()
    train = Dataset.from_list([{"messages": conversation(i)} for i in range(4)])
    args = iq_config(tmp_path, td_weight=0.4, td_weight_warmup_steps=2, max_steps=4,
                     per_device_train_batch_size=1, learning_rate=1e-3)
    trainer = IQTrainer(tiny_llama(), args=args, train_dataset=train, processing_class=tok)
    trainer.train()
    assert [c["td_weight"] for c in spy] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    logged = [h["td_weight"] for h in trainer.state.log_history if "td_weight" in h]
    assert logged == pytest.approx([0.0, 0.2, 0.4, 0.4])


def test_metrics_are_token_weighted_over_the_logging_interval(tmp_path, spy):
    tok = tokenizer()
    train = Dataset.from_list([{"messages": conversation(i)} for i in range(4)])
    args = iq_config(tmp_path, max_steps=2, per_device_train_batch_size=1,
                     gradient_accumulation_steps=2, logging_steps=2,
                     assistant_only_loss=True)
    trainer = IQTrainer(tiny_llama(), args=args, train_dataset=train, processing_class=tok)
    trainer.train()
    assert len(spy) == 4
    n = [int((c["targets"] != -100).sum()) for c in spy]
    assert len(set(n)) > 1                              # different token counts
    log = next(h for h in trainer.state.log_history if "td_penalty" in h)
    for key, name in (("td_penalty", "td_penalty"), ("reward", "reward"), ("value", "value"),
                      ("entropy", "entropy"), ("accuracy", "mean_token_accuracy"), ("nll", "nll")):
        want = sum(float(c["out"][1][key]) * k for c, k in zip(spy, n)) / sum(n)
        assert math.isclose(log[name], want, rel_tol=1e-5, abs_tol=1e-6), (name, log[name], want)


def _one_sgd_step(tmp_path, train, tok, **kwargs):
    model = tiny_llama()
    args = iq_config(tmp_path, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                     lr_scheduler_type="constant", weight_decay=0.0, **kwargs)
    trainer = IQTrainer(model, args, train_dataset=train, processing_class=tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """GA 4 x 1 conversations of different lengths == one batch of 4: the loss is
    normalised by the token count of the whole accumulated batch."""
    tok = tokenizer()
    train = Dataset.from_list([{"messages": conversation(i)} for i in range(4)])
    full = _one_sgd_step(tmp_path, train, tok, per_device_train_batch_size=4)
    accum = _one_sgd_step(tmp_path, train, tok, per_device_train_batch_size=1,
                          gradient_accumulation_steps=4)
    assert_grads_close(accum, full, rtol=1e-4)


def test_logged_loss_is_the_iq_loss_of_the_batch(tmp_path):
    """Through the Trainer (num_items_in_batch counted by transformers): the first
    logged loss is the naive IQ loss of the whole batch (every token an action, the
    first one too: it is not predicted and must not be counted)."""
    tok = tokenizer()
    train = Dataset.from_list([{"messages": conversation(i)} for i in range(4)])
    args = iq_config(tmp_path, per_device_train_batch_size=4, learning_rate=1e-9)
    trainer = IQTrainer(tiny_llama(), args=args, train_dataset=train, processing_class=tok)
    batch = first_batch(trainer)
    trainer.train()
    want = reference_loss(tiny_llama(), batch, **OPTIONS).item()
    assert math.isclose(trainer.state.log_history[0]["loss"], want, rel_tol=1e-4)


def test_eval_logits_for_compute_metrics(tmp_path):
    tok = tokenizer()
    data = Dataset.from_list([{"messages": conversation(i)} for i in range(3)])
    seen = {}

    def compute_metrics(pred):
        seen["logits"], seen["labels"] = pred.predictions, pred.label_ids
        return {"n": float(len(pred.predictions))}

    trainer = IQTrainer(tiny_llama(), args=iq_config(tmp_path, per_device_eval_batch_size=3),
                        train_dataset=data, eval_dataset=data, processing_class=tok,
                        compute_metrics=compute_metrics)
    out = trainer.predict(trainer.eval_dataset)        # default: no logits
    assert out.predictions is None and math.isfinite(out.metrics["test_loss"])
    trainer.args.eval_logits = True
    metrics = trainer.evaluate()
    assert metrics["eval_n"] == 3 and "eval_td_penalty" in metrics
    batch = next(iter(trainer.get_eval_dataloader()))
    with torch.no_grad():
        want = tiny_llama()(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
    got = torch.as_tensor(seen["logits"])
    torch.testing.assert_close(got[:, :want.shape[1]], want, rtol=1e-4, atol=1e-5)


def test_online_mode_samples_from_the_last_user_turn(tmp_path, monkeypatch):
    tok = tokenizer()
    chats = [conversation(i) for i in range(2)]
    train = Dataset.from_list([{"messages": c} for c in chats])
    args = iq_config(tmp_path, online_mix=1.0, max_new_tokens=3, assistant_only_loss=True)
    trainer = IQTrainer(tiny_llama(), args=args, train_dataset=train, processing_class=tok)
    model = trainer.model
    prompts = []
    real_generate = model.generate

    def generate(*a, **kw):
        prompts.append([row[m.bool()].tolist() for row, m in
                        zip(kw["input_ids"], kw["attention_mask"])])
        return real_generate(*a, **kw)

    monkeypatch.setattr(model, "generate", generate)
    trainer.train()
    want = [tok.apply_chat_template(c[:3], tokenize=True, add_generation_prompt=True,
                                    return_dict=True)["input_ids"] for c in chats]
    assert len(prompts) == 1 and sorted(prompts[0]) == sorted(want)
    log = next(h for h in trainer.state.log_history if "online_samples" in h)
    assert log["online_samples"] == 2 and math.isfinite(log["loss"])


def test_model_from_a_path_with_model_init_kwargs(tmp_path, spy):
    """TRL loads the model (model_init_kwargs) and IQTrainer patches what it loaded."""
    tok = tokenizer()
    path = tmp_path / "tiny"
    tiny_llama().save_pretrained(path)
    tok.save_pretrained(path)
    train = Dataset.from_list([{"messages": conversation(i)} for i in range(2)])
    args = iq_config(tmp_path / "out", model_init_kwargs={"dtype": "bfloat16"})
    trainer = IQTrainer(str(path), args=args, train_dataset=train)
    assert trainer.model.dtype == torch.bfloat16 and is_fastirl_applied(trainer.model)
    trainer.train()
    # a bf16 model: bf16 GEMMs, the loss in float32 (the accumulation dtype)
    assert spy and spy[0]["hidden_dtype"] == torch.bfloat16
    assert spy[0]["out"][0].dtype == torch.float32


def test_is_expert_and_done_columns_reach_the_loss(tmp_path, spy):
    """Pre-tokenized rows with is_expert and done: collated (done padded like
    labels) and passed to the objective (online form, explicit terminals)."""
    from fastirl import reference
    from fastirl.integrations.transformers import shift_labels
    rows = [{"input_ids": [4, 8, 10, 11, 12, 6], "labels": [-100, -100, 10, 11, 12, 6],
             "is_expert": True, "done": [False, False, False, True, False, False]},
            {"input_ids": [4, 9, 13, 14], "labels": [-100, 9, 13, 14],
             "is_expert": False, "done": [False, False, False, True]}]
    args = iq_config(tmp_path, per_device_train_batch_size=2)
    trainer = IQTrainer(tiny_llama(), args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=tokenizer())
    batch = first_batch(trainer)
    assert batch["done"].shape == batch["labels"].shape
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    call = spy[-1]
    assert sorted(call["is_expert"].tolist()) == [False, True]
    done_rows = torch.zeros_like(batch["done"])
    done_rows[:, :-1] = batch["done"][:, 1:]
    torch.testing.assert_close(call["done"], done_rows)
    naive = tiny_llama()
    logits = naive(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = reference.iq_loss_from_logits(logits.double(), shift_labels(batch["labels"]),
                                         is_expert=batch["is_expert"], done=done_rows, **OPTIONS)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
