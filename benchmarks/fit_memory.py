"""The longest sequence whose training step fits a memory budget.

For real architectures built from their published configurations with random
weights (no download), in bf16 with gradient checkpointing and batch 1, full
fine-tuning (AdamW) and LoRA (r=16 on the attention and MLP projections): the
longest sequence T (a multiple of 256) whose training step (forward, backward,
optimizer step) stays within a budget of B GiB above the model, for each loss:

    hf          the model's own cross-entropy (``model(ids, labels=ids)``: logits, then CE)
    cce         Cut Cross-Entropy's ``linear_cross_entropy`` on the backbone's hidden
                states (cut-cross-entropy 25.1 has no transformers patch; impl "cce" on
                CUDA, "torch_compile" on the CPU, where its Triton kernels do not run)
    fastirl-ce  ``apply_fastirl(model, td_weight=0, memory="compact")``: fastirl's fused
                cross-entropy, in its memory-constrained setting
    fastirl-iq  ``apply_fastirl(model, td_weight=0.1, memory="compact")``: fastirl's fused
                IQ-Learn loss, likewise
    naive-iq    ``apply_fastirl(model, fused=False, td_weight=0.1)``: logits, then the
                reference IQ loss

Each measurement runs in a fresh process (``--worker``), single-threaded: build
the model, one warm-up step at a short length (it allocates the gradients, kept
with ``zero_grad(set_to_none=False)``, and AdamW's states, and compiles what
compiles), then the measured step at T.  Memory is the resident-set high-water
mark of that step above the resident set after the warm-up (the *baseline*:
weights + gradients + optimizer states), with glibc's mmap threshold at 128 KiB
so that freed tensors leave the resident set (``fastirl.bench.memory``).  The
baseline itself is reported (``baseline_gib``) next to the model alone
(``model_gib``).

Search, per row (model, mode, loss): measure two short lengths (512 and 1024
for the losses that build logits; 2048 and 4096 for the fused ones, past the
length where fastirl's chunk stops growing; ``--t1`` / ``--t2`` set both for
every loss), fit a line through two measured points (the nearest pair around
the budget, else the two longest), predict the longest T that fits, **measure
it**; if it does not fit, or if the line through the new point predicts more,
repeat (a secant search; bisection where a killed step left no value; at most
``--max-runs`` measurements per row).  Memory is not quite linear in T (the
peak moves from the loss to the layers' backward as T grows), which is why the
maximum is measured, not extrapolated.  The reported maximum is the longest
*measured* length that fitted.  Every measurement is one CSV row (``--csv``),
so a sweep resumes where it stopped and another budget reuses the points
already measured.  A watchdog kills a step whose resident set passes
``--kill-factor`` x the budget above its baseline (recorded as over, with the
memory it had reached, a lower bound) or that leaves less than 1 GiB of the
machine's memory available (recorded as oom: no measurement).

    python benchmarks/fit_memory.py --plan                     # every run, estimated times
    python benchmarks/fit_memory.py --short-only               # the short points of every row
    python benchmarks/fit_memory.py --plan                     # ... now from measured memory
    python benchmarks/fit_memory.py                            # the sweep (resumes)
    python benchmarks/fit_memory.py --models qwen3-0.6b --modes lora --losses hf fastirl-iq
    python benchmarks/fit_memory.py --table                    # the README table (markdown)
    python benchmarks/fit_memory.py --plot fit_memory.png      # the figure

Run it with ``OMP_NUM_THREADS=1`` and a ``FASTIRL_BUILD_DIR`` of its own (the
native CPU backend is built once there; a shared cache rebuilds it).

Times in ``--plan`` are CPU seconds of one thread (what a run costs on an idle
core): a run costs a per-run overhead (start, model build, warm-up) plus
flops(T) / rate, with flops(T) counted from the configuration (matmuls, linear
in T; attention, quadratic, windowed on sliding-window layers; checkpointing's
recomputation), the rate and the overhead taken from the measured runs of the
same row, else of the same model and mode, else of any run (``--csv`` and
``--calibration``), else defaults.  The search is simulated on the row's
measured points, else on an estimate of its memory (``estimated_peak``; marked
``~``), so the plan has the step-downs a real run would have if the estimate
is right.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 1 << 30
STEP = 256
DEFAULT_CSV = ROOT / "benchmarks" / "results" / "fit-memory" / "fit_memory.csv"
# Runs measured while writing this script (the table's settings, on a loaded machine): the
# plan's CPU rates and per-run overheads come from them until the sweep's CSV has its own.
DEFAULT_CALIBRATION = ROOT / "benchmarks" / "results" / "fit-memory" / "calibration.csv"
DEFAULT_BUDGET_GIB = 2.0
LORA_R = 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TD_WEIGHT = 0.1
# fastirl's memory setting here: the one for memory-constrained fine-tuning (docs/memory.md)
MEMORY = "compact"

# --------------------------------------------------------------------------- architectures
# Published configurations (the models' config.json on the Hugging Face hub, as documented
# on the model cards and in transformers' model docs); random weights, nothing downloaded.

MODELS: dict[str, dict] = {
    # meta-llama/Llama-3.2-1B, config.json (transformers docs: LlamaConfig; model card:
    # 1.23B parameters, 128K context, tied embeddings).
    "llama-3.2-1b": dict(
        config_class="LlamaConfig", title="Llama-3.2-1B",
        values=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=64, hidden_act="silu", max_position_embeddings=131072,
                    rms_norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192},
                    attention_bias=False, mlp_bias=False, tie_word_embeddings=True,
                    bos_token_id=128000, eos_token_id=128001)),
    # Qwen/Qwen3-0.6B, config.json (transformers docs: Qwen3Config; model card: 0.6B
    # parameters, 28 layers, 16 Q / 8 KV heads, 32,768 context, tied embeddings).
    "qwen3-0.6b": dict(
        config_class="Qwen3Config", title="Qwen3-0.6B",
        values=dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                    head_dim=128, hidden_act="silu", max_position_embeddings=40960,
                    rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=False,
                    use_sliding_window=False, sliding_window=None, max_window_layers=28,
                    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)),
    # google/gemma-3-1b-pt, config.json (transformers docs: Gemma3TextConfig; Gemma 3 technical
    # report: 5 local sliding-window layers (window 512, RoPE base 10k) per global layer
    # (RoPE base 1M), QK-norm instead of Gemma 2's soft caps: attn_logit_softcapping and
    # final_logit_softcapping are null; 32K context; tied embeddings).
    "gemma-3-1b": dict(
        config_class="Gemma3TextConfig", title="Gemma-3-1B",
        values=dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                    num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                    head_dim=256, hidden_activation="gelu_pytorch_tanh",
                    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                    rope_local_base_freq=10000.0, sliding_window=512, sliding_window_pattern=6,
                    query_pre_attn_scalar=256, attn_logit_softcapping=None,
                    final_logit_softcapping=None, rope_scaling=None, attention_bias=False,
                    tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1)),
    # Tiny shapes for the tests (not in the default table).
    "tiny-llama": dict(
        config_class="LlamaConfig", title="tiny Llama", tiny=True,
        values=dict(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=65536, tie_word_embeddings=True)),
    "tiny-gemma": dict(
        config_class="Gemma3TextConfig", title="tiny Gemma-3", tiny=True,
        values=dict(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                    max_position_embeddings=65536, sliding_window=64, sliding_window_pattern=2,
                    query_pre_attn_scalar=32, final_logit_softcapping=None,
                    tie_word_embeddings=True)),
}
TABLE_MODELS = ["llama-3.2-1b", "qwen3-0.6b", "gemma-3-1b"]
MODES = ("full", "lora")
LOSSES = ("hf", "cce", "fastirl-ce", "fastirl-iq", "naive-iq")
# The two short lengths of each loss: past fastirl's chunk cap (the logits block of a chunk
# grows with T up to ~half the head's float32 size, then stays) for the fused losses, so that
# the line through them is the slope at long T; short for the losses whose logits grow with T.
SHORT = {"hf": (512, 1024), "naive-iq": (512, 1024), "cce": (2048, 4096),
         "fastirl-ce": (2048, 4096), "fastirl-iq": (2048, 4096)}
LOSS_TITLES = {"hf": "model's CE", "cce": "CCE", "fastirl-ce": "fastirl CE",
               "fastirl-iq": "fastirl IQ", "naive-iq": "naive IQ"}

CSV_FIELDS = ["model", "mode", "loss", "tokens", "status", "peak_gib", "baseline_gib",
              "model_gib", "step_cpu_s", "run_cpu_s", "step_s", "run_s", "threads", "device",
              "torch", "transformers", "commit", "loadavg_1m", "date", "note"]


def model_config(name: str):
    import transformers
    spec = MODELS[name]
    return getattr(transformers, spec["config_class"])(**spec["values"])


def layer_types(values: dict) -> list[str]:
    """'full' / 'sliding' per layer (Gemma 3: every `sliding_window_pattern`-th layer is global)."""
    n = values["num_hidden_layers"]
    pattern = values.get("sliding_window_pattern")
    if values.get("sliding_window") and pattern:
        return ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(n)]
    return ["full"] * n


# --------------------------------------------------------------------------- the worker

def build(name: str, mode: str, device):
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    config = model_config(name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if mode == "lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0, target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM"))
        model.train()
    elif mode != "full":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return model


def loss_function(model, loss: str, device):
    """f(ids) -> the scalar loss of one training step, labels = ids."""
    if loss == "hf":
        return lambda ids: model(input_ids=ids, labels=ids).loss
    if loss in ("fastirl-ce", "fastirl-iq", "naive-iq"):
        from fastirl.integrations import apply_fastirl
        apply_fastirl(model, fused=loss != "naive-iq", memory=MEMORY,
                      td_weight=0.0 if loss == "fastirl-ce" else TD_WEIGHT)
        return lambda ids: model(input_ids=ids, labels=ids).loss
    if loss == "cce":
        from cut_cross_entropy import linear_cross_entropy
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        backbone = inner.get_decoder()
        head = inner.get_output_embeddings()
        softcap = getattr(inner.config, "final_logit_softcapping", None)
        impl = "cce" if device.type == "cuda" else "torch_compile"

        def cce(ids):
            hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state
            return linear_cross_entropy(hidden, head.weight, ids, shift=True, softcap=softcap,
                                        impl=impl)
        return cce
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _preload(spec: dict) -> None:
    import transformers
    from transformers import AutoModelForCausalLM  # noqa: F401
    getattr(transformers, MODELS[spec["model"]]["config_class"])
    module = MODELS[spec["model"]]["config_class"].replace("TextConfig", "").replace("Config", "")
    getattr(transformers, module + "ForCausalLM")
    if spec["mode"] == "lora":
        import peft  # noqa: F401
    if spec["loss"] == "cce":
        import cut_cross_entropy  # noqa: F401
    elif spec["loss"] != "hf":
        import fastirl.integrations.transformers  # noqa: F401


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process; prints ``BASELINE <bytes>`` before the
    measured step (for the parent's watchdog) and returns the result."""
    import torch

    from fastirl.bench import memory
    torch.set_num_threads(spec.get("threads", 1))
    device = torch.device(spec.get("device", "cpu"))
    exact = device.type == "cpu" and memory.exact_malloc()
    cuda = device.type == "cuda"
    _preload(spec)                  # imports are not memory of the model
    memory.release_free_memory()
    rss_start = memory.rss_bytes()
    model = build(spec["model"], spec["mode"], device)
    f = loss_function(model, spec["loss"], device)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: no full-size temporaries in the update (foreach would add some at the end of
    # the step, the same for every loss); the CPU has a fused AdamW too.
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    model_bytes = sum(t.numel() * t.element_size() for t in
                      list(model.parameters()) + list(model.buffers()))
    vocab = model.config.vocab_size if hasattr(model, "config") else MODELS[spec["model"]][
        "values"]["vocab_size"]
    generator = torch.Generator().manual_seed(spec.get("seed", 0))

    def step(T: int) -> None:
        ids = torch.randint(0, vocab, (1, T), generator=generator).to(device)
        loss = f(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)         # gradients stay: part of the baseline

    step(spec.get("warmup_tokens", 64))
    meter = memory.PeakMeter(device)
    memory.release_free_memory()
    baseline = meter.current() - (0 if cuda else rss_start)
    print(f"BASELINE {meter.current()}", flush=True)
    with meter.measure():
        start, cpu = time.perf_counter(), time.process_time()
        step(spec["tokens"])
        if cuda:
            torch.cuda.synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return {"peak_bytes": meter.peak, "baseline_bytes": baseline, "model_bytes": model_bytes,
            "step_s": seconds, "step_cpu_s": cpu_seconds, "run_cpu_s": time.process_time(),
            "method": meter.method + ("" if exact or cuda else " (default malloc)"),
            "torch": torch.__version__}


# --------------------------------------------------------------------------- running one point

def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure(model: str, mode: str, loss: str, tokens: int, *, kill_bytes: float | None,
            timeout: float | None = None, device: str = "cpu", threads: int = 1,
            reserve_bytes: int = GiB) -> dict:
    """Runs the worker in a fresh process.  ``status``: ok; over (killed by the watchdog
    when the step passed ``kill_bytes`` above its baseline, ``peak_gib`` then being the
    resident set it had reached, a lower bound; or by the system, without a value);
    oom (killed because the machine had less than ``reserve_bytes`` left: no
    measurement); timeout; error."""
    spec = dict(model=model, mode=mode, loss=loss, tokens=int(tokens), device=device,
                threads=threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "TORCHINDUCTOR_COMPILE_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.time()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                             json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=str(ROOT))
    lines: list[str] = []
    errors: list[str] = []
    baseline_abs: list[int] = []

    def read_out():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("BASELINE "):
                baseline_abs.append(int(line.split()[1]))

    def read_err():
        for line in proc.stderr:
            errors.append(line)
            del errors[:-200]

    readers = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=read_err, daemon=True)]
    for t in readers:
        t.start()
    status, note, killed_at = None, "", None
    while proc.poll() is None:
        time.sleep(0.05)
        if timeout is not None and time.time() - start > timeout:
            status, note = "timeout", f"killed after {timeout:.0f} s"
        elif device == "cpu":
            rss = _status_kib(proc.pid, "VmRSS")
            avail = _mem_available()
            if rss is not None and baseline_abs and kill_bytes is not None and \
                    rss * 1024 - baseline_abs[0] > kill_bytes:
                killed_at = (rss * 1024 - baseline_abs[0]) / GiB
                status, note = "over", f"killed at {killed_at:.2f} GiB above the baseline"
            elif avail is not None and avail < reserve_bytes:
                status, note = "oom", (f"killed: {avail / GiB:.2f} GiB left on the machine "
                                       f"(not a measurement; --retry-failed when there is room)")
        if status is not None:
            proc.kill()
            break
    proc.wait()
    for t in readers:
        t.join(timeout=5)
    run_s = time.time() - start
    row = {"model": model, "mode": mode, "loss": loss, "tokens": int(tokens), "run_s": run_s,
           "threads": threads, "device": device}
    if status is None:
        result = None
        for line in lines:
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
        if proc.returncode != 0 or result is None:
            tail = "".join(errors[-8:]).strip().replace("\n", " | ")
            status = "over" if proc.returncode in (-9, 137) else "error"
            note = f"exit {proc.returncode}: {tail[-400:]}"
        else:
            status = "ok"
            row.update(peak_gib=result["peak_bytes"] / GiB,
                       baseline_gib=result["baseline_bytes"] / GiB,
                       model_gib=result["model_bytes"] / GiB, step_s=result["step_s"],
                       step_cpu_s=result["step_cpu_s"], run_cpu_s=result["run_cpu_s"],
                       torch=result["torch"], note=result["method"])
    if status != "ok":
        row["note"] = note
    if killed_at is not None:
        row["peak_gib"] = killed_at            # a lower bound of the step's peak
    row["status"] = status
    return row


