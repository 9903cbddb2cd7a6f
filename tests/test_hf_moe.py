"""MoE models: the patched forward adds the router load-balancing loss exactly as
the model's own forward does (tiny Mixtral and Qwen3-MoE)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastirl.integrations import apply_fastirl, unapply_fastirl  # noqa: E402

from _hf import LLAMA, assert_grads_close, grads, reference_loss  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
transformers.logging.set_verbosity_error()

MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       head_dim=8)),
}


def tiny_moe(arch, **overrides):
    config_cls, model_cls, extra = MOE[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**LLAMA, **extra, "output_router_logits": True,
                                                  "router_aux_loss_coef": 0.5, **overrides})
    return getattr(transformers, model_cls)(config)


def padded_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, LLAMA["vocab_size"], (2, 8), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 5:] = 0                                     # padding is left out of the aux loss
    labels = ids.masked_fill(attn == 0, -100)
    labels[0, :2] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


@pytest.mark.parametrize("arch", list(MOE))
def test_td_weight_zero_equals_the_models_own_loss(arch):
    model, batch = tiny_moe(arch), padded_batch()
    model.train()
    own = model(**batch)
    own.loss.backward()
    want_grads = grads(model)
    model.zero_grad()
    apply_fastirl(model, backend="torch", td_weight=0.0)
    out = model(**batch)
    assert out.logits is None and out.aux_loss is not None and out.aux_loss.item() > 0
    torch.testing.assert_close(out.aux_loss, own.aux_loss)
    torch.testing.assert_close(out.loss, own.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert_grads_close(grads(model), want_grads, rtol=1e-4)
    # Without router logits (argument or config), no aux loss, as in the model.
    no_aux = model(**batch, output_router_logits=False)
    assert no_aux.aux_loss is None
    assert not math.isclose(no_aux.loss.item(), out.loss.item())


@pytest.mark.parametrize("arch", ["mixtral"])
def test_iq_loss_plus_aux_loss(arch):
    model, batch = tiny_moe(arch), padded_batch()
    model.train()
    options = dict(td_weight=0.3, gamma=0.9)
    apply_fastirl(model, backend="torch", **options)
    out = model(**batch)
    unapply_fastirl(model)
    aux = model(**{k: v for k, v in batch.items() if k != "labels"}).aux_loss
    want = reference_loss(model, batch, **options) + 0.5 * aux.double()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)


def test_iq_trainer_trains_and_logs_the_aux_loss(tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    from fastirl.integrations import IQConfig, IQTrainer

    from _hf import conversation, tokenizer
    train = datasets.Dataset.from_list([{"messages": conversation(i)} for i in range(4)])
    args = IQConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                    gradient_checkpointing=False, save_strategy="no", disable_tqdm=True,
                    per_device_train_batch_size=2, max_steps=1, logging_steps=1,
                    loss_backend="torch", router_aux_loss_coef=0.25)
    trainer = IQTrainer(tiny_moe("mixtral", output_router_logits=False), args,
                        train_dataset=train, processing_class=tokenizer())
    assert trainer.aux_loss_enabled               # TRL's switch, honoured by the patch
    # TRL's coefficient (0.25), not the model config's (0.5), weighs the aux loss.
    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    loss = trainer.compute_loss(model, batch)
    out = model(**batch, output_router_logits=True)
    iq = out.loss - 0.5 * out.aux_loss
    torch.testing.assert_close(loss, iq + 0.25 * out.aux_loss)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["aux_loss"] > 0 and "td_penalty" in log
