"""PEFT on a patched model: LoRA on attention / MLP, modules_to_save=["lm_head"],
LoRA on the LM head (trained exactly as [h, s drop(h) A^T] @ [W, B]^T).  Loss and
the gradient of every trainable parameter against the naive loss on the model's
own logits."""

from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fastirl.integrations import (apply_fastirl, extract_rewards, is_fastirl_applied,  # noqa: E402
                                  unapply_fastirl)

from _hf import (LLAMA, assert_grads_close, grads, reference_loss,  # noqa: E402
                 reference_rewards, tiny_llama)

logging.getLogger("transformers").setLevel(logging.ERROR)
transformers.logging.set_verbosity_error()
OPTIONS = dict(td_weight=0.3, gamma=0.9)


def padded_batch(B=3, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, LLAMA["vocab_size"], (B, T), generator=g)
    attn = torch.ones_like(ids)
    attn[1, T - 3:] = 0
    ids = ids.masked_fill(attn == 0, 0)
    labels = ids.masked_fill(attn == 0, -100)
    labels[0, :3] = -100                                 # a prompt
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def fused_vs_naive(model, batch, seed=0):
    """(fused loss, its grads, naive loss, its grads) of a PEFT model, with the
    same dropout masks (same seed; the backbone draws no random numbers)."""
    model.train()
    apply_fastirl(model, backend="torch", **OPTIONS)
    assert is_fastirl_applied(model)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    got = grads(model)
    model.zero_grad()
    unapply_fastirl(model)
    torch.manual_seed(seed)
    want = reference_loss(model, batch, **OPTIONS)
    want.backward()
    return loss, got, want, grads(model)


def lora(**kwargs):
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kwargs})


@pytest.mark.parametrize("case", [
    dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], lora_dropout=0.1),
    dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    dict(target_modules=["q_proj", "lm_head"], lora_dropout=0.2),
    dict(target_modules=["lm_head"], lora_bias=True),
], ids=["attention_mlp", "modules_to_save_head", "lora_head_dropout", "lora_head_bias"])
def test_adapters_train_exactly(case):
    model = peft.get_peft_model(tiny_llama(), lora(**case))
    loss, got, want, want_grads = fused_vs_naive(model, padded_batch())
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable
    assert_grads_close(got, want_grads)
    if "lm_head" in case["target_modules"]:
        assert any("lm_head.lora_B" in n for n in got)
    if case.get("modules_to_save"):
        assert any("lm_head.modules_to_save" in n for n in got)


def test_two_active_lora_adapters_on_the_head():
    model = peft.get_peft_model(tiny_llama(), lora(target_modules=["lm_head"]))
    model.add_adapter("second", lora(target_modules=["lm_head"], r=2))
    model.base_model.set_adapter(["default", "second"])
    for name, p in model.named_parameters():           # set_adapter may freeze one
        if "lora_" in name:
            p.requires_grad_(True)
    loss, got, want, want_grads = fused_vs_naive(model, padded_batch())
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert any("second" in n for n in got) and any("default" in n for n in got)
    assert_grads_close(got, want_grads)


def test_merged_and_disabled_head_adapters():
    model = peft.get_peft_model(tiny_llama(), lora(target_modules=["lm_head"]))
    batch = padded_batch()
    with model.disable_adapter():
        apply_fastirl(model, backend="torch", **OPTIONS)
        got = model(**batch).loss
        unapply_fastirl(model)
        want = reference_loss(model, batch, **OPTIONS)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    model.merge_adapter()
    apply_fastirl(model, backend="torch", **OPTIONS)
    got = model(**batch).loss
    unapply_fastirl(model)
    torch.testing.assert_close(got.double(), reference_loss(model, batch, **OPTIONS),
                               rtol=1e-5, atol=1e-6)


def test_dora_on_the_head_is_refused_with_alternatives():
    model = peft.get_peft_model(tiny_llama(), lora(target_modules=["lm_head"], use_dora=True))
    with pytest.raises(TypeError, match="(?s)PEFT LoRA.*DoRA.*modules_to_save"):
        apply_fastirl(model, backend="torch")
    assert not is_fastirl_applied(model)


def test_iq_trainer_names_the_alternatives_to_lora_on_the_head(tmp_path):
    datasets = pytest.importorskip("datasets")
    from fastirl.integrations import IQConfig, IQTrainer

    from _hf import conversation, tokenizer
    args = IQConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False)
    train = datasets.Dataset.from_list([{"messages": conversation(0)}])
    with pytest.raises(ValueError, match="(?s)LoRA on the LM head.*modules_to_save.*apply_fastirl"):
        IQTrainer(tiny_llama(), args, train_dataset=train, processing_class=tokenizer(),
                  peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))


def test_sharded_head_with_an_adapter_is_refused():
    """A head that must be gathered through its own forward (ZeRO-3 weight, or an
    FSDP2 unit) and carries a PEFT adapter: a clear error, not a wrong loss."""
    model = peft.get_peft_model(tiny_llama(), lora(target_modules=["lm_head"]))
    apply_fastirl(model, backend="torch")
    model.get_base_model().lm_head.base_layer.weight.ds_id = 0     # as ZeRO-3 marks it
    with pytest.raises(TypeError, match="sharded.*PEFT adapter"):
        model(**padded_batch())


@pytest.mark.parametrize("patched", [False, True])
def test_rewards_read_the_lora_adapted_head(patched):
    """extract_rewards goes through the loss's head path: with LoRA on lm_head the
    rewards are those of the adapted model's own logits, not the base head's."""
    model = peft.get_peft_model(tiny_llama(), lora(target_modules=["q_proj", "lm_head"],
                                                   lora_dropout=0.2))
    model.train()                                  # extract_rewards: eval, no adapter dropout
    if patched:
        apply_fastirl(model, backend="torch", gamma=0.9)
    batch = padded_batch()
    got = extract_rewards(model, batch, gamma=None if patched else 0.9).double()
    assert model.training
    model.eval()
    if patched:
        unapply_fastirl(model)
    want = reference_rewards(model, batch, 0.9)
    head = model.get_base_model().lm_head
    head.enable_adapters(False)                        # the base head (q_proj still adapted)
    base_head = reference_rewards(model, batch, 0.9)
    head.enable_adapters(True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - base_head).abs().max() > 0.1
