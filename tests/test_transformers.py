"""Hugging Face integration: apply_fastirl, extract_rewards, online IQTrainer.

Every model is built tiny from a config (no download).  References are the
naive implementation on the model's own logits (fastirl.reference)."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import fastirl  # noqa: E402
from fastirl import reference  # noqa: E402
from fastirl.integrations import (IQConfig, IQTrainer, apply_fastirl, extract_rewards,  # noqa: E402
                                  is_fastirl_applied, unapply_fastirl)
from fastirl.integrations.transformers import mix_batches, shift_labels  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
transformers.logging.set_verbosity_error()

V = 97
_LLAMA_LIKE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", _LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA_LIKE, head_dim=8)),
    # A small cap so that soft-capping changes the logits a lot.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(_LLAMA_LIKE, head_dim=8, final_logit_softcapping=0.5)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                  eos_token_id=2)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _LLAMA_LIKE),
    # Logit scaling: logits / 4 (Granite) and logits * 0.25 (Cohere, tied weights).
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(_LLAMA_LIKE, logits_scaling=4.0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_LLAMA_LIKE, logit_scale=0.25)),
}
OPTIONS = dict(td_weight=0.3, gamma=0.9)
# The integration is tested on the pure-PyTorch backend (no build step); the
# backends themselves are tested elsewhere.  test_mle_equals_hf_loss uses "auto".
BACKEND = "torch"


def tiny(arch: str = "llama", seed: int = 0):
    config_cls, model_cls, kwargs = ARCHS[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    return model.eval()


def batch(B=3, T=10, seed=1):
    """Right-padded batch with a prompt (ignored labels) in row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    attn = torch.ones_like(ids)
    if B > 1:
        attn[1, T - 3:] = 0
    if B > 2:
        attn[2, 4:] = 0
    ids = ids.masked_fill(attn == 0, 0)
    labels = ids.masked_fill(attn == 0, -100)
    labels[0, :3] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def reference_loss(model, b, **options):
    """Naive: the unpatched model's logits -> reference.iq_loss_from_logits (float64)."""
    assert not is_fastirl_applied(model)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return reference.iq_loss_from_logits(logits.double(), shift_labels(b["labels"]), **options)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, want, rtol=1e-4):
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().item() + 1e-6
        err = (got[name].double() - want[name].double()).abs().max().item()
        assert err <= rtol * scale + 1e-7, f"{name}: max error {err:.3g} (scale {scale:.3g})"


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                    loss_backend=BACKEND, bf16=False, gradient_checkpointing=False,
                    disable_tqdm=True, per_device_train_batch_size=4, max_steps=1,
                    dataloader_num_workers=0, seed=0)
    return IQConfig(**{**defaults, **kwargs})


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def rows_of(b):
    return [{k: v[i] for k, v in b.items()} for i in range(b["input_ids"].shape[0])]


def iq_trainer(model, args, rows=None):
    """IQTrainer (TRL) on pre-tokenized rows (unpadded lists: TRL's collator pads)."""
    from _hf import tokenizer
    rows = rows or _padded_rows(n=2)
    data = datasets.Dataset.from_list([
        {"input_ids": r["input_ids"][r["attention_mask"].bool()].tolist(),
         "labels": r["labels"][r["attention_mask"].bool()].tolist()} for r in rows])
    return IQTrainer(model, args, train_dataset=data, processing_class=tokenizer())


# ----------------------------------------------------------------------------- apply_fastirl


@pytest.mark.parametrize("arch", list(ARCHS))
def test_patched_model_matches_reference(arch):
    model, b = tiny(arch), batch()
    ref_model = copy.deepcopy(model)
    want = reference_loss(ref_model, b, **OPTIONS)
    want.backward()

    apply_fastirl(model, backend=BACKEND, **OPTIONS)
    out = model(**b)
    assert out.logits is None
    assert torch.allclose(out.loss.double(), want, rtol=1e-5, atol=1e-6), (out.loss, want)
    out.loss.backward()
    assert_grads_close(grads(model), grads(ref_model))
    if arch == "gemma2":     # soft-cap taken from the config
        assert model._fastirl_state.options["softcap"] == 0.5


def test_mle_equals_hf_loss_and_unapply_restores_it():
    model, b = tiny(), batch()
    hf = model(**b)
    apply_fastirl(model, td_weight=0.0)
    assert "forward" in model.__dict__
    iq = model(**b)
    assert iq.logits is None
    torch.testing.assert_close(iq.loss, hf.loss, rtol=1e-5, atol=1e-6)
    unapply_fastirl(model)
    assert "forward" not in model.__dict__ and not is_fastirl_applied(model)
    back = model(**b)
    assert back.logits is not None
    torch.testing.assert_close(back.loss, hf.loss)


