"""The experiment grid: independent jobs ``(experiment, setting, seed)``, each
written to its own JSON file when it finishes and skipped when that file exists.

* ``main``: 150 steps of 8 chat examples, then greedy accuracy on 300 held-out
  problems and 8 samples for each of 48 held-out prompts at four temperatures
  (accuracy and diversity: the quality-diversity front), the log-likelihood and
  implicit rewards of the T = 1 samples; a learning curve every 30 steps.
  Settings MLE, IQ lambda = 0.01, IQ lambda = 0.1 with a warm-up; seeds 0, 1, 2.
  Plus two seed-less jobs: the base model's greedy accuracy (step 0 of the
  curves) and the resources of a training step.
* ``overfit``: 64 training problems (one fixed expert solution each) for 20
  epochs; after every epoch (and before the first) greedy accuracy on 48
  held-out problems, 4 samples for each of 8 held-out prompts (self-BLEU) and the
  held-out NLL of 64 expert solutions.  MLE, IQ lambda = 0.01, IQ lambda = 0.1.
* ``gamma``: IQ lambda = 0.01 trained with gamma = 0.99 and 0.95 (main's sizes of
  training), rewards extracted with the training gamma: the reward analysis.

A seed k draws the training problems, their expert solutions, the data order and
every sampling seed of the evaluation; the held-out problems are the same for
every seed (``TEST_SEED``), so settings are paired problem by problem.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import sys
import time

import torch

from .metrics import final_answer, prompt_diversity
from .model import GEN_DTYPE, generate, load_model, prompt_ids, score_samples, text_of
from .model import check_extract_rewards
from .task import chat_example, make_split

EXAMPLES = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(EXAMPLES, "results", "smollm2")
SEEDS = (0, 1, 2)
TEST_SEED = 0           # the held-out problems: the same for every seed

SETTINGS = {  # IQConfig options of each fine-tuning setting (train.train)
    "mle": {"label": "MLE", "td_weight": 0.0},
    "iq-0.01": {"label": "IQ λ=0.01", "td_weight": 0.01},
    "iq-0.1": {"label": "IQ λ=0.1", "td_weight": 0.1},
    "iq-0.1-warmup": {"label": "IQ λ=0.1, warm-up", "td_weight": 0.1, "td_warmup": 0.5},
    "iq-0.01-g0.99": {"label": "IQ λ=0.01, γ=0.99", "td_weight": 0.01, "gamma": 0.99},
    "iq-0.01-g0.95": {"label": "IQ λ=0.01, γ=0.95", "td_weight": 0.01, "gamma": 0.95},
    # not in the default grid (add it with --settings): lambda * TD = 0.25 * NLL at every step
    "iq-rel0.25": {"label": "IQ relative λ (λ·TD = 0.25·NLL)", "td_ratio": 0.25},
}
EXPERIMENTS = {
    "main": ["mle", "iq-0.01", "iq-0.1-warmup"],
    "overfit": ["mle", "iq-0.01", "iq-0.1"],
    "gamma": ["iq-0.01-g0.99", "iq-0.01-g0.95"],
}
SPECIAL = {"main": ["base", "resources"]}     # seed-less jobs

COMMON = dict(max_new_tokens=96, gen_batch=64, max_length=256, reward_gammas=[1.0, 0.99, 0.95])
SIZES = {
    "main": dict(steps=150, batch=8, lr=3e-5, eval_every=30, n_curve=50, n_greedy=300,
                 n_sample=48, k=8, temperatures=[0.5, 0.7, 1.0, 1.3], reward_temperature=1.0,
                 resource_steps=4, resource_td_weight=0.01, **COMMON),
    "overfit": dict(n_train=64, epochs=20, batch=8, lr=3e-5, n_greedy=48, n_sample=8, k=4,
                    temperature=1.0, n_eval_nll=64, **COMMON),
    "gamma": dict(steps=150, batch=8, lr=3e-5, eval_every=0, n_curve=0, n_greedy=100,
                  n_sample=48, k=8, temperatures=[1.0], reward_temperature=1.0, **COMMON),
}
SMOKE = {   # the whole pipeline on tiny sizes (CI)
    "main": dict(steps=2, batch=2, eval_every=1, n_curve=2, n_greedy=2, n_sample=2, k=2,
                 temperatures=[0.5, 1.0], resource_steps=2, max_new_tokens=12, gen_batch=8),
    "overfit": dict(n_train=2, epochs=2, batch=2, n_greedy=2, n_sample=1, k=2, n_eval_nll=2,
                    max_new_tokens=12, gen_batch=8),
    "gamma": dict(steps=1, batch=2, n_greedy=1, n_sample=2, k=2, max_new_tokens=12, gen_batch=8),
}
# One seed of a few settings: every code path of a job (warm-up, relative lambda,
# gamma < 1); the statistics over seeds are tested on made-up job files.
SMOKE_SEEDS = {"main": (0,), "overfit": (0,), "gamma": (0,)}
SMOKE_SETTINGS = {"main": ["mle", "iq-0.1-warmup"], "overfit": ["iq-rel0.25"],
                  "gamma": ["iq-0.01-g0.95"]}

# Seconds per unit of work, measured on this 2-core machine with one torch thread
# while it was quiet (docs/results-smollm2.md, "Cost"), times LOAD for two
# single-threaded jobs sharing it.
COST = dict(setup=30.0, step_per_example=4.2 / 8, greedy=0.33, sample=0.37, score=0.39,
            eval_nll=0.06, resources=240.0)
LOAD = 1.25


def sizes_for(experiment: str, smoke: bool = False) -> dict:
    return {**SIZES[experiment], **(SMOKE[experiment] if smoke else {})}


@dataclasses.dataclass(frozen=True)
class Job:
    experiment: str
    setting: str            # a SETTINGS key, or 'base' / 'resources'
    seed: int | None = None

    @property
    def id(self) -> str:
        return f"{self.experiment}/{self.setting}" + ("" if self.seed is None
                                                      else f"-seed{self.seed}")

    def path(self, results: str) -> str:
        return os.path.join(results, self.id + ".json")

    @staticmethod
    def parse(job_id: str) -> "Job":
        experiment, _, name = job_id.partition("/")
        setting, _, seed = name.rpartition("-seed")
        if not setting:
            return Job(experiment, name)
        return Job(experiment, setting, int(seed))


def jobs(experiments: list[str], settings: list[str] | None = None,
         seeds: tuple[int, ...] | None = None, smoke: bool = False) -> list[Job]:
    """Every job of the experiments, the cheap seed-less ones first, then seed by
    seed (so that a partly finished grid has every setting of the first seeds)."""
    out = []
    for e in experiments:
        if settings is None:
            out += [Job(e, s) for s in SPECIAL.get(e, [])]
    for seed in sorted({s for e in experiments
                        for s in (seeds or (SMOKE_SEEDS[e] if smoke else SEEDS))}):
        for e in experiments:
            if seeds is None and smoke and seed not in SMOKE_SEEDS[e]:
                continue
            names = settings or (SMOKE_SETTINGS[e] if smoke else EXPERIMENTS[e])
            out += [Job(e, s, seed) for s in names]
    return out


def estimate_s(job: Job, sizes: dict) -> float:
    """The estimated CPU seconds of a job (one thread), from COST and its sizes."""
    c, z = COST, sizes
    if job.setting == "resources":
        return c["resources"] * LOAD
    if job.setting == "base":
        return (c["setup"] + z["n_greedy"] * c["greedy"]) * LOAD
    if job.experiment == "overfit":
        steps = z["epochs"] * -(-z["n_train"] // z["batch"])
        per_epoch = (z["n_greedy"] * c["greedy"] + z["n_sample"] * z["k"] * c["sample"]
                     + z["n_eval_nll"] * c["eval_nll"])
        return (c["setup"] + steps * z["batch"] * c["step_per_example"]
                + (z["epochs"] + 1) * per_epoch) * LOAD
    curve = (z["steps"] // z["eval_every"] - 1) * z["n_curve"] if z["eval_every"] else 0
    samples = z["n_sample"] * z["k"]
    return (c["setup"] + z["steps"] * z["batch"] * c["step_per_example"]
            + (curve + z["n_greedy"]) * c["greedy"]
            + samples * len(z["temperatures"]) * c["sample"] + samples * c["score"]) * LOAD


# ============================================================================ files


def write_json(path: str, data: dict) -> None:
    """Atomic: a reader sees the old file or the new one, never half of it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def status(job: Job, results: str, sizes: dict) -> str:
    """'done', 'stale' (a result with other sizes: rerun overwrites it),
    'running' (a live lock) or 'pending'."""
    r = read_json(job.path(results))
    if r is not None:
        return "done" if r.get("sizes") == sizes else "stale"
    return "running" if _lock_alive(job.path(results) + ".lock") else "pending"


