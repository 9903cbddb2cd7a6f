"""Everything the results page says, computed from whatever job files exist:
means with standard errors over seeds, differences to MLE with a paired
bootstrap and Welch's t-test, the markdown tables and the figures.

Significance.  The independent replicates are the seeds (a seed draws the
training data, its order and every sampling seed), and within a seed every
setting is evaluated on the same held-out problems and prompts.  A difference
is called significant when the 95 % interval of a hierarchical paired bootstrap
(seeds drawn with replacement, then problems / prompts within each seed, the
same draw for both settings) excludes 0: it carries both the run-to-run and the
evaluation noise and uses the pairing.  With three seeds the seed level of the
bootstrap is coarse, so Welch's t-test on the three per-seed means is printed
next to it as the conservative check (it ignores the pairing and has only about
2-4 degrees of freedom).
"""

from __future__ import annotations

import math
import os
import statistics

from . import grid
from .metrics import interpolate_at, mean_se, paired_bootstrap, roc_auc, spearman, welch_t_test

BOOT_REPS = 1000


# ============================================================================ loading


def load(results: str, smoke: bool = False) -> dict:
    """{experiment: {setting: {seed: result}}} of every finished job whose sizes
    are the current ones, plus 'base' and 'resources' (None when missing)."""
    out: dict = {e: {} for e in grid.EXPERIMENTS}
    out["base"] = out["resources"] = None
    for e in grid.EXPERIMENTS:
        folder = os.path.join(results, e)
        sizes = grid.sizes_for(e, smoke)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if not name.endswith(".json") or name.endswith(".partial.json"):
                continue
            r = grid.read_json(os.path.join(folder, name))
            if r is None or r.get("sizes") != sizes:
                continue
            if r["seed"] is None:
                out[r["setting"]] = r
            else:
                out[e].setdefault(r["setting"], {})[r["seed"]] = r
    return out


def _label(setting: str) -> str:
    return grid.SETTINGS[setting]["label"] if setting in grid.SETTINGS else setting


def _ordered(runs: dict, experiment: str) -> list[str]:
    known = grid.EXPERIMENTS[experiment]
    return [s for s in known if s in runs] + sorted(s for s in runs if s not in known)


def fmt(mean: float, se: float | None = None, digits: int = 3) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def fmt_ms(values, digits: int = 3) -> str:
    return fmt(*mean_se(values), digits=digits)


# ============================================================================ per-run metrics


def sample_acc(entry: dict) -> list[float]:
    """Per prompt: the fraction of its k samples that are correct."""
    return [statistics.fmean(cs) for cs in entry["correct"]]


def pass_at_k(entry: dict) -> list[float]:
    return [float(any(cs)) for cs in entry["correct"]]


PROMPT_METRICS = {  # per-prompt lists of one temperature's samples
    "sample acc": sample_acc, "pass@k": pass_at_k,
    "self-BLEU-4": lambda e: e["self_bleu"], "distinct-3": lambda e: e["distinct_3"],
    "paths": lambda e: e["paths"], "correct paths": lambda e: e["correct_paths"],
}


def by_prompt(rewards: dict, score: list[float]) -> list[tuple[list[float], list[int]]]:
    groups: dict = {}
    for i, s, c in zip(rewards["prompt"], score, rewards["correct"]):
        groups.setdefault(i, ([], []))
        groups[i][0].append(s)
        groups[i][1].append(c)
    return [groups[i] for i in sorted(groups)]


def best_of_k(rewards: dict, score: list[float]) -> list[float]:
    """Per prompt: 1 if its sample with the highest score is correct."""
    return [float(cs[max(range(len(s)), key=s.__getitem__)]) for s, cs in by_prompt(rewards, score)]


def reward_scores(rewards: dict, gamma: str) -> dict:
    """The rankings of one run's T = 1 samples: summed reward (with gamma), the
    log-likelihood, both per token."""
    lens = [max(n, 1) for n in rewards["len"]]
    r = rewards["reward"][gamma]
    return {"reward": r, "reward / token": [v / n for v, n in zip(r, lens)],
            "likelihood": rewards["loglik"],
            "likelihood / token": [v / n for v, n in zip(rewards["loglik"], lens)]}


