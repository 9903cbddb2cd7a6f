"""Tiny Hugging Face pieces for the integration tests, built locally (no hub):
a word-level tokenizer with a chat template ({% generation %} markers for
assistant-only loss), tiny causal LMs from configs, the naive reference loss."""

from __future__ import annotations

import torch
import transformers

from fastirl import reference
from fastirl.integrations.transformers import shift_labels

WORDS = ("hello hi how are you fine thanks what is the weather sunny rainy today tell me a joke "
         "no yes ok bye good bad cat dog one two three four five red blue green").split()
SPECIAL = ["<pad>", "<s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# The assistant's <|end|> is inside the generation block: the model learns to stop.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> {% generation %}"
    "{{ m['content'] }} <|end|>{% endgeneration %} {% else %}<|{{ m['role'] }}|> "
    "{{ m['content'] }} <|end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              bos_token="<s>", eos_token="<|end|>",
                                              unk_token="<unk>")
    tk.chat_template = CHAT_TEMPLATE
    return tk


VOCAB = len(SPECIAL) + len(WORDS)
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             pad_token_id=0, bos_token_id=1, eos_token_id=SPECIAL.index("<|end|>"))


def tiny_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides}))


def conversation(i: int) -> list[dict]:
    """Multi-turn chats of different lengths."""
    w = WORDS
    return [{"role": "user", "content": f"{w[i % 7]} how are you"},
            {"role": "assistant", "content": " ".join(w[(i + k) % len(w)] for k in range(1 + i % 3))},
            {"role": "user", "content": f"tell me a {w[(i * 3) % len(w)]}"},
            {"role": "assistant", "content": " ".join(w[(i * 5 + k) % len(w)]
                                                     for k in range(2 + i % 2))}]


def reference_loss(model, batch: dict, **options) -> torch.Tensor:
    """Naive: the unpatched model's logits -> fastirl.reference (float64)."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**kwargs).logits
    targets = shift_labels(batch["labels"])
    if "position_ids" in batch:                     # packed: no prediction across a boundary
        starts = batch["position_ids"][:, 1:] == 0
        targets[:, :-1] = targets[:, :-1].masked_fill(starts, -100)
    return reference.iq_loss_from_logits(logits.double(), targets,
                                         position_ids=batch.get("position_ids"), **options)


def reference_rewards(model, batch: dict, gamma: float) -> torch.Tensor:
    """Naive rewards from the unpatched model's own (materialised) logits, aligned
    like ``extract_rewards``' (the reward of token t at t, 0 at t = 0), float64."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch.get("attention_mask")).logits.double()
    V = logits.shape[-1]
    rows = reference.implicit_rewards(logits, torch.eye(V, dtype=torch.float64),
                                      shift_labels(batch["labels"]), gamma=gamma)
    out = torch.zeros_like(rows)
    out[:, 1:] = rows[:, :-1]
    return out


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, want, rtol=1e-4):
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for name in want:
        scale = want[name].abs().max().item() + 1e-6
        err = (got[name].double() - want[name].double()).abs().max().item()
        assert err <= rtol * scale + 1e-7, f"{name}: max error {err:.3g} (scale {scale:.3g})"


def launch_workers(script: str, world: int, tmp_path, results: list[str], *, timeout: float,
                   **env_extra) -> list:
    """Runs ``python script --worker RANK PORT TMP`` for every rank (the test file is
    its own worker) and returns ``torch.load`` of each of ``results`` (files the
    workers write under ``tmp_path``); fails the test with the workers' logs."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import pytest
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra, PYTHONPATH=os.pathsep.join(
        [str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = [tmp_path / f"log_{r}.txt" for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, script, "--worker", str(r), str(port), str(tmp_path)],
                env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(root)))
    rcs = []
    try:
        for p in procs:
            try:
                rcs.append(p.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                rcs.append(f"killed after {timeout} s")
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    files = [tmp_path / name for name in results]
    if rcs != [0] * world or not all(f.exists() for f in files):
        pytest.fail(f"workers exited with {rcs}:\n" + "\n---\n".join(
            x.read_text()[-4000:] for x in logs))
    return [torch.load(f) for f in files]