# A running job touches its lock at every step and evaluation (a few minutes apart at
# most), so a lock untouched for this long belongs to a run that died.
LOCK_STALE_S = 30 * 60


def _lock_alive(lock: str) -> bool:
    info = read_json(lock)
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return False
    if info is None:
        return age < 60                 # being written by the process that just took it
    if age > LOCK_STALE_S:
        return False
    if info.get("host") == socket.gethostname():
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return True


def _take_lock(lock: str) -> bool:
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    if os.path.exists(lock) and not _lock_alive(lock):
        os.remove(lock)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
    return True


# ============================================================================ running a job

_MODEL: dict = {}


def base_model():
    """The pretrained model and tokenizer, loaded once per process."""
    if "model" not in _MODEL:
        import transformers
        transformers.logging.set_verbosity_error()
        _MODEL["model"], _MODEL["tok"] = load_model()
        _MODEL["model"].eval()
        gc.collect()
    return _MODEL["model"], _MODEL["tok"]


def held_out(sizes: dict):
    n = max(sizes.get("n_greedy", 0), sizes.get("n_sample", 0), sizes.get("n_curve", 0),
            sizes.get("n_eval_nll", 0))
    return make_split("test", n, TEST_SEED)


def sample_seed(seed: int, temperature: float, epoch: int = 0) -> int:
    return 100_000 * seed + 1000 * epoch + round(100 * temperature)