def test_generate_and_signature_unchanged():
    import inspect
    model = tiny()
    prompt = torch.tensor([[1, 5, 9, 11]])
    want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    apply_fastirl(model)
    params = inspect.signature(model.forward).parameters
    for name in ("input_ids", "labels", "logits_to_keep", "is_expert", "num_items_in_batch"):
        assert name in params
    assert model(input_ids=prompt).logits.shape == (1, 4, V)       # no labels: original forward
    torch.testing.assert_close(model.generate(prompt, max_new_tokens=6, do_sample=False), want)


def test_deepcopy_of_patched_model_uses_its_own_weights():
    model, b = tiny(), batch()
    apply_fastirl(model, backend=BACKEND, **OPTIONS)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.mul_(2.0)
    assert clone.forward.__self__ is clone
    assert not torch.allclose(clone(**b).loss, model(**b).loss)


def test_options_update_and_validation():
    model, b = tiny(), batch()
    apply_fastirl(model, td_weight=0.0)
    apply_fastirl(model, backend=BACKEND, **OPTIONS)     # re-applying updates the options
    plain = unapply_fastirl(copy.deepcopy(model))
    torch.testing.assert_close(model(**b).loss.double(), reference_loss(plain, b, **OPTIONS),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        apply_fastirl(model, lambda_=0.1)
    with pytest.raises(ValueError, match="gamma"):
        apply_fastirl(model, gamma=2.0)


def test_fused_false_is_the_naive_baseline():
    model, b = tiny("gemma2"), batch()
    naive = copy.deepcopy(model)
    apply_fastirl(model, backend=BACKEND, **OPTIONS)
    apply_fastirl(naive, fused=False, backend=BACKEND, **OPTIONS)
    got, want = model(**b, return_metrics=True), naive(**b, return_metrics=True)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for k in ("nll", "reward", "entropy", "accuracy"):
        torch.testing.assert_close(got.iq_metrics[k].float(), want.iq_metrics[k].float(),
                                   rtol=1e-4, atol=1e-5)
    got.loss.backward()
    want.loss.backward()
    assert_grads_close(grads(model), grads(naive))


def test_packed_batch_uses_position_ids():
    """Two sequences packed in one row: no value is bootstrapped and no token is
    predicted across the boundary, with or without a -100 label at the start."""
    model = tiny()
    ids = torch.randint(3, V, (1, 12), generator=torch.Generator().manual_seed(3))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    apply_fastirl(model, backend=BACKEND, **OPTIONS)
    loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
    flattened = ids.clone()
    flattened[0, 5] = -100                             # DataCollatorWithFlattening style
    loss2 = model(input_ids=ids, position_ids=pos, labels=flattened).loss
    hidden = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    targets = shift_labels(ids)
    targets[0, 4] = -100                               # row 4 would predict the next start
    W = model.lm_head.weight.double()
    want = reference.iq_loss(hidden.double(), W, targets, position_ids=pos, **OPTIONS)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss2.double(), want, rtol=1e-5, atol=1e-6)
    # A naive shift over the whole row predicts and bootstraps across the boundary.
    naive = reference.iq_loss(hidden.double(), W, shift_labels(ids), **OPTIONS)
    assert not torch.allclose(naive, want)


def test_bf16_autocast_and_mixed_dtypes():
    model, b = tiny(), batch()
    apply_fastirl(model, backend=BACKEND, **OPTIONS)
    want = model(**b).loss.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**b).loss
    assert loss.dtype == torch.float32          # bf16 GEMMs, the loss accumulated in float32
    loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32
    assert torch.isfinite(model.lm_head.weight.grad).all()
    torch.testing.assert_close(loss.float(), want, rtol=3e-2, atol=3e-2)
    # Backbone in bf16, head in fp32, no autocast: the hidden states are cast to fp32.
    model.zero_grad()
    model.model.to(torch.bfloat16)
    loss = model(**b).loss
    assert loss.dtype == torch.float32
    loss.backward()
    torch.testing.assert_close(loss.detach(), want, rtol=3e-2, atol=3e-2)


