"""Fine-tune a tiny Llama on Python's standard library: MLE vs IQ-Learn, logits vs fastirl.

Everything is offline: the text is the Python standard library's own sources
(read from ``os.path.dirname(os.__file__)``), the tokenizer is the 32k-token
SentencePiece model shipped inside the ``mistral-common`` wheel (read as a file
with ``sentencepiece``; mistral-common itself is not imported), and the model is
a tiny Llama built from a config (random initialisation, no download).

Four runs with the same initialisation, data order and optimiser, each in a
fresh process (so peak memory is its own):

    MLE  / HF logits   plain ``transformers.Trainer``: the model's own cross-entropy on logits
    MLE  / fastirl     ``IQTrainer`` with td_weight=0 (exactly the cross-entropy, fused)
    IQ   / naive       ``IQTrainer(fused_loss=False)``: logits + the naive IQ loss (fastirl.reference)
    IQ   / fastirl     ``IQTrainer``: the IQ loss fused with the LM head, no logits

Reported: validation NLL (token cross-entropy on held-out stdlib files),
diversity of sampled continuations (distinct-n, self-BLEU-4), training
tokens/s and peak memory of the training steps.  Writes a PNG of the curves and
a JSON of the results next to this script.

    pip install "fastirl[hf]" sentencepiece mistral-common matplotlib
    python examples/hf_stdlib_llama.py              # ~10 min on 2 idle CPU cores (--steps 50: ~5)
    python examples/hf_stdlib_llama.py --steps 5    # smoke test
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import glob
import importlib.util
import json
import math
import multiprocessing as mp
import os
import resource
import tempfile
import time

import torch

from fastirl.bench.memory import status_kib

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = [  # name, kind, loss options
    ("MLE / HF logits", "hf", dict(td_weight=0.0)),
    ("MLE / fastirl", "iq", dict(td_weight=0.0)),
    ("IQ / naive logits", "iq-naive", dict()),
    ("IQ / fastirl", "iq", dict()),
]


# ----------------------------------------------------------------------------- data


def tokenizer_path() -> str:
    """The SentencePiece model inside the mistral-common wheel (found without importing it)."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this example reads the tokenizer shipped in the mistral-common wheel: "
                         "pip install mistral-common sentencepiece")
    path = os.path.join(spec.submodule_search_locations[0], "data", "tokenizer.model.v1")
    if not os.path.exists(path):
        raise SystemExit(f"tokenizer file not found: {path}")
    return path


def stdlib_files() -> list[str]:
    root = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(root, "*.py")) +
                   glob.glob(os.path.join(root, "*", "*.py")))
    skip = ("site-packages", f"{os.sep}test", "idlelib", "lib2to3", "__phello__")
    return [f for f in files if not any(s in f for s in skip)]