# --------------------------------------------------------------------------- the CSV

def read_rows(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["tokens"] = int(r["tokens"])
        for k in ("peak_gib", "baseline_gib", "model_gib", "step_cpu_s", "run_cpu_s", "step_s",
                  "run_s"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
    return rows


def _commit() -> str:
    """The repository's commit (``+`` if the working tree differs from it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+" if dirty else "")


def append_row(path: Path, row: dict) -> None:
    import torch
    import transformers
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    out = {k: row.get(k, "") for k in CSV_FIELDS}
    out["torch"] = out["torch"] or torch.__version__
    out["transformers"] = transformers.__version__
    out["commit"] = _commit()
    out["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        out["loadavg_1m"] = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        pass
    for k in ("peak_gib", "baseline_gib", "model_gib"):
        if out[k] != "":
            out[k] = f"{float(out[k]):.4f}"
    for k in ("step_cpu_s", "run_cpu_s", "step_s", "run_s"):
        if out[k] != "":
            out[k] = f"{float(out[k]):.2f}"
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(out)


def points_of(rows: list[dict], model: str, mode: str, loss: str) -> dict[int, float]:
    """{tokens: peak GiB above the baseline}; for a step killed as over, the resident set
    it had reached (a lower bound), else ``inf``; the latest measurement of a length wins.
    Errors, timeouts and oom are left out."""
    out: dict[int, float] = {}
    for r in rows:
        if (r["model"], r["mode"], r["loss"]) != (model, mode, loss):
            continue
        if r["status"] == "ok":
            out[r["tokens"]] = r["peak_gib"]
        elif r["status"] == "over":
            out[r["tokens"]] = r["peak_gib"] if r.get("peak_gib") else math.inf
    return out


def failures_of(rows: list[dict], model: str, mode: str, loss: str) -> list[dict]:
    return [r for r in rows if (r["model"], r["mode"], r["loss"]) == (model, mode, loss)
            and r["status"] in ("error", "timeout", "oom")]


# --------------------------------------------------------------------------- the search

def _down(x: float, step: int = STEP) -> int:
    return int(math.floor(x / step)) * step


def line_through(points: dict[int, float], budget: float) -> tuple[float, float] | None:
    """(intercept, slope) of peak(T) through two measured points: the longest fitting
    one and the shortest over one if both were measured, else the two longest."""
    finite = sorted((T, p) for T, p in points.items() if math.isfinite(p))
    if len(finite) < 2:
        return None
    below = [(T, p) for T, p in finite if p <= budget]
    above = [(T, p) for T, p in finite if p > budget]
    if below and above:
        (t0, p0), (t1, p1) = below[-1], above[0]
    else:
        (t0, p0), (t1, p1) = finite[-2], finite[-1]
    if t1 == t0:
        return None
    slope = (p1 - p0) / (t1 - t0)
    return p0 - slope * t0, slope


def predicted_max(points: dict[int, float], budget: float, step: int = STEP,
                  max_tokens: int | None = None) -> int | None:
    """The longest multiple of ``step`` the line predicts within the budget."""
    line = line_through(points, budget)
    if line is None:
        return None
    a, b = line
    if b <= 0:
        return max_tokens
    T = _down((budget - a) / b, step)
    return min(T, max_tokens) if max_tokens else T


def next_length(points: dict[int, float], budget: float, *, t1: int = 512, t2: int = 1024,
                step: int = STEP, max_runs: int = 6, max_tokens: int = 65536) -> int | None:
    """The next length to measure for one row, or None when the row is done."""
    if t1 not in points:
        return t1
    fits = [T for T, p in points.items() if p <= budget]
    over = [T for T, p in points.items() if p > budget]
    lo = max(fits, default=0)
    hi = min(over, default=math.inf)
    if not fits:                                  # even t1 is over: halve down to one step
        T = _down(min(points) / 2, step)
        return T if T >= step and T not in points else None
    if t2 not in points and t2 < hi:
        return t2
    if len(points) >= max_runs or lo >= max_tokens or lo + step >= hi:
        return None
    T = predicted_max(points, budget, step, max_tokens)
    if T is None:                                 # one finite point: double
        T = min(2 * lo, max_tokens)
    if T >= hi:                                   # the line cannot say (no peak at hi): halve
        T = _down((lo + hi) / 2, step)
    if T <= lo or T in points:
        return None
    return T


@dataclass
class RowResult:
    model: str
    mode: str
    loss: str
    max_tokens: int | None          # the longest measured length that fitted
    peak_gib: float | None          # its peak above the baseline
    predicted: int | None           # the line's prediction
    state: str                      # bracketed / predicted / capped / open / none / error
    baseline_gib: float | None
    model_gib: float | None
    runs: int


def row_result(rows: list[dict], model: str, mode: str, loss: str, budget: float, *,
               t1: int = 512, t2: int = 1024, step: int = STEP, max_runs: int = 6,
               max_tokens: int = 65536) -> RowResult:
    mine = [r for r in rows if (r["model"], r["mode"], r["loss"]) == (model, mode, loss)]
    points = points_of(rows, model, mode, loss)
    fits = {T: p for T, p in points.items() if p <= budget}
    lo = max(fits, default=None)
    baselines = [r["baseline_gib"] for r in mine if r["status"] == "ok"]
    models = [r["model_gib"] for r in mine if r["status"] == "ok"]
    nxt = next_length(points, budget, t1=t1, t2=t2, step=step, max_runs=max_runs,
                      max_tokens=max_tokens)
    if failures_of(rows, model, mode, loss) and lo is None:
        state = "error"
    elif nxt is not None:
        state = "open"
    elif lo is None:
        state = "none"
    elif any(T == lo + step and p > budget for T, p in points.items()):
        state = "bracketed"
    elif lo >= max_tokens:
        state = "capped"
    else:
        state = "predicted"
    return RowResult(model, mode, loss, lo, fits.get(lo) if lo is not None else None,
                     predicted_max(points, budget, step, max_tokens), state,
                     statistics.median(baselines) if baselines else None,
                     statistics.median(models) if models else None, len(mine))


# --------------------------------------------------------------------------- estimates (plan)

def _dims(model: str) -> dict:
    v = MODELS[model]["values"]
    H = v["hidden_size"]
    heads, kv = v["num_attention_heads"], v.get("num_key_value_heads") or v["num_attention_heads"]
    hd = v.get("head_dim") or H // heads
    I, L, V = v["intermediate_size"], v["num_hidden_layers"], v["vocab_size"]
    per_layer = H * heads * hd * 2 + H * kv * hd * 2 + 3 * H * I
    return dict(H=H, heads=heads, kv=kv, hd=hd, I=I, L=L, V=V, layer_params=per_layer,
                window=v.get("sliding_window"), types=layer_types(v))


def step_flops(model: str, mode: str, loss: str, T: int) -> float:
    """Floating-point operations of one training step at T tokens (2 per multiply-add):
    layers' matmuls forward + recomputation (checkpointing) + backward (the weights'
    gradients only in full fine-tuning), attention (causal, windowed on sliding layers:
    forward, recomputation, backward ~2.5x forward), the LM head (the fused losses
    recompute the logits in their backward)."""
    d = _dims(model)
    back = 4 if mode == "full" else 2
    layers = (2 + 2 + back) * d["L"] * d["layer_params"] * T
    attention = 0.0
    for kind in d["types"]:
        w = d["window"] if kind == "sliding" and d["window"] else T
        keys = T * T / 2 if w >= T else T * w - w * w / 2        # (query, key) pairs
        attention += 4 * d["heads"] * d["hd"] * keys * (1 + 1 + 2.5)
    head_passes = 2 + back + (2 if loss in ("fastirl-ce", "fastirl-iq") else 0)
    head = head_passes * d["V"] * d["H"] * T
    return layers + attention + head


# Memory of rows not yet measured (replaced by the measured line as soon as a row has two
# points), fitted to the first measurements here (Qwen3-0.6B LoRA at 512-4096 tokens; Llama,
# Gemma, Qwen full fine-tuning at 512).  The peak is the larger of two phases:
# * the loss: the checkpointed hidden states (2 H (L + 8) bytes a token), the loss's
#   (tokens x vocab) buffers (bytes per logit below: the model's CE keeps bf16 logits, their
#   float32 copy and gradient; CCE's torch_compile path on the CPU about one bf16 logits
#   tensor; the naive IQ loss more float32 intermediates) and, for fastirl, one chunk's bf16
#   logits block (min(T, H) rows: the chunk cap is half the float32 head) plus, in full
#   fine-tuning, its float32 dW accumulator and a low-precision partial (~5 H V bytes);
# * the layers' backward: the hidden states plus about twice one layer's activations a token.
_LOSS_BYTES_PER_LOGIT = {"hf": 12.0, "cce": 2.0, "naive-iq": 20.0, "fastirl-ce": 0.0,
                         "fastirl-iq": 0.0}


def estimated_peak(model: str, mode: str, loss: str, T: int) -> float:
    """Estimated peak above the baseline (GiB) of one step at T tokens."""
    d = _dims(model)
    H, V = d["H"], d["V"]
    hidden = 2 * H * (d["L"] + 8)
    layer = 2 * (4 * H + 2 * d["heads"] * d["hd"] + 4 * d["kv"] * d["hd"] + 4 * d["I"])
    fixed = 0.05 * GiB
    if loss.startswith("fastirl"):
        fixed = 2 * min(T, H) * V + (5 * H * V if mode == "full" else 0)
    loss_phase = fixed + (hidden + _LOSS_BYTES_PER_LOGIT[loss] * V) * T
    layer_phase = 0.05 * GiB + (hidden + 2 * layer) * T
    return max(loss_phase, layer_phase) / GiB


DEFAULT_RATE = 1.5e11           # flop/s of one CPU thread, before anything is measured
DEFAULT_OVERHEAD = 60.0         # s: process start, model build, warm-up


def _cpu(r: dict, key: str) -> float | None:
    """CPU seconds of a run or its step (single-threaded: what it costs an idle
    machine), else wall seconds."""
    value = r.get(key + "_cpu_s")
    return value if value else r.get(key + "_s")


def _rates(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        step = _cpu(r, "step")
        if r["status"] != "ok" or not step:
            continue
        rate = step_flops(r["model"], r["mode"], r["loss"], r["tokens"]) / max(step, 1e-3)
        run = _cpu(r, "run")
        over = max(run - step, 0.0) if run else None
        for key in [(r["model"], r["mode"], r["loss"]), (r["model"], r["mode"]), ("*",)]:
            out.setdefault(("rate",) + key, []).append(rate)
            if over is not None:
                out.setdefault(("over",) + key, []).append(over)
    return out


def estimate_seconds(rates: dict, model: str, mode: str, loss: str, T: int) -> tuple[float, bool]:
    """(seconds of one run, measured) from the nearest calibration available."""
    rate, overhead, measured = DEFAULT_RATE, DEFAULT_OVERHEAD, False
    for key in [(model, mode, loss), (model, mode), ("*",)]:
        if ("rate",) + key in rates:
            rate = statistics.median(rates[("rate",) + key])
            measured = True
            break
    for key in [(model, mode, loss), (model, mode), ("*",)]:
        if ("over",) + key in rates:
            overhead = statistics.median(rates[("over",) + key])
            break
    return overhead + step_flops(model, mode, loss, T) / rate, measured


def shorts(loss: str, short: dict | None = None) -> tuple[int, int]:
    return (short or SHORT)[loss]


def plan(rows: list[dict], models, modes, losses, budget: float, *, short: dict | None = None,
         step: int = STEP, max_runs: int = 6, max_tokens: int = 65536,
         calibration: list[dict] = ()) -> list[dict]:
    """The runs still to do, in order, each with its estimated time; the search is
    simulated on the measured points, or on estimated memory (``memory_known`` False).
    Times: the rates of ``rows`` and ``calibration`` (memory: ``rows`` only)."""
    rates = _rates(list(rows) + list(calibration))
    out = []
    for model in models:
        for mode in modes:
            for loss in losses:
                t1, t2 = shorts(loss, short)
                real = points_of(rows, model, mode, loss)
                finite = sorted((T, p) for T, p in real.items() if math.isfinite(p))
                known = len(finite) >= 2
                sim = dict(real)
                for _ in range(max_runs):
                    T = next_length(sim, budget, t1=t1, t2=t2, step=step, max_runs=max_runs,
                                    max_tokens=max_tokens)
                    if T is None:
                        break
                    seconds, timed = estimate_seconds(rates, model, mode, loss, T)
                    kind = "short" if T in (t1, t2) else "down" if T < t1 else "max"
                    out.append(dict(model=model, mode=mode, loss=loss, tokens=T, kind=kind,
                                    seconds=seconds, timed=timed, memory_known=known))
                    # The outcome: on the line through the row's two longest measured
                    # points (the prediction holds), else on the estimated curve (which
                    # may send the search down again, as a real run would).
                    if known:
                        (t_a, p_a), (t_b, p_b) = finite[-2], finite[-1]
                        sim[T] = p_a + (p_b - p_a) / (t_b - t_a) * (T - t_a)
                    else:
                        sim[T] = estimated_peak(model, mode, loss, T)
    return out


# --------------------------------------------------------------------------- table, figure

def _fmt_tokens(T) -> str:
    return "-" if T is None else f"{T:,}"


def table(rows: list[dict], models, modes, losses, budget: float, *, short: dict | None = None,
          **search) -> str:
    gain = "hf" in losses and "fastirl-iq" in losses
    head = (["model", "V", "tuning", "model + optimizer (GiB)"] + [LOSS_TITLES[l] for l in losses]
            + (["fastirl IQ / model's CE"] if gain else []))
    lines = [f"Longest sequence (tokens, batch 1) whose training step fits in {budget:g} GiB "
             f"above the model (bf16, gradient checkpointing; measured at that length):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = {"open": "*", "predicted": "", "bracketed": "", "capped": "+", "none": "",
             "error": "!"}
    for model in models:
        for mode in modes:
            results = [row_result(rows, model, mode, loss, budget, **search,
                                  **dict(zip(("t1", "t2"), shorts(loss, short))))
                       for loss in losses]
            if not any(r.runs for r in results):
                continue
            base = [r.baseline_gib for r in results if r.baseline_gib is not None]
            cells = [MODELS[model]["title"], f"{MODELS[model]['values']['vocab_size']:,}",
                     "full" if mode == "full" else f"LoRA r={LORA_R}",
                     f"{statistics.median(base):.2f}" if base else "-"]
            for r in results:
                if r.state == "none":
                    cells.append(f"< {STEP}")
                elif r.state == "error" or r.max_tokens is None:
                    cells.append("error" if r.state == "error" else "-")
                else:
                    cells.append(_fmt_tokens(r.max_tokens) + notes[r.state])
            if gain:
                by = dict(zip(losses, results))
                hf, iq = by["hf"].max_tokens, by["fastirl-iq"].max_tokens
                cells.append(f"{iq / hf:.1f}x" if hf and iq else "-")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`*`: search not finished; `+`: the cap (`--max-tokens`) fitted; "
              "`error`: see the CSV's note."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], models, modes, losses, budget: float, path: Path, *,
         short: dict | None = None, **search) -> None:
    """One panel per (mode, model): measured peak against T per loss, the budget,
    the longest fitting length (star), steps killed over the budget (x, at the
    resident set they had reached)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    models = [m for m in models if any(points_of(rows, m, mode, l) for mode in modes
                                       for l in losses)]
    if not models:
        raise SystemExit("fit_memory: nothing measured to plot")
    fig, axes = plt.subplots(len(modes), len(models), figsize=(4.3 * len(models),
                             3.3 * len(modes)), squeeze=False)
    colors = dict(zip(LOSSES, ["tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple"]))
    for i, mode in enumerate(modes):
        for j, model in enumerate(models):
            ax = axes[i][j]
            for loss in losses:
                points = points_of(rows, model, mode, loss)
                ok = sorted((T, p) for T, p in points.items()
                            if _measured(rows, model, mode, loss, T))
                if not ok:
                    continue
                ax.plot([T for T, _ in ok], [p for _, p in ok], "o-", color=colors[loss],
                        label=LOSS_TITLES[loss], ms=3.5, lw=1.2)
                killed = [(T, p) for T, p in points.items() if math.isfinite(p)
                          and not _measured(rows, model, mode, loss, T)]
                if killed:
                    ax.plot([T for T, _ in killed], [p for _, p in killed], "x",
                            color=colors[loss], ms=7)
                r = row_result(rows, model, mode, loss, budget, **search,
                               **dict(zip(("t1", "t2"), shorts(loss, short))))
                if r.max_tokens:
                    ax.plot([r.max_tokens], [r.peak_gib], "*", color=colors[loss], ms=12)
            ax.axhline(budget, color="k", ls="--", lw=1)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(
                lambda x, _: f"{x / 1024:g}k" if x >= 1024 else f"{x:g}"))
            ax.set_ylim(0, 2.1 * budget)
            ax.set_title(f"{MODELS[model]['title']}, "
                         f"{'full fine-tuning' if mode == 'full' else f'LoRA r={LORA_R}'}",
                         fontsize=10)
            if i == len(modes) - 1:
                ax.set_xlabel("sequence length (tokens)")
            if j == 0:
                ax.set_ylabel("peak above model + optimizer (GiB)")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Peak memory of a training step: bf16, gradient checkpointing, batch 1\n"
                 f"dashed: {budget:g} GiB budget, star: longest length within it (measured), "
                 f"x: step killed over it", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def _measured(rows: list[dict], model: str, mode: str, loss: str, T: int) -> bool:
    """Whether the latest run at T completed (not killed)."""
    status = None
    for r in rows:
        if (r["model"], r["mode"], r["loss"], r["tokens"]) == (model, mode, loss, T):
            status = r["status"]
    return status == "ok"