def test_bf16_autocast_fp32_head_matches_naive_under_the_same_autocast():
    """The patched forward calls fastirl.iq_loss under the caller's autocast (the
    loss handles it): the fp32 head's gradient is float32 and equals, within
    bf16 tolerance, the naive loss on the logits of the same autocast forward."""
    model, b = tiny(), batch()
    model.train()
    naive = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = naive(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        assert logits.dtype == torch.bfloat16                  # the head ran in bf16
        want = reference.iq_loss_from_logits(logits.double(), shift_labels(b["labels"]),
                                             **OPTIONS)
    want.backward()
    apply_fastirl(model, backend=BACKEND, **OPTIONS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**b).loss
    loss.backward()
    assert loss.dtype == torch.float32
    got_w, want_w = model.lm_head.weight.grad, naive.lm_head.weight.grad
    assert got_w.dtype == torch.float32 and want_w.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=2e-2, atol=2e-2)
    scale = want_w.abs().max()
    assert (got_w - want_w).abs().max() <= 2e-2 * scale, ((got_w - want_w).abs().max(), scale)
    # and it is not the float32 gradient (the GEMMs did run in bf16)
    fp32 = copy.deepcopy(naive)
    fp32.zero_grad()
    reference_loss(fp32, b, **OPTIONS).backward()
    assert not torch.equal(got_w, fp32.lm_head.weight.grad)


def test_extract_rewards_match_reference():
    model, b = tiny("gemma2"), batch()
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    targets = shift_labels(b["labels"])
    rows = reference.implicit_rewards(logits.double(), torch.eye(V, dtype=torch.float64),
                                      targets, gamma=0.9)
    got = extract_rewards(model, b, gamma=0.9)
    assert got.shape == b["input_ids"].shape and got.dtype == torch.float32
    torch.testing.assert_close(got[:, 1:].double(), rows[:, :-1], rtol=1e-4, atol=1e-5)
    assert (got[:, 0] == 0).all() and (got[b["labels"] == -100] == 0).all()
    # gamma = 1: the rewards of a response sum to log p(response) + V_0 (spec identity).
    r = extract_rewards(model, {"input_ids": b["input_ids"][:1]})
    logp = torch.log_softmax(logits[:1].double(), -1)
    ll = logp[0, :-1].gather(-1, b["input_ids"][0, 1:, None]).sum()
    v0 = torch.logsumexp(logits[0, 0].double(), -1)
    torch.testing.assert_close(r.sum().double(), ll + v0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", ["BertModel", "BertForMaskedLM", "T5ForConditionalGeneration"])
def test_unsupported_models_raise_clearly(make):
    if make.startswith("Bert"):
        model = getattr(transformers, make)(transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=16))
        match = "LM head" if make == "BertModel" else "cannot reproduce the logits"
    else:
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=50, d_model=16, d_ff=16, num_layers=1, num_heads=2, d_kv=8))
        match = "encoder-decoder"
    with pytest.raises(TypeError, match=match):
        apply_fastirl(model)
    assert not is_fastirl_applied(model)


# ----------------------------------------------------------------------------- Trainer
# IQTrainer (TRL) is tested in tests/test_trl.py.