def environment(threads: int, backend: str) -> dict:
    import transformers
    return {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": importlib.import_module("trl").__version__,
                         "python": platform.python_version()},
            "cpu": f"{os.cpu_count()} cores ({platform.processor() or platform.machine()})",
            "threads": threads, "backend": backend, "host": socket.gethostname()}


def _exit_on_sigterm() -> None:
    """SIGTERM (kill, timeout) ends the process through SystemExit, so that the
    ``finally`` blocks run: a killed job removes its lock, the runner stops its jobs."""
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    except ValueError:               # not the main thread: leave the handler alone
        pass


def run_job(job: Job, results: str, *, threads: int = 1, backend: str = "auto",
            smoke: bool = False) -> str:
    """Runs one job unless it is done or running elsewhere; its progress goes to
    ``<file>.partial.json`` after every evaluation, its result to ``<file>``."""
    sizes = sizes_for(job.experiment, smoke)
    path = job.path(results)
    state = status(job, results, sizes)
    if state in ("done", "running"):
        print(f"[{job.id}] {state}: skipped", flush=True)
        return state
    lock = path + ".lock"
    _exit_on_sigterm()
    if not _take_lock(lock):
        print(f"[{job.id}] running elsewhere: skipped", flush=True)
        return "running"
    try:
        from fastirl.backends import resolve_backend
        torch.set_num_threads(threads)
        backend = resolve_backend(backend, torch.device("cpu")).name
        t0 = time.time()
        result = {"job": job.id, "experiment": job.experiment, "setting": job.setting,
                  "seed": job.seed, "options": SETTINGS.get(job.setting), "sizes": sizes,
                  "estimate_s": estimate_s(job, sizes), "load_avg_start": os.getloadavg(),
                  **environment(threads, backend)}

        def progress(update: dict | None = None) -> None:
            result.update(update or {})
            write_json(path + ".partial.json", {**result, "wall_s": time.time() - t0})
            os.utime(lock)                           # the lock stays fresh while we run

        print(f"[{job.id}] started (estimate {result['estimate_s'] / 60:.0f} min)", flush=True)
        base, tok = base_model()
        run = {"base": _run_base, "resources": _run_resources}.get(job.setting) or \
            (_run_overfit if job.experiment == "overfit" else _run_training)
        run(job, base, tok, sizes, threads, backend, progress)
        result.update(wall_s=time.time() - t0, load_avg_end=os.getloadavg())
        write_json(path, result)
        if os.path.exists(path + ".partial.json"):
            os.remove(path + ".partial.json")
        print(f"[{job.id}] done in {result['wall_s'] / 60:.1f} min", flush=True)
        return "done"
    finally:
        os.remove(lock)