def reward_metrics(rewards: dict, gamma: str) -> dict:
    s = reward_scores(rewards, gamma)
    r, correct = s["reward"], rewards["correct"]
    within_auc = [roc_auc(x, c) for x, c in by_prompt(rewards, r)]
    within_rho = [spearman(x, ll) for (x, _), (ll, _) in
                  zip(by_prompt(rewards, r), by_prompt(rewards, rewards["loglik"]))]
    within_len = [spearman(x, n) for (x, _), (n, _) in
                  zip(by_prompt(rewards, r), by_prompt(rewards, rewards["len"]))]
    return {
        "AUC": roc_auc(r, correct),
        "AUC within prompt": _mean([a for a in within_auc if a is not None]),
        "Spearman (reward, correct)": spearman(r, correct),
        "Spearman (reward, likelihood) within prompt": _mean([x for x in within_rho
                                                              if x is not None]),
        "Spearman (reward, length) within prompt": _mean([x for x in within_len
                                                          if x is not None]),
        "best-of-k by reward": statistics.fmean(best_of_k(rewards, r)),
        "best-of-k by reward / token": statistics.fmean(best_of_k(rewards, s["reward / token"])),
        "best-of-k by likelihood": statistics.fmean(best_of_k(rewards, s["likelihood"])),
        "best-of-k by likelihood / token": statistics.fmean(
            best_of_k(rewards, s["likelihood / token"])),
        "random pick": statistics.fmean(correct),
    }


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


# ============================================================================ comparisons


def compare(runs_a: dict, runs_b: dict, fn, stat=None) -> dict | None:
    """setting a - setting b over the seeds both have: the paired bootstrap and
    Welch's test on the per-seed values; None with fewer than two seeds, or where
    the difference is undefined (a setting that never reaches the matched sample
    accuracy: its interpolated value is NaN).

    ``fn(result)`` gives a run's per-unit values (one per held-out problem or
    prompt: the last axis); ``stat(take, arrays)`` turns the (seeds x ... x units)
    arrays into the statistic, reading every (seeds x units) slice through
    ``take`` (which resamples it); the default is the mean of all units."""
    import numpy as np
    seeds = sorted(set(runs_a) & set(runs_b))
    if len(seeds) < 2:
        return None
    a = np.asarray([fn(runs_a[s]) for s in seeds], dtype=float)
    b = np.asarray([fn(runs_b[s]) for s in seeds], dtype=float)
    stat = stat or (lambda take, arr: float(np.mean(take(arr))))
    boot = paired_bootstrap(lambda take: stat(take, a), lambda take: stat(take, b),
                            len(seeds), a.shape[-1], reps=BOOT_REPS)
    if not math.isfinite(boot["diff"]):
        return None
    per_seed = lambda arr: [stat(lambda x, i=i: x[[i]], arr) for i in range(len(seeds))]  # noqa: E731
    welch = welch_t_test(per_seed(a), per_seed(b))
    return {"seeds": len(seeds), **boot, "p_welch": None if welch is None else welch["p"]}


def fmt_compare(c: dict | None) -> list[str]:
    if c is None:
        return ["–", "–", "–", "–"]
    sig = "**yes**" if c["lo"] > 0 or c["hi"] < 0 else "no"
    pw = "–" if c["p_welch"] is None else f"{c['p_welch']:.3f}"
    return [f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]", f"{c['p']:.3f}", pw, sig]


NO_DIFFERENCES = "(Differences to MLE with intervals and tests need two or more seeds per setting.)"


def differences_table(cells: list[list[str]]) -> list[str]:
    """Rows [metric, setting, difference, p (bootstrap), p (Welch), significant]
    as a table; where no difference is defined (one seed per setting), a
    sentence saying why instead."""
    if all(row[2] == "–" for row in cells):
        return [NO_DIFFERENCES]
    return _header(["metric", "setting", "Δ vs MLE [95 % CI]", "p (bootstrap)",
                    "p (Welch, seeds)", "significant"]) + [_row(row) for row in cells]


def matched_level(data: dict) -> float | None:
    """The quality level at which diversity is compared: MLE's mean sample
    accuracy at T = 1 (None without MLE runs)."""
    mle = data["main"].get("mle")
    if not mle:
        return None
    return _mean([statistics.fmean(sample_acc(r["eval"]["temperatures"]["1.0"]))
                  for r in mle.values()])


def matched(level: float, temps: list[str], metric: str):
    """(fn, stat) for ``compare``: ``metric`` at sample accuracy ``level``,
    interpolated along a run's points at the temperatures ``temps``."""
    import numpy as np

    def fn(result):               # temperatures x (sample acc, metric) x prompts
        t = result["eval"]["temperatures"]
        return [[sample_acc(t[x]), PROMPT_METRICS[metric](t[x])] for x in temps]

    def stat(take, arr):          # arr: seeds x temperatures x 2 x prompts
        acc = [float(np.mean(take(arr[:, j, 0]))) for j in range(len(temps))]
        val = [float(np.mean(take(arr[:, j, 1]))) for j in range(len(temps))]
        return interpolate_at(level, acc, val)
    return fn, stat


