"""Resources of one training step: peak memory above the loaded model and
tokens/s, for the model's own cross-entropy, fastirl's MLE, the naive IQ loss on
the logits and fastirl's fused IQ loss, each in a fresh process."""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time

import torch

from .task import Problem, chat_example


def _rss_reset() -> int:
    from fastirl.bench.memory import status_kib
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                        # Linux: reset the peak resident set size
    except OSError:
        pass
    return (status_kib("VmRSS") or 0) * 1024


def _rss_peak() -> int:
    from fastirl.bench.memory import status_kib
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return (status_kib("VmHWM") or 0) * 1024


def _resource_variant(model_path: str, batch: dict, options: dict | None, cfg: dict) -> dict:
    """Training steps of one loss path, in a fresh process: peak resident memory
    above the loaded model (VmHWM; on CUDA the allocator's peak) and the time of a step."""
    import transformers
    from fastirl.integrations import apply_fastirl
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(cfg["threads"])
    model = torch.load(model_path, weights_only=False)
    model.train()
    if options is not None:
        apply_fastirl(model, backend=cfg["backend"], **options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    before = _rss_reset()
    times = []
    for _ in range(cfg["resource_steps"]):
        t0 = time.perf_counter()
        with torch.autocast(model.device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    tokens = int(batch["attention_mask"].sum())
    return {"loss": loss.item(), "tokens": tokens, "shape": list(batch["input_ids"].shape),
            "peak_mib": (_rss_peak() - before) / 2**20, "step_s": times,
            "tokens_per_s": tokens / statistics.median(times[1:] or times)}


def resources(base, tok, train: list[Problem], cfg: dict) -> list[dict]:
    """Training steps (forward, backward, AdamW) on the same batch of
    ``cfg['batch']`` chat examples under bf16 autocast, each loss path in a fresh
    process: the peak memory above the loaded model (it includes the gradients
    and AdamW's state, the same for every path) and tokens/s (median step after
    the first)."""
    import concurrent.futures as cf
    import multiprocessing as mp
    rng = random.Random(cfg["seed"])
    rows = []
    for p in train[:cfg["batch"]]:
        ex = chat_example(p, rng)
        prompt = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        full = tok.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True,
                                       return_dict=True)["input_ids"]
        rows.append((full, len(prompt)))
    width = max(len(f) for f, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for j, (full, n) in enumerate(rows):
        ids[j, :len(full)] = torch.tensor(full)
        mask[j, :len(full)] = 1
        labels[j, n:len(full)] = ids[j, n:len(full)]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    lam = cfg["resource_td_weight"]
    variants = [("MLE, HF logits", None), ("MLE, fastirl", dict(td_weight=0.0)),
                ("IQ, naive loss on logits", dict(td_weight=lam, fused=False)),
                ("IQ, fastirl", dict(td_weight=lam))]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        torch.save(base, path)
        for name, options in variants:
            with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                r = pool.submit(_resource_variant, path, batch, options, cfg).result()
            out.append({"name": name, **r})
            print(f"[resources] {name}: loss {r['loss']:.4f}, {r['tokens_per_s']:.0f} tokens/s, "
                  f"peak {r['peak_mib']:.0f} MiB above the model", flush=True)
    return out