# --------------------------------------------------------------------------- main

def sweep(args, budget: float) -> None:
    kill = args.kill_factor * budget * GiB
    for model in args.models:
        for mode in args.modes:
            for loss in args.losses:
                for _ in range(args.max_runs + 2):
                    rows = read_rows(args.csv)
                    if failures_of(rows, model, mode, loss) and not args.retry_failed:
                        print(f"{model} {mode} {loss}: failed before (see the CSV; "
                              f"--retry-failed to try again)", flush=True)
                        break
                    points = points_of(rows, model, mode, loss)
                    t1, t2 = shorts(loss, _short(args))
                    T = next_length(points, budget, t1=t1, t2=t2, step=STEP,
                                    max_runs=args.max_runs, max_tokens=args.max_tokens)
                    if T is None or (args.short_only and T > t2):
                        r = row_result(rows, model, mode, loss, budget, t1=t1, t2=t2,
                                       **_search(args))
                        print(f"{model} {mode} {loss}: max {_fmt_tokens(r.max_tokens)} tokens "
                              f"({r.state})", flush=True)
                        break
                    print(f"{model} {mode} {loss}: measuring T={T} ...", end=" ", flush=True)
                    row = measure(model, mode, loss, T, kill_bytes=kill, timeout=args.timeout,
                                  device=args.device, threads=args.threads)
                    append_row(args.csv, row)
                    peak = f"{row['peak_gib']:.3f} GiB" if row["status"] == "ok" else row["note"]
                    print(f"{row['status']}: {peak} (run {row['run_s']:.0f} s)", flush=True)