def matched_value(runs: dict, level, temps, metric) -> list[float]:
    """Per seed: ``metric`` at sample accuracy ``level``."""
    import numpy as np
    fn, stat = matched(level, temps, metric)
    return [stat(lambda x: x, np.asarray([fn(r)], dtype=float)) for r in runs.values()]


# ============================================================================ tables


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(cells) -> list[str]:
    return [_row(cells), "|" + "---|" * len(cells)]


def table_main(data: dict) -> list[str]:
    runs = data["main"]
    if not runs:
        return []
    z = grid.sizes_for("main", data.get("smoke", False))
    k = z["k"]
    lines = _header(["setting", "seeds", f"greedy acc ({z['n_greedy']})", "sample acc (T=1)",
                     f"pass@{k} (T=1)", "self-BLEU-4 ↓ (T=1)", "distinct-3 (T=1)",
                     "paths / prompt (T=1)", "correct paths / prompt (T=1)", "s / step"])
    if data["base"]:
        lines.append(_row(["base model", "–", fmt(statistics.fmean(data["base"]["greedy_correct"])),
                           *["–"] * 7]))
    for s in _ordered(runs, "main"):
        rs = list(runs[s].values())
        t1 = [r["eval"]["temperatures"]["1.0"] for r in rs]
        lines.append(_row([_label(s), len(rs),
                           fmt_ms([statistics.fmean(r["eval"]["greedy_correct"]) for r in rs]),
                           *[fmt_ms([statistics.fmean(PROMPT_METRICS[m](e)) for e in t1],
                                    2 if "paths" in m else 3)
                             for m in ("sample acc", "pass@k", "self-BLEU-4", "distinct-3",
                                       "paths", "correct paths")],
                           fmt_ms([r["train_s_per_step"] for r in rs], 2)]))
    if data["base"] and data["base"].get("expert"):
        e = data["base"]["expert"]
        lines.append(_row([f"expert solutions ({k} drawn per prompt)", "–", "–", "1.000", "1.000",
                           fmt(statistics.fmean(e["self_bleu"])),
                           fmt(statistics.fmean(e["distinct_3"])),
                           fmt(statistics.fmean(e["paths"]), digits=2),
                           fmt(statistics.fmean(e["correct_paths"]), digits=2), "–"]))
    return lines


def table_front(data: dict) -> list[str]:
    runs = data["main"]
    if not runs:
        return []
    z = grid.sizes_for("main", data.get("smoke", False))
    metrics = ["sample acc", "pass@k", "self-BLEU-4", "distinct-3", "paths", "correct paths"]
    lines = _header(["setting", "T", *[m.replace("pass@k", f"pass@{z['k']}") for m in metrics]])
    for s in _ordered(runs, "main"):
        for t in z["temperatures"]:
            es = [r["eval"]["temperatures"][str(t)] for r in runs[s].values()]
            lines.append(_row([_label(s), t, *[fmt_ms([statistics.fmean(PROMPT_METRICS[m](e))
                                                       for e in es], 2 if "paths" in m else 3)
                                               for m in metrics]]))
    return lines


def table_significance(data: dict) -> list[str]:
    """Every setting of main against MLE."""
    runs = data["main"]
    if "mle" not in runs:
        return []
    z = grid.sizes_for("main", data.get("smoke", False))
    temps = [str(t) for t in z["temperatures"]]
    level = matched_level(data)
    cells = []
    for s in _ordered(runs, "main"):
        if s == "mle":
            continue
        rows = [("greedy accuracy", compare(runs[s], runs["mle"],
                                            lambda r: r["eval"]["greedy_correct"]))]
        for t in temps:
            for m in ("sample acc", "self-BLEU-4", "correct paths"):
                rows.append((f"{m}, T={t}", compare(
                    runs[s], runs["mle"],
                    lambda r, t=t, m=m: PROMPT_METRICS[m](r["eval"]["temperatures"][t]))))
        if level is not None:
            for m in ("self-BLEU-4", "paths", "correct paths", "pass@k"):
                name = m.replace("pass@k", f"pass@{z['k']}")
                rows.append((f"{name} at sample acc = {level:.3f}",
                             compare(runs[s], runs["mle"], *matched(level, temps, m))))
        cells += [[name, _label(s), *fmt_compare(c)] for name, c in rows]
    return differences_table(cells)