def _greedy(model, tok, problems, prompts, sizes) -> tuple[list[int], list[str]]:
    outs = generate(model, tok, prompts, max_new_tokens=sizes["max_new_tokens"],
                    batch=sizes["gen_batch"])
    texts = [text_of(tok, o[0]) for o in outs]
    return [int(final_answer(t) == p.answer) for t, p in zip(texts, problems)], texts


def _samples(model, tok, problems, prompts, sizes, k, temperature, seed) -> dict:
    """k samples per prompt: per-prompt correctness and diversity (lists, one
    entry per prompt, so that the report can bootstrap over prompts)."""
    outs = generate(model, tok, prompts, k=k, temperature=temperature,
                    max_new_tokens=sizes["max_new_tokens"], batch=sizes["gen_batch"], seed=seed)
    texts = [[text_of(tok, o) for o in g] for g in outs]
    correct = [[int(final_answer(t) == p.answer) for t in ts] for ts, p in zip(texts, problems)]
    per_prompt = [prompt_diversity(g, ts, cs) for g, ts, cs in zip(outs, texts, correct)]
    entry = {"correct": correct, **{key: [d[key] for d in per_prompt] for key in per_prompt[0]},
             "mean_len": statistics.fmean(len(o) for g in outs for o in g),
             "examples": texts[0][:3]}
    return entry, outs


def _rewards(model, prompts, outs, correct, train_gamma, sizes) -> dict:
    """Per-sample log-likelihood and summed implicit rewards (for each gamma of
    ``reward_gammas``) under the trained float32 model, with the library's
    ``extract_rewards`` checked against them on the first prompt."""
    gammas = sorted({*sizes["reward_gammas"], train_gamma}, reverse=True)
    cols: dict = {"prompt": [], "correct": [], "len": [], "loglik": [],
                  "reward": {str(g): [] for g in gammas}}
    for i, (p, g, cs) in enumerate(zip(prompts, outs, correct)):
        for s, c in zip(score_samples(model, p, g, tuple(gammas)), cs):
            cols["prompt"].append(i)
            cols["correct"].append(c)
            cols["len"].append(s["len"])
            cols["loglik"].append(s["loglik"])
            for key, v in s["reward"].items():
                cols["reward"][key].append(v)
    cols["train_gamma"] = train_gamma
    cols["extract_rewards_max_abs_diff"] = check_extract_rewards(model, prompts[0], outs[0],
                                                                 train_gamma)
    return cols


def _run_base(job, base, tok, sizes, threads, backend, progress) -> None:
    """The pretrained model's greedy accuracy (step 0 of every curve), and the
    diversity of the expert solutions."""
    test = held_out(sizes)
    model = copy.deepcopy(base).to(GEN_DTYPE)
    n = sizes["n_greedy"]
    correct, texts = _greedy(model, tok, test[:n], prompt_ids(tok, test[:n]), sizes)
    progress({"greedy_correct": correct, "greedy_examples": texts[:2]})
    print(f"[{job.id}] greedy accuracy {statistics.fmean(correct):.3f}", flush=True)
    # the diversity of k expert solutions drawn at random for each sampled prompt
    rng = random.Random(f"expert-{TEST_SEED}")
    texts = [[rng.choice(p.solutions) for _ in range(sizes["k"])] for p in test[:sizes["n_sample"]]]
    groups = [[tok(t + tok.eos_token, add_special_tokens=False)["input_ids"] for t in ts]
              for ts in texts]
    per_prompt = [prompt_diversity(g, ts, [True] * len(ts)) for g, ts in zip(groups, texts)]
    progress({"expert": {key: [d[key] for d in per_prompt] for key in per_prompt[0]}})