def _padded_rows(n=8, T=12, seed=5):
    """Sequences of different lengths, pre-padded (no collator needed)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        L = 3 + (i * 5) % (T - 2)
        ids = torch.zeros(T, dtype=torch.long)
        ids[:L] = torch.randint(3, V, (L,), generator=g)
        attn = (torch.arange(T) < L).long()
        rows.append({"input_ids": ids, "attention_mask": attn,
                     "labels": ids.masked_fill(attn == 0, -100)})
    return rows


def test_plain_trainer_trains_a_patched_model(tmp_path):
    """Any loop works unchanged: a vanilla transformers.Trainer on a patched model
    reports the IQ loss."""
    rows = _padded_rows(n=4)
    b = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    model = tiny()
    apply_fastirl(model, backend=BACKEND, **OPTIONS)
    with torch.no_grad():
        want = model(**b).loss.item()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, per_device_train_batch_size=4, max_steps=1, logging_steps=1,
        learning_rate=1e-9)
    trainer = transformers.Trainer(model, args, train_dataset=ListDataset(rows))
    trainer.train()
    assert math.isclose(trainer.state.log_history[0]["loss"], want, rel_tol=1e-4)


# ----------------------------------------------------------------------------- online mode


def test_online_mode_mixes_policy_samples(tmp_path, monkeypatch):
    calls = []
    real = fastirl.iq_loss

    def spy(hidden, weight, targets, **kwargs):
        calls.append(dict(hidden=hidden, targets=targets.clone(), **kwargs))
        return real(hidden, weight, targets, **kwargs)

    monkeypatch.setattr(fastirl, "iq_loss", spy)
    model = tiny()
    trainer = iq_trainer(model, config(tmp_path, online_mix=1.0, online_every=2, max_new_tokens=4,
                                       **OPTIONS))
    generated = []
    real_generate = model.generate

    def generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        generated.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone(), out))
        return out

    monkeypatch.setattr(model, "generate", generate)
    b = batch(B=2, T=8)
    b["labels"][1, :2] = -100                          # prompts: 3 and 2 tokens
    model.train()

    trainer.state.global_step = 0
    loss = trainer.compute_loss(model, b)
    assert len(generated) == 1
    call = calls[-1]
    assert call["is_expert"].tolist() == [True, True, False, False]
    prompts, _, out = generated[0]
    # Prompts are the tokens before the first label, left-padded for generation.
    assert prompts[0, -3:].tolist() == b["input_ids"][0, :3].tolist()
    assert prompts[1, -2:].tolist() == b["input_ids"][1, :2].tolist()
    targets = call["targets"]
    for i, P in ((0, 3), (1, 2)):
        completion = out[i, prompts.shape[1]:]
        row = targets[2 + i]
        # Rows before the prompt's last token predict nothing; then the completion.
        assert (row[:P - 1] == -100).all()
        n = int((row != -100).sum())
        assert 1 <= n <= 4
        assert row[P - 1:P - 1 + n].tolist() == completion[:n].tolist()
    # The online objective (value term over all rows, normalised per micro-batch).
    want = reference.iq_loss(call["hidden"].double(), model.lm_head.weight.double(), targets,
                             is_expert=call["is_expert"], done=call["done"], **OPTIONS)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, reference.iq_loss(
        call["hidden"].double(), model.lm_head.weight.double(), targets, **OPTIONS))

    trainer.state.global_step = 1                      # between sampling steps: replay
    trainer.compute_loss(model, b)
    assert len(generated) == 1
    torch.testing.assert_close(calls[-1]["targets"], targets)
    trainer.state.global_step = 2
    trainer.compute_loss(model, b)
    assert len(generated) == 2


def test_mix_batches_pads_and_flags():
    expert = batch(B=2, T=5)
    samples = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7]]),
               "attention_mask": torch.ones(1, 7, dtype=torch.long),
               "labels": torch.tensor([[-100, -100, 3, 4, 5, 6, 7]])}
    mixed = mix_batches(expert, samples, pad_token_id=0)
    assert mixed["input_ids"].shape == (3, 7)
    assert mixed["is_expert"].tolist() == [True, True, False]
    assert (mixed["labels"][:2, 5:] == -100).all() and (mixed["attention_mask"][:2, 5:] == 0).all()
    with pytest.raises(ValueError, match="extra keys"):
        mix_batches({**expert, "pixel_values": torch.zeros(2, 3)}, samples)


def test_online_trainer_runs_with_accumulation(tmp_path):
    rows = _padded_rows(n=4)
    args = config(tmp_path, online_mix=0.5, online_every=1, max_new_tokens=3, max_steps=2,
                  per_device_train_batch_size=2, gradient_accumulation_steps=2, logging_steps=1,
                  **OPTIONS)
    trainer = iq_trainer(tiny(), args, rows)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "online_samples" in h]
    assert len(logs) == 2
    assert all(h["online_samples"] == 1 and math.isfinite(h["loss"]) for h in logs)


@pytest.mark.gpu
def test_cuda_bf16_autocast_matches_fp32():
    """CUDA: under bf16 autocast the fused loss runs in bf16 on the (fp32) head
    weight and stays close to the fp32 loss, which matches the reference."""
    model, b = tiny().cuda(), {k: v.cuda() for k, v in batch().items()}
    want = reference_loss(copy.deepcopy(model), b, **OPTIONS)
    apply_fastirl(model, **OPTIONS)                    # backend "auto" on CUDA
    fp32 = model(**b).loss
    torch.testing.assert_close(fp32.double(), want, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**b).loss
    assert loss.dtype == torch.float32                # bf16 GEMMs, the loss in float32
    loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32
    assert torch.isfinite(model.lm_head.weight.grad).all()
    torch.testing.assert_close(loss.float(), fp32.detach(), rtol=3e-2, atol=3e-2)