def table_matched(data: dict) -> list[str]:
    runs = data["main"]
    level = matched_level(data)
    if level is None:
        return []
    z = grid.sizes_for("main", data.get("smoke", False))
    temps = [str(t) for t in z["temperatures"]]
    metrics = ("self-BLEU-4", "paths", "correct paths", "pass@k")
    lines = _header(["setting", *[f"{m.replace('pass@k', 'pass@' + str(z['k']))} at sample "
                                  f"acc {level:.3f}" for m in metrics]])
    for s in _ordered(runs, "main"):
        lines.append(_row([_label(s), *[fmt_ms(matched_value(runs[s], level, temps, m),
                                               2 if "paths" in m else 3) for m in metrics]]))
    return lines


def curve_points(data: dict, setting: str) -> tuple[list[int], list[tuple[float, float]]]:
    """Steps and (mean, SE) of main's learning curve; step 0 is the base model."""
    runs = list(data["main"].get(setting, {}).values())
    steps = sorted({st for r in runs for st in r.get("curve", {}).get("step", [])})
    pts = [mean_se([r["curve"]["greedy_acc"][r["curve"]["step"].index(st)] for r in runs
                    if st in r["curve"]["step"]]) for st in steps]
    if data["base"] and steps:
        n = grid.sizes_for("main", data.get("smoke", False))["n_curve"]
        steps = [0] + steps
        pts = [(statistics.fmean(data["base"]["greedy_correct"][:n]), None)] + pts
    return steps, pts


def table_curves(data: dict) -> list[str]:
    settings = _ordered(data["main"], "main")
    if not settings:
        return []
    steps = curve_points(data, settings[0])[0]
    lines = _header(["step", *[_label(s) for s in settings]])
    cols = [dict(zip(*curve_points(data, s))) for s in settings]
    for st in steps:
        lines.append(_row([st, *[fmt(*c[st]) if st in c else "–" for c in cols]]))
    return lines


def overfit_series(runs: dict, fn) -> tuple[list[int], list[tuple[float, float]]]:
    """Epochs and (mean, SE) over seeds of ``fn(result, epoch index)``."""
    rs = list(runs.values())
    epochs = rs[0]["epochs"]["epoch"] if rs else []
    return epochs, [mean_se([fn(r, i) for r in rs]) for i in range(len(epochs))]


OVERFIT_METRICS = {
    "greedy acc": lambda r, i: statistics.fmean(r["epochs"]["greedy_correct"][i]),
    "held-out NLL": lambda r, i: r["train_log"]["eval_nll"][i],
    "self-BLEU-4": lambda r, i: statistics.fmean(r["epochs"]["samples"][i]["self_bleu"]),
    "sample acc": lambda r, i: statistics.fmean(sample_acc(r["epochs"]["samples"][i])),
}


def table_overfit_curves(data: dict) -> list[str]:
    runs = data["overfit"]
    settings = _ordered(runs, "overfit")
    if not settings:
        return []
    names = ("greedy acc", "held-out NLL", "self-BLEU-4")
    lines = _header(["epoch", *[f"{m}: {_label(s)}" for m in names for s in settings]])
    series = {(m, s): overfit_series(runs[s], OVERFIT_METRICS[m]) for m in names for s in settings}
    epochs = series[(names[0], settings[0])][0]
    for i, ep in enumerate(epochs):
        lines.append(_row([ep, *[fmt(*series[(m, s)][1][i]) if i < len(series[(m, s)][1])
                                 else "–" for m in names for s in settings]]))
    return lines


def _decay(r: dict) -> float:
    """Best held-out greedy accuracy over the epochs minus the mean of the last three."""
    acc = [statistics.fmean(c) for c in r["epochs"]["greedy_correct"]]
    return max(acc) - statistics.fmean(acc[-3:])


def _nll_rise(r: dict) -> float:
    """Held-out NLL after the last epoch minus its lowest over the epochs."""
    nll = r["train_log"]["eval_nll"]
    return nll[-1] - min(nll)