def _run_resources(job, base, tok, sizes, threads, backend, progress) -> None:
    from .resources import resources
    cfg = dict(batch=sizes["batch"], seed=0, threads=threads, backend=backend,
               resource_steps=sizes["resource_steps"],
               resource_td_weight=sizes["resource_td_weight"])
    progress({"resources": resources(base, tok, make_split("train", sizes["batch"], 0), cfg)})


def _training_data(problems, seed: int):
    import datasets
    rng = random.Random(f"solutions-{seed}")
    return datasets.Dataset.from_list([chat_example(p, rng) for p in problems])


def _run_training(job, base, tok, sizes, threads, backend, progress) -> None:
    """main and gamma: train for ``steps``, then the final evaluations."""
    from .train import train
    setting = SETTINGS[job.setting]
    z = sizes
    train_ds = _training_data(make_split("train", z["steps"] * z["batch"], job.seed), job.seed)
    test = held_out(z)
    prompts = prompt_ids(tok, test)
    eval_model = copy.deepcopy(base).to(GEN_DTYPE)      # bf16 copy that generates
    curve: dict = {"step": [], "greedy_acc": []}

    def on_step(step, model):
        if z["eval_every"] and step % z["eval_every"] == 0 and step < z["steps"]:
            eval_model.load_state_dict(model.state_dict())
            correct, _ = _greedy(eval_model, tok, test[:z["n_curve"]], prompts[:z["n_curve"]], z)
            curve["step"].append(step)
            curve["greedy_acc"].append(statistics.fmean(correct))
            progress({"curve": curve})
            print(f"[{job.id}] step {step}: greedy accuracy {curve['greedy_acc'][-1]:.3f}",
                  flush=True)

    t0 = time.time()
    trained, log = train(setting, base, tok, train_ds, steps=z["steps"], batch=z["batch"],
                         lr=z["lr"], seed=job.seed, threads=threads, backend=backend,
                         max_length=z["max_length"], on_step=on_step, progress=progress)
    progress({"train_log": log, "train_wall_s": time.time() - t0,
              "train_s_per_step": statistics.median(log["step_s"])})
    gc.collect()                                      # the trainer's optimizer state
    eval_model.load_state_dict(trained.state_dict())
    t0 = time.time()
    correct, texts = _greedy(eval_model, tok, test[:z["n_greedy"]], prompts[:z["n_greedy"]], z)
    if z["eval_every"]:                       # the curve's last point: the final model
        curve["step"].append(z["steps"])
        curve["greedy_acc"].append(statistics.fmean(correct[:z["n_curve"]]))
    ev: dict = {"greedy_correct": correct, "greedy_examples": texts[:3], "temperatures": {}}
    progress({"curve": curve, "eval": ev})
    print(f"[{job.id}] greedy accuracy {statistics.fmean(correct):.3f} on {len(correct)}",
          flush=True)
    n = z["n_sample"]
    for temperature in z["temperatures"]:
        entry, outs = _samples(eval_model, tok, test[:n], prompts[:n], z, z["k"], temperature,
                               sample_seed(job.seed, temperature))
        ev["temperatures"][str(temperature)] = entry
        if temperature == z["reward_temperature"]:
            ev["rewards"] = _rewards(trained, prompts[:n], outs, entry["correct"],
                                     setting.get("gamma", 1.0), z)
            ev["rewards"]["temperature"] = temperature
        progress({"eval": ev})
        acc = statistics.fmean(c for cs in entry["correct"] for c in cs)
        print(f"[{job.id}] T={temperature}: sample accuracy {acc:.3f}, self-BLEU-4 "
              f"{statistics.fmean(entry['self_bleu']):.3f}", flush=True)
    progress({"eval_wall_s": time.time() - t0})