def _short(args) -> dict:
    """--t1 / --t2 for every loss, else each loss's own (SHORT)."""
    return {loss: (args.t1 or t1, args.t2 or t2) for loss, (t1, t2) in SHORT.items()}


def _search(args) -> dict:
    return dict(step=STEP, max_runs=args.max_runs,
                max_tokens=args.max_tokens)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _shown(path) -> str:
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def print_plan(args, budget: float) -> None:
    rows = read_rows(args.csv)
    calibration = (read_rows(args.calibration)
                   if args.calibration and Path(args.calibration).is_file() else [])
    runs = plan(rows, args.models, args.modes, args.losses, budget, short=_short(args),
                calibration=calibration, **_search(args))
    print(f"fit_memory plan: budget {budget:g} GiB above the model; {len(rows)} runs measured "
          f"in {_shown(args.csv)}; times calibrated on those and {len(calibration)} in "
          f"{_shown(args.calibration) if args.calibration else '-'}")
    print(f"{'model':<14} {'mode':<5} {'loss':<11} {'kind':<6} {'tokens':>7} {'est. time':>10}")
    total = 0.0
    for r in runs:
        total += r["seconds"]
        flags = ("" if r["timed"] else " (time: default rate)") + (
            "" if r["memory_known"] else " ~")
        print(f"{r['model']:<14} {r['mode']:<5} {r['loss']:<11} {r['kind']:<6} "
              f"{r['tokens']:>7} {_hms(r['seconds']):>10}{flags}")
    longest = max((r["seconds"] for r in runs), default=0.0)
    print(f"{len(runs)} runs, estimated total {_hms(total)} of one CPU thread "
          f"(longest run {_hms(longest)}). `~`: T of a max run predicted from estimated "
          f"memory per token (no two points measured yet); a max run that does not fit "
          f"adds a step down.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=TABLE_MODELS, choices=sorted(MODELS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_GIB,
                   help="GiB above the model + optimizer baseline (default %(default)s)")
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV,
                   help="one row per measured run; the sweep resumes from it")
    p.add_argument("--calibration", type=Path,
                   default=DEFAULT_CALIBRATION if DEFAULT_CALIBRATION.exists() else None,
                   help="more runs for the plan's time estimates (default: %(default)s)")
    p.add_argument("--t1", type=int, default=None,
                   help="first short length, for every loss (default: per loss, 512 for hf and "
                        "naive-iq, 2048 for the fused losses)")
    p.add_argument("--t2", type=int, default=None,
                   help="second short length (default: per loss, 1024 / 4096)")
    p.add_argument("--max-runs", type=int, default=6, help="measurements per row at most")
    p.add_argument("--max-tokens", type=int, default=65536, help="longest length tried")
    p.add_argument("--kill-factor", type=float, default=2.0,
                   help="kill a step past this many budgets above its baseline")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run")
    p.add_argument("--retry-failed", action="store_true")
    p.add_argument("--short-only", action="store_true",
                   help="measure only the short lengths of every row (then --plan times the "
                        "long runs from measured memory and speed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plan", action="store_true", help="print the runs left, with times")
    p.add_argument("--table", action="store_true", help="print the README table")
    p.add_argument("--plot", type=Path, default=None, help="draw the figure to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        result = worker(json.loads(args.worker))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    for t in (args.t1, args.t2):
        if t is not None and (t % STEP or t <= 0):
            p.error(f"--t1 / --t2 must be positive multiples of {STEP}")
    if any(t2 <= t1 for t1, t2 in _short(args).values()):
        p.error("--t2 must be longer than --t1")
    budget = args.budget
    if args.kill_factor < 1:
        p.error("--kill-factor must be at least 1 (a killed step must be over the budget)")
    if args.plan:
        print_plan(args, budget)
    if args.table:
        print(table(read_rows(args.csv), args.models, args.modes, args.losses, budget,
                    short=_short(args), **_search(args)), end="")
    if args.plot is not None:
        plot(read_rows(args.csv), args.models, args.modes, args.losses, budget, args.plot,
             short=_short(args), **_search(args))
        print(f"figure: {args.plot}")
    if not (args.plan or args.table or args.plot is not None):
        sweep(args, budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