def table_overfit_summary(data: dict) -> list[str]:
    runs = data["overfit"]
    if not runs:
        return []
    lines = _header(["setting", "seeds", "best greedy acc (epoch)", "last 3 epochs' greedy acc",
                     "decay (best − last 3)", "lowest held-out NLL (epoch)", "last held-out NLL",
                     "NLL rise (last − lowest)", "last self-BLEU-4"])
    for s in _ordered(runs, "overfit"):
        rs = list(runs[s].values())
        ep, acc = overfit_series(runs[s], OVERFIT_METRICS["greedy acc"])
        _, nll = overfit_series(runs[s], OVERFIT_METRICS["held-out NLL"])
        _, sb = overfit_series(runs[s], OVERFIT_METRICS["self-BLEU-4"])
        best = max(range(len(acc)), key=lambda i: acc[i][0])
        low = min(range(len(nll)), key=lambda i: nll[i][0] if nll[i][0] is not None else math.inf)
        last3 = [statistics.fmean(statistics.fmean(c) for c in r["epochs"]["greedy_correct"][-3:])
                 for r in rs]
        lines.append(_row([_label(s), len(rs), f"{fmt(*acc[best])} ({ep[best]})", fmt_ms(last3),
                           fmt_ms([_decay(r) for r in rs]), f"{fmt(*nll[low])} ({ep[low]})",
                           fmt(*nll[-1]), fmt_ms([_nll_rise(r) for r in rs]), fmt(*sb[-1])]))
    if "mle" in runs:
        cells = []
        last3 = lambda r: [statistics.fmean(x) for x in zip(*r["epochs"]["greedy_correct"][-3:])]  # noqa: E731
        for s in _ordered(runs, "overfit"):
            if s == "mle":
                continue
            cells.append(["greedy acc, last 3 epochs", _label(s),
                          *fmt_compare(compare(runs[s], runs["mle"], last3))])
            for name, per_run in (("decay (best − last 3)", _decay),
                                  ("NLL rise (last − lowest)", _nll_rise)):
                w = welch_t_test([per_run(r) for r in runs[s].values()],
                                 [per_run(r) for r in runs["mle"].values()])
                cells.append([name, _label(s), "–" if w is None else f"{w['diff']:+.3f}",
                              "–", "–" if w is None else f"{w['p']:.3f}",
                              "–" if w is None else ("**yes**" if w["p"] < 0.05 else "no")])
            cells.append(["held-out NLL, last epoch", _label(s), *fmt_compare(compare(
                runs[s], runs["mle"], lambda r: [r["train_log"]["eval_nll"][-1]]))])
        lines += ["", *differences_table(cells)]
    return lines


def reward_runs(data: dict) -> list[tuple[str, str, dict]]:
    """(experiment, setting, {seed: result}) of every run with rewards."""
    out = []
    for e in ("main", "gamma"):
        for s in _ordered(data[e], e):
            runs = {seed: r for seed, r in data[e][s].items() if "rewards" in r.get("eval", {})}
            if runs:
                out.append((e, s, runs))
    return out


REWARD_COLUMNS = ("AUC", "AUC within prompt", "Spearman (reward, correct)",
                  "Spearman (reward, likelihood) within prompt",
                  "Spearman (reward, length) within prompt", "best-of-k by reward",
                  "best-of-k by likelihood", "best-of-k by likelihood / token", "random pick")


def table_rewards(data: dict) -> list[str]:
    rows = reward_runs(data)
    if not rows:
        return []
    k = grid.sizes_for("main", data.get("smoke", False))["k"]
    lines = _header(["model", "trained γ", "extracted γ", "seeds",
                     *[c.replace("-k", f"-{k}") for c in REWARD_COLUMNS],
                     "reward − likelihood best-of-k [95 % CI]", "p (bootstrap)"])
    for e, s, runs in rows:
        rs = list(runs.values())
        train_g = rs[0]["eval"]["rewards"]["train_gamma"]
        for g in sorted(rs[0]["eval"]["rewards"]["reward"], key=float, reverse=True):
            ms = [reward_metrics(r["eval"]["rewards"], g) for r in rs]
            diff = _reward_vs_likelihood(runs, g)
            lines.append(_row([_label(s), train_g, g + (" (trained)" if float(g) == train_g else ""),
                               len(rs), *[fmt_ms([m[c] for m in ms]) for c in REWARD_COLUMNS],
                               *fmt_compare(diff)[:2]]))
    return lines