def _run_overfit(job, base, tok, sizes, threads, backend, progress) -> None:
    """A small training set for many epochs; held-out quality after every epoch."""
    import datasets

    from .train import train
    z = sizes
    train_ds = _training_data(make_split("train", z["n_train"], job.seed), job.seed)
    test = held_out(z)
    prompts = prompt_ids(tok, test)
    rng = random.Random("held-out-solutions")       # the same held-out NLL set for every seed
    eval_ds = datasets.Dataset.from_list([chat_example(p, rng) for p in test[:z["n_eval_nll"]]])
    eval_model = copy.deepcopy(base).to(GEN_DTYPE)
    epochs: dict = {"epoch": [], "greedy_correct": [], "samples": [], "eval_s": []}

    def on_epoch(epoch, model):
        t0 = time.time()
        eval_model.load_state_dict(model.state_dict())
        correct, _ = _greedy(eval_model, tok, test[:z["n_greedy"]], prompts[:z["n_greedy"]], z)
        entry, _ = _samples(eval_model, tok, test[:z["n_sample"]], prompts[:z["n_sample"]], z,
                            z["k"], z["temperature"], sample_seed(job.seed, z["temperature"], epoch))
        for key, v in (("epoch", epoch), ("greedy_correct", correct), ("samples", entry),
                       ("eval_s", time.time() - t0)):
            epochs[key].append(v)
        progress({"epochs": epochs})
        print(f"[{job.id}] epoch {epoch}: greedy accuracy {statistics.fmean(correct):.3f}, "
              f"self-BLEU-4 {statistics.fmean(entry['self_bleu']):.3f}", flush=True)

    t0 = time.time()
    _, log = train(SETTINGS[job.setting], base, tok, train_ds, epochs=z["epochs"],
                   batch=z["batch"], lr=z["lr"], seed=job.seed, threads=threads,
                   backend=backend, max_length=z["max_length"], eval_ds=eval_ds,
                   on_epoch=on_epoch, progress=progress)
    progress({"train_log": log, "wall_train_and_eval_s": time.time() - t0,
              "train_s_per_step": statistics.median(log["step_s"])})


# ============================================================================ many jobs


def run_pending(job_list: list[Job], results: str, *, workers: int, threads: int,
                backend: str, entry: str, smoke: bool = False, on_finish=None,
                poll_s: float = 5.0) -> None:
    """Runs every pending job in its own process (``entry --only <id>``), at most
    ``workers`` at a time; the output of each goes to ``<results>/logs/``.  The
    resources job, whose throughput needs a quiet machine, runs alone."""
    import subprocess
    logs = os.path.join(results, "logs")
    os.makedirs(logs, exist_ok=True)
    pending = [j for j in job_list
               if status(j, results, sizes_for(j.experiment, smoke)) in ("pending", "stale")]
    running: list[tuple[Job, subprocess.Popen]] = []
    print(f"{len(pending)} pending job(s), {workers} worker(s) x {threads} thread(s)", flush=True)
    _exit_on_sigterm()
    try:
        _schedule(pending, running, results, workers, threads, backend, entry, smoke, on_finish,
                  poll_s, logs)
    finally:                         # stopped (Ctrl-C, kill): stop the running jobs too
        for job, proc in running:
            proc.terminate()
            print(f"stopped {job.id}", flush=True)
        for _, proc in running:
            proc.wait()


def _schedule(pending, running, results, workers, threads, backend, entry, smoke, on_finish,
              poll_s, logs) -> None:
    import subprocess
    while pending or running:
        exclusive = any(j.setting == "resources" for j, _ in running)
        while pending and len(running) < workers and not exclusive:
            if pending[0].setting == "resources" and running:
                break                                # wait until it can run alone
            job = pending.pop(0)
            log = open(os.path.join(logs, job.id.replace("/", "_") + ".log"), "a")
            cmd = [sys.executable, entry, "--only", job.id, "--threads", str(threads),
                   "--backend", backend, "--results", results] + (["--smoke"] if smoke else [])
            running.append((job, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)))
            log.close()
            print(f"{time.strftime('%H:%M')} started {job.id}", flush=True)
            exclusive = job.setting == "resources"
        time.sleep(poll_s)
        for job, proc in list(running):
            if proc.poll() is not None:
                running.remove((job, proc))
                print(f"{time.strftime('%H:%M')} {job.id}: "
                      f"{'finished' if proc.returncode == 0 else f'FAILED ({proc.returncode})'}",
                      flush=True)
                if on_finish is not None:
                    try:                             # a figure must never stop the grid
                        on_finish()
                    except Exception as e:           # noqa: BLE001
                        print(f"redrawing failed: {e!r}", flush=True)