def build_data(train_tokens: int, val_tokens: int, seq_len: int) -> dict:
    """Blocks of seq_len tokens; files are joined with BOS/EOS.  Every 8th file
    is held out for validation."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path())
    train, val = [], []
    n_files = 0
    for i, path in enumerate(stdlib_files()):
        if len(train) >= train_tokens and len(val) >= val_tokens:
            break
        dest, budget = (val, val_tokens) if i % 8 == 7 else (train, train_tokens)
        if len(dest) >= budget:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            dest.extend([sp.bos_id()] + sp.encode(f.read()) + [sp.eos_id()])
        n_files += 1
    blocks = lambda ids: torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)  # noqa: E731
    return {"train": blocks(train[:train_tokens]), "val": blocks(val[:val_tokens]),
            "vocab": sp.vocab_size(), "bos": sp.bos_id(), "eos": sp.eos_id(),
            "n_files": n_files}


# ----------------------------------------------------------------------------- metrics


def distinct_n(samples: list[list[int]], n: int) -> float:
    grams = [tuple(s[i:i + n]) for s in samples for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def bleu(hyp: list[int], refs: list[list[int]], max_n: int = 4) -> float:
    """Sentence BLEU-max_n with clipped counts against several references,
    epsilon smoothing of zero precisions, brevity penalty to the closest length."""
    if not hyp:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        h = collections.Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        if not h:
            log_p += math.log(1e-9) / max_n
            continue
        best = collections.Counter()
        for r in refs:
            for g, c in collections.Counter(tuple(r[i:i + n])
                                            for i in range(len(r) - n + 1)).items():
                best[g] = max(best[g], c)
        clipped = sum(min(c, best[g]) for g, c in h.items())
        log_p += math.log(max(clipped, 0.1) / sum(h.values())) / max_n
    closest = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if len(hyp) > closest else math.exp(1 - closest / len(hyp))
    return bp * math.exp(log_p)


def self_bleu(samples: list[list[int]]) -> float:
    return sum(bleu(s, samples[:i] + samples[i + 1:]) for i, s in enumerate(samples)) / len(samples)


@torch.no_grad()
def validation_nll(model, blocks: torch.Tensor, batch_size: int = 16,
                   backend: str = "auto") -> float:
    """Mean token cross-entropy, fused (td_weight=0 is exactly the cross-entropy)."""
    import fastirl
    from fastirl.integrations.transformers import shift_labels
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = model.lm_head.weight.device
    for x in blocks.split(batch_size):
        x = x.to(device)
        hidden = model.model(input_ids=x, use_cache=False).last_hidden_state
        targets = shift_labels(x)
        total += fastirl.iq_loss(hidden, model.lm_head.weight, targets, td_weight=0.0,
                                 reduction="sum", backend=backend).item()
        count += int((targets != -100).sum())
    model.train(was_training)
    return total / count


@torch.no_grad()
def sample(model, prompts: torch.Tensor, new_tokens: int, eos: int, seed: int) -> list[list[int]]:
    torch.manual_seed(seed)
    model.eval()
    out = model.generate(prompts.to(model.device), do_sample=True, temperature=1.0, top_k=0,
                         top_p=1.0, max_new_tokens=new_tokens, pad_token_id=eos,
                         eos_token_id=eos)
    completions = []
    for row in out[:, prompts.shape[1]:].tolist():
        completions.append(row[:row.index(eos)] if eos in row else row)
    return completions


# ----------------------------------------------------------------------------- memory


def reset_peak_memory() -> int:
    """Resets the peak (CUDA max allocated, or the process's VmHWM); returns the
    current usage in bytes."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                      # Linux: reset the peak resident set size
    except OSError:
        pass
    return (status_kib("VmRSS") or 0) * 1024


def peak_memory() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    kb = status_kib("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ----------------------------------------------------------------------------- one run


def run(name: str, kind: str, options: dict, cfg: dict, data_path: str) -> dict:
    """One training run (in its own process)."""
    import transformers
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    from fastirl.integrations import IQConfig, IQTrainer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(cfg["threads"])
    data = torch.load(data_path)
    train = data["train"]

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return train.shape[0]

        def __getitem__(self, i):
            return {"input_ids": train[i], "labels": train[i]}

    transformers.set_seed(cfg["seed"])
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=data["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["hidden"] * 3,
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"], max_position_embeddings=cfg["seq_len"] + 64,
        bos_token_id=data["bos"], eos_token_id=data["eos"], tie_word_embeddings=False))

    curve = {"step": [], "val_nll": [], "train_loss": []}
    timing = {"train_s": 0.0, "t0": 0.0, "cpu_s": 0.0, "c0": 0.0}

    bar = tqdm(total=cfg["steps"], desc=name, unit="step", dynamic_ncols=True)

    class Monitor(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timing["t0"] = time.perf_counter()
            timing["c0"] = time.process_time()

        def on_step_end(self, args, state, control, model=None, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timing["train_s"] += time.perf_counter() - timing["t0"]
            timing["cpu_s"] += time.process_time() - timing["c0"]
            if state.global_step % cfg["eval_every"] == 0 or state.global_step == state.max_steps:
                timing["peak"] = max(timing.get("peak", 0), peak_memory())
                curve["step"].append(state.global_step)
                curve["val_nll"].append(validation_nll(model, data["val"],
                                                       backend=cfg["backend"]))
                bar.set_postfix(val_nll=f"{curve['val_nll'][-1]:.3f}")
            bar.update(1)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                curve["train_loss"].append((state.global_step, logs["loss"]))
                bar.set_postfix(loss=f"{logs['loss']:.3f}", **(
                    {"val_nll": f"{curve['val_nll'][-1]:.3f}"} if curve["val_nll"] else {}))

    common = dict(output_dir=tempfile.mkdtemp(), report_to=[], save_strategy="no",
                  max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                  learning_rate=cfg["lr"], warmup_steps=max(1, cfg["steps"] // 10),
                  lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=cfg["log_every"],
                  seed=cfg["seed"], data_seed=cfg["seed"], dataloader_num_workers=0,
                  use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
    if kind == "hf":
        args = transformers.TrainingArguments(**common)
        trainer = transformers.Trainer(model, args, train_dataset=Blocks())
    else:
        args = IQConfig(**common, fused_loss=(kind == "iq"), loss_backend=cfg["backend"],
                        td_weight=options.get("td_weight", cfg["td_weight"]),
                        bf16=False, gradient_checkpointing=False)   # as the HF run (TRL's
        # SFTConfig, IQConfig's base, defaults to bf16 autocast and checkpointing)
        trainer = IQTrainer(model, args, train_dataset=Blocks())
    trainer.add_callback(Monitor())
    trainer.callback_handler.callbacks = [     # our progress bar instead of the log dumps
        c for c in trainer.callback_handler.callbacks if type(c).__name__ != "PrinterCallback"]

    base = reset_peak_memory()
    load_before = os.getloadavg()[0]
    trainer.train()
    timing["peak"] = max(timing.get("peak", 0), peak_memory())
    bar.close()
    tokens = cfg["steps"] * cfg["batch"] * cfg["seq_len"]

    prompts = data["val"][: cfg["samples"], : cfg["prompt_len"]]
    completions = sample(model, prompts, cfg["new_tokens"], data["eos"], cfg["seed"])
    iq_logs = [h for h in trainer.state.log_history if "td_penalty" in h]
    return {
        "name": name, "kind": kind,
        "val_nll": curve["val_nll"][-1], "curve": curve,
        "tokens_per_s": tokens / timing["train_s"],
        "tokens_per_cpu_s": tokens / timing["cpu_s"],
        "run_cpu_s": time.process_time(),
        "peak_mb": timing["peak"] / 2**20, "base_mb": base / 2**20,
        "distinct_2": distinct_n(completions, 2), "distinct_3": distinct_n(completions, 3),
        "self_bleu": self_bleu(completions),
        "mean_len": sum(map(len, completions)) / len(completions),
        "td_penalty": iq_logs[-1]["td_penalty"] if iq_logs else None,
        "samples": completions[:3],
        "load_avg": (load_before, os.getloadavg()[0]),
    }


# ----------------------------------------------------------------------------- report


def plot(results: list[dict], cfg: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"MLE / HF logits": ("tab:blue", "-"), "MLE / fastirl": ("tab:cyan", "--"),
              "IQ / naive logits": ("tab:red", "-"), "IQ / fastirl": ("tab:orange", "--")}
    for r in results:
        color, ls = styles.get(r["name"], ("k", "-"))
        axes[0].plot(r["curve"]["step"], r["curve"]["val_nll"], ls, color=color, marker="o",
                     markersize=4, label=r["name"])
    axes[0].set(xlabel="optimizer step", ylabel="validation NLL (nats/token)",
                title="Held-out stdlib files")
    axes[0].legend()
    names = [r["name"].replace(" / ", "\n") for r in results]
    colors = [styles.get(r["name"], ("k",))[0] for r in results]
    cpu = cfg["device"].startswith("CPU")
    axes[1].bar(names, [r["tokens_per_cpu_s" if cpu else "tokens_per_s"] for r in results],
                color=colors)
    axes[1].set(ylabel="training tokens per CPU-second" if cpu else "training tokens / s",
                title="Throughput")
    axes[2].bar(names, [r["peak_mb"] - r["base_mb"] for r in results], color=colors)
    axes[2].set(ylabel="MiB above model + data", title="Peak memory of training")
    for ax in axes[1:]:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Tiny Llama ({cfg['params'] / 1e6:.1f}M params, vocab {cfg['vocab']}), "
                 f"{cfg['steps']} steps x {cfg['batch']}x{cfg['seq_len']} tokens, "
                 f"{cfg['device']}, fastirl backend {cfg['backend']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: list[dict]) -> str:
    lines = ["| run | val NLL | distinct-2 | distinct-3 | self-BLEU-4 | tokens/s (wall) | "
             "tokens per CPU-second | peak memory (MiB above model+data) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['val_nll']:.3f} | {r['distinct_2']:.3f} | "
                     f"{r['distinct_3']:.3f} | {r['self_bleu']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_cpu_s']:.0f} | {r['peak_mb'] - r['base_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--td-weight", type=float, default=0.1, help="lambda of the IQ runs")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="auto", help="fastirl backend (auto: fastest available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="all", help="comma-separated indices into the run list")
    p.add_argument("--out", default=os.path.join(HERE, "hf_stdlib_llama"),
                   help="path prefix of the .png and .json outputs")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the .png and reprint the table from an existing .json")
    a = p.parse_args()
    if a.plot_only:
        with open(a.out + ".json") as f:
            saved = json.load(f)
        plot(saved["results"], saved["config"], a.out + ".png")
        print(table(saved["results"]))
        return
    cfg = dict(steps=a.steps, batch=a.batch, seq_len=a.seq_len, hidden=a.hidden, layers=a.layers,
               heads=a.heads, lr=a.lr, td_weight=a.td_weight, samples=a.samples,
               prompt_len=a.prompt_len, new_tokens=a.new_tokens,
               eval_every=a.eval_every, log_every=max(1, a.eval_every // 2), threads=a.threads,
               seed=a.seed, device="CUDA" if torch.cuda.is_available() else
               f"CPU, {a.threads} threads")

    from fastirl.backends import resolve_backend
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg["backend"] = resolve_backend(a.backend, device).name   # builds a native backend once
    t0 = time.time()
    train_tokens = a.steps * a.batch * a.seq_len
    data = build_data(train_tokens, 32 * a.seq_len, a.seq_len)
    if data["train"].shape[0] < a.steps * a.batch:
        print(f"note: {data['train'].shape[0]} training blocks for {a.steps * a.batch} "
              f"sequences: more than one epoch")
    cfg["vocab"] = data["vocab"]
    H, L, Vv = a.hidden, a.layers, data["vocab"]
    cfg["params"] = 2 * Vv * H + L * (4 * H * H + 3 * H * 3 * H + 2 * H) + H
    print(f"data: {data['train'].numel()} training and {data['val'].numel()} validation tokens "
          f"from {data['n_files']} stdlib files ({time.time() - t0:.0f}s); model "
          f"{cfg['params'] / 1e6:.1f}M params, vocab {Vv}; fastirl backend {cfg['backend']}")
    with tempfile.TemporaryDirectory() as tmp:
        data_path = os.path.join(tmp, "data.pt")
        torch.save(data, data_path)
        chosen = RUNS if a.runs == "all" else [RUNS[int(i)] for i in a.runs.split(",")]
        results = []
        for name, kind, options in chosen:
            print(f"== {name}")
            with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                results.append(pool.submit(run, name, kind, options, cfg, data_path).result())
            r = results[-1]
            print(f"   val NLL {r['val_nll']:.3f}, {r['tokens_per_s']:.0f} tokens/s, peak "
                  f"{r['peak_mb'] - r['base_mb']:.0f} MiB above model+data")
    cfg["wall_s"] = time.time() - t0
    cfg["cpu_s"] = sum(r["run_cpu_s"] for r in results)
    cfg["load_avg"] = [r["load_avg"] for r in results]
    plot(results, cfg, a.out + ".png")
    with open(a.out + ".json", "w") as f:
        json.dump({"config": cfg, "results": results}, f, indent=1)
    print(table(results))
    print(f"wrote {a.out}.png and {a.out}.json in {cfg['wall_s']:.0f}s wall; the runs used "
          f"{cfg['cpu_s']:.0f} CPU-seconds ({cfg['cpu_s'] / a.threads:.0f}s on {a.threads} idle "
          f"cores); 1-min load average during the runs: "
          + ", ".join(f"{x:.1f}-{y:.1f}" for x, y in cfg["load_avg"]))


if __name__ == "__main__":
    main()