def _reward_vs_likelihood(runs: dict, gamma: str) -> dict | None:
    """Best-of-k by summed reward minus by log-likelihood, paired on the same samples."""
    import numpy as np
    seeds = sorted(runs)
    if len(seeds) < 2:
        return None
    a = [best_of_k(runs[s]["eval"]["rewards"], runs[s]["eval"]["rewards"]["reward"][gamma])
         for s in seeds]
    b = [best_of_k(runs[s]["eval"]["rewards"], runs[s]["eval"]["rewards"]["loglik"])
         for s in seeds]
    boot = paired_bootstrap(lambda take: float(np.mean(take(a))),
                            lambda take: float(np.mean(take(b))), len(seeds), len(a[0]),
                            reps=BOOT_REPS)
    return {**boot, "p_welch": None}


def table_lambda(data: dict) -> list[str]:
    """What the first steps' logs say, per setting: the material of the lambda rule."""
    lines = _header(["experiment", "setting", "λ", "λ used at steps 1-3 → last",
                     "nll, steps 1-3", "td_penalty, steps 1-3", "λ·td / nll at start (target λ)",
                     "steps until td < td₀/10", "nll at step 25", "td_penalty at step 25",
                     "held-out greedy acc"])
    for e in ("main", "gamma", "overfit"):
        for s in _ordered(data[e], e):
            rs = [r for r in data[e][s].values() if "train_log" in r]
            if not rs:
                continue
            lam = grid.SETTINGS[s].get("td_weight")
            nll0 = [statistics.fmean(r["train_log"]["nll"][:3]) for r in rs]
            td0 = [statistics.fmean(r["train_log"]["td_penalty"][:3]) for r in rs]
            ratio = [lam * t / n for t, n in zip(td0, nll0)] if lam is not None else []
            fall = [next((st for st, t in zip(r["train_log"]["step"], r["train_log"]["td_penalty"])
                          if t < t0 / 10), math.nan) for r, t0 in zip(rs, td0)]
            at25 = lambda key: [r["train_log"][key][min(24, len(r["train_log"][key]) - 1)]  # noqa: E731
                                for r in rs]
            if e == "overfit":
                acc = [statistics.fmean(statistics.fmean(c) for c in r["epochs"]["greedy_correct"][-3:])
                       for r in rs]
            else:
                acc = [statistics.fmean(r["eval"]["greedy_correct"]) for r in rs]
            used = [r["train_log"]["td_weight"] for r in rs]
            used = (f"{fmt(_mean([statistics.fmean(u[:3]) for u in used]), digits=4)} → "
                    f"{fmt(_mean([u[-1] for u in used]), digits=4)}")
            lines.append(_row([e, _label(s), "relative" if lam is None else lam, used,
                               fmt_ms(nll0, 2), fmt_ms(td0, 1), fmt_ms(ratio, 2),
                               fmt_ms(fall, 1), fmt_ms(at25("nll"), 2), fmt_ms(at25("td_penalty"), 1),
                               fmt_ms(acc)]))
    return lines


def table_resources(data: dict) -> list[str]:
    res = (data["resources"] or {}).get("resources")
    if not res:
        return []
    lines = _header(["loss path", "peak memory above the loaded model", "tokens/s (median step)",
                     "loss after the steps"])
    for r in res:
        lines.append(_row([r["name"], f"{r['peak_mib']:,.0f} MiB", f"{r['tokens_per_s']:.0f}",
                           f"{r['loss']:.4f}"]))
    return lines


def table_runs(data: dict) -> list[str]:
    """Cost of the jobs: measured against estimated, load, versions."""
    lines = _header(["experiment", "jobs done", "minutes per job (measured)",
                     "minutes per job (estimated)", "s / training step (median)",
                     "load average (start → end)"])
    for e in grid.EXPERIMENTS:
        rs = [r for runs in data[e].values() for r in runs.values()]
        rs += [data[x] for x in ("base", "resources") if e == "main" and data[x]]
        if not rs:
            continue
        steps = [r["train_s_per_step"] for r in rs if "train_s_per_step" in r]
        lines.append(_row([e, len(rs), fmt(statistics.fmean(r["wall_s"] for r in rs) / 60, digits=1),
                           fmt(statistics.fmean(r["estimate_s"] for r in rs) / 60, digits=1),
                           fmt(statistics.fmean(steps), digits=2) if steps else "–",
                           f"{statistics.fmean(r['load_avg_start'][0] for r in rs):.1f} → "
                           f"{statistics.fmean(r['load_avg_end'][0] for r in rs):.1f}"]))
    any_run = next((r for e in grid.EXPERIMENTS for runs in data[e].values()
                    for r in runs.values()), None)
    if any_run:
        v = any_run["versions"]
        lines += ["", f"Versions: torch {v['torch']}, transformers {v['transformers']}, "
                      f"TRL {v['trl']}, Python {v['python']}; CPU {any_run['cpu']}, "
                      f"{any_run['threads']} torch thread(s) per job, fastirl backend "
                      f"`{any_run['backend']}`."]
    return lines


def markdown(data: dict) -> str:
    """Every table of docs/results-smollm2.md, from the job files."""
    sections = [
        ("Main: final evaluation (mean ± standard error over seeds)", table_main(data)),
        ("Main: differences to MLE", table_significance(data)),
        ("Main: diversity at matched quality (interpolated along the temperatures)",
         table_matched(data)),
        ("Main: quality and diversity per temperature", table_front(data)),
        ("Main: learning curves (greedy accuracy on the curve problems)", table_curves(data)),
        ("Overfitting: summary", table_overfit_summary(data)),
        ("Overfitting: per epoch", table_overfit_curves(data)),
        ("Rewards of the T = 1 samples", table_rewards(data)),
        ("First steps (material for the λ rule)", table_lambda(data)),
        ("Resources of one training step", table_resources(data)),
        ("Runs", table_runs(data)),
    ]
    return "\n\n".join(f"### {title}\n\n" + "\n".join(lines)
                       for title, lines in sections if lines) + "\n"


# ============================================================================ figures


def _errorbar(ax, xs, pts, **kw):
    ys = [m for m, _ in pts]
    errs = [0 if se is None else se for _, se in pts]
    ax.errorbar(xs, ys, yerr=errs, capsize=3, **kw)


def plot(data: dict, folder: str) -> list[str]:
    """figure.png (the four questions) and details.png, in ``folder``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = dict(zip(grid.SETTINGS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    z = grid.sizes_for("main", data.get("smoke", False))
    temps = [str(t) for t in z["temperatures"]]

    def seeds_of(runs: dict) -> str:
        n = max((len(r) for r in runs.values()), default=0)
        return f"{n} seed{'' if n == 1 else 's'}"

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    ax = axes[0, 0]
    for s in _ordered(data["main"], "main"):
        steps, pts = curve_points(data, s)
        _errorbar(ax, steps, pts, marker="o", ms=4, color=colors[s], label=_label(s))
    ax.set(xlabel="optimizer step", ylabel="greedy exact match",
           title=f"Learning curves ({z['n_curve']} held-out problems, "
                 f"{seeds_of(data['main'])}, ± SE)")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    for s in _ordered(data["main"], "main"):
        rs = list(data["main"][s].values())
        xs = [mean_se([statistics.fmean(r["eval"]["temperatures"][t]["self_bleu"]) for r in rs])
              for t in temps]
        ys = [mean_se([statistics.fmean(sample_acc(r["eval"]["temperatures"][t])) for r in rs])
              for t in temps]
        ax.errorbar([m for m, _ in xs], [m for m, _ in ys], xerr=[e or 0 for _, e in xs],
                    yerr=[e or 0 for _, e in ys], marker="o", capsize=3, color=colors[s],
                    label=_label(s))
        for t, (x, _), (y, _) in zip(temps, xs, ys):
            ax.annotate(f"T={t}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    level = matched_level(data)
    if level is not None:
        ax.axhline(level, color="grey", lw=0.8, ls=":", label="matched quality (MLE, T=1)")
    ax.set(xlabel="self-BLEU-4 of the k samples of a prompt (← more diverse)",
           ylabel="sample accuracy",
           title=f"Quality vs diversity ({z['n_sample']} prompts × {z['k']} samples)")
    ax.invert_xaxis()
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    for s in _ordered(data["overfit"], "overfit"):
        ep, pts = overfit_series(data["overfit"][s], OVERFIT_METRICS["greedy acc"])
        _errorbar(ax, ep, pts, marker="o", ms=3, color=colors[s], label=_label(s))
    zo = grid.sizes_for("overfit", data.get("smoke", False))
    ax.set(xlabel="epoch", ylabel="held-out greedy exact match",
           title=f"Overfitting: {zo['n_train']} training problems, {zo['n_greedy']} held-out "
                 f"({seeds_of(data['overfit'])}, ± SE)")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    rows = reward_runs(data)
    names = [f"{_label(s)}" for _, s, _ in rows]
    keys = ("best-of-k by reward", "best-of-k by likelihood", "random pick")
    w = 0.8 / len(keys)
    for j, key in enumerate(keys):
        pts = []
        for _, s, runs in rows:
            g = str(next(iter(runs.values()))["eval"]["rewards"]["train_gamma"])
            pts.append(mean_se([reward_metrics(r["eval"]["rewards"], g)[key]
                                for r in runs.values()]))
        ax.bar([i + (j - 1) * w for i in range(len(rows))], [m for m, _ in pts], w,
               yerr=[e or 0 for _, e in pts], capsize=3, label=key.replace("-k", f"-{z['k']}"))
    ax.set_xticks(range(len(rows)), [n.replace(", ", "\n") for n in names], fontsize=8)
    ax.set(ylabel="accuracy of the chosen sample",
           title="Best-of-k by implicit reward (trained γ) vs likelihood vs random (T = 1)")
    ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct fine-tuned with IQTrainer: MLE vs IQ-Learn "
                 "(mean ± standard error over seeds)")
    fig.tight_layout()
    paths = [os.path.join(folder, "figure.png")]
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    for ax, metric in ((axes[0, 0], "pass@k"), (axes[0, 1], "correct paths")):
        for s in _ordered(data["main"], "main"):
            rs = list(data["main"][s].values())
            xs = [mean_se([statistics.fmean(r["eval"]["temperatures"][t]["self_bleu"]) for r in rs])
                  for t in temps]
            ys = [mean_se([statistics.fmean(PROMPT_METRICS[metric](r["eval"]["temperatures"][t]))
                           for r in rs]) for t in temps]
            ax.errorbar([m for m, _ in xs], [m for m, _ in ys], xerr=[e or 0 for _, e in xs],
                        yerr=[e or 0 for _, e in ys], marker="o", capsize=3, color=colors[s],
                        label=_label(s))
        ax.invert_xaxis()
        ax.set(xlabel="self-BLEU-4 (← more diverse)",
               ylabel=metric.replace("pass@k", f"pass@{z['k']}") +
               (" (distinct correct solution paths / prompt)" if "paths" in metric else ""),
               title=f"{metric.replace('pass@k', 'pass@' + str(z['k']))} vs diversity "
                     "across temperatures")
        ax.legend(fontsize=8)
    for ax, metric in ((axes[0, 2], "held-out NLL"), (axes[1, 0], "self-BLEU-4")):
        for s in _ordered(data["overfit"], "overfit"):
            ep, pts = overfit_series(data["overfit"][s], OVERFIT_METRICS[metric])
            _errorbar(ax, ep, pts, marker="o", ms=3, color=colors[s], label=_label(s))
        ax.set(xlabel="epoch", ylabel=metric, title=f"Overfitting: {metric} per epoch")
        ax.legend(fontsize=8)
    ax = axes[1, 1]
    for e, style in (("main", "-"), ("gamma", "--")):
        for s in _ordered(data[e], e):
            rs = [r for r in data[e][s].values() if "train_log" in r]
            if not rs:
                continue
            n = min(40, min(len(r["train_log"]["step"]) for r in rs))
            nll = [statistics.fmean(r["train_log"]["nll"][i] for r in rs) for i in range(n)]
            td = [statistics.fmean(r["train_log"]["td_penalty"][i] * r["train_log"]["td_weight"][i]
                                   for r in rs) for i in range(n)]
            ax.plot(range(1, n + 1), nll, style, color=colors[s], label=f"{_label(s)}: nll")
            ax.plot(range(1, n + 1), td, ":", color=colors[s], label=f"{_label(s)}: λ·td_penalty")
    ax.set(xlabel="optimizer step", ylabel="loss term", yscale="log",
           title="First steps: NLL and the weighted TD term (mean over seeds)")
    ax.legend(fontsize=7)
    ax = axes[1, 2]
    res = (data["resources"] or {}).get("resources") or []
    if res:
        names = [r["name"].replace(", ", "\n") for r in res]
        ax.bar(names, [r["peak_mib"] for r in res], color="tab:blue")
        ax.set(ylabel="MiB above the loaded model", title="Peak memory of a training step")
        ax2 = ax.twinx()
        ax2.plot(names, [r["tokens_per_s"] for r in res], "ko--", label="tokens/s")
        ax2.set(ylabel="training tokens / s")
        ax2.legend(fontsize=8, loc="upper right")
        ax.tick_params(axis="x", labelsize=7)
    else:                                     # no resources job yet: no empty frame
        ax.set_axis_off()
    fig.tight_layout()
    paths.append(os.path.join(folder, "details.png"))
    fig.savefig(paths[1], dpi=90)
    plt.close(fig)
    return paths
