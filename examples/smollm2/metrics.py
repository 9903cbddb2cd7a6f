"""Metrics of samples (answers, solution paths, diversity) and the statistics
of the grid (standard errors, Welch's t-test, a paired bootstrap, ROC AUC,
Spearman's rank correlation), in plain Python/numpy: no scipy needed."""

from __future__ import annotations

import collections
import math
import re
import statistics
from typing import Callable, Sequence

ANSWER = re.compile(r"####\s*(-?[\d,]+)")
RESULT = re.compile(r"=\s*(-?\d+)")


def final_answer(text: str) -> int | None:
    m = ANSWER.search(text)
    if not m:
        return None
    try:
        return int(m.group(1).replace(",", ""))
    except ValueError:
        return None


def solution_path(text: str) -> tuple[int, ...]:
    """The chain of intermediate results (the numbers after each '='): two
    solutions take the same path iff they compute the same quantities in the
    same order, whatever their wording."""
    return tuple(int(v) for v in RESULT.findall(text.split("####")[0]))


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: list[list[int]], n: int) -> float:
    grams = [g for s in samples for g in ngrams(s, n)]
    return len(set(grams)) / max(len(grams), 1)


def bleu(hyp: list[int], refs: list[list[int]], max_n: int = 4) -> float:
    """Sentence BLEU-max_n against several references: clipped n-gram counts,
    zero precisions smoothed to 0.1 counts, brevity penalty to the closest length."""
    if not hyp or not refs:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        h = collections.Counter(ngrams(hyp, n))
        if not h:
            log_p += math.log(1e-9) / max_n
            continue
        best: collections.Counter = collections.Counter()
        for r in refs:
            for g, c in collections.Counter(ngrams(r, n)).items():
                best[g] = max(best[g], c)
        clipped = sum(min(c, best[g]) for g, c in h.items())
        log_p += math.log(max(clipped, 0.1) / sum(h.values())) / max_n
    closest = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if len(hyp) > closest else math.exp(1 - closest / len(hyp))
    return bp * math.exp(log_p)


def self_bleu(samples: list[list[int]]) -> float:
    """Mean BLEU-4 of each sample against the others (1: all identical)."""
    return statistics.fmean(bleu(s, samples[:i] + samples[i + 1:]) for i, s in enumerate(samples))


def prompt_diversity(samples: list[list[int]], texts: list[str], correct: list[bool]) -> dict:
    """Diversity of the k samples of one prompt: self-BLEU-4 and distinct-2/3 on
    tokens, the number of distinct solution paths, and of distinct correct ones."""
    paths = [solution_path(t) for t in texts]
    return {"self_bleu": self_bleu(samples), "distinct_2": distinct_n(samples, 2),
            "distinct_3": distinct_n(samples, 3), "paths": len(set(paths)),
            "correct_paths": len({p for p, c in zip(paths, correct) if c})}


# ============================================================================ statistics


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n));
    the error is None for fewer than two values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, None
    if len(values) < 2:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """P(score of a random positive > score of a random negative), ties count 1/2
    (the Mann-Whitney U statistic / (n_pos n_neg)); None without both classes."""
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return None
    r = ranks(scores)
    u = sum(ri for ri, y in zip(r, labels) if y) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the average ranks); None when
    either side is constant or there are fewer than 3 pairs."""
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) (continued fraction, Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):                      # the fraction converges fast below
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d, f = 1.0, 0.0, 1.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2:
            num = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            num = (m * (b - m) * x) / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / (c if abs(c) > tiny else tiny)
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0)


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom."""
    return _betainc(df / 2, 0.5, df / (df + t * t))


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> dict | None:
    """Welch's unequal-variance t-test of mean(a) - mean(b): the difference, t,
    the Welch-Satterthwaite degrees of freedom and the two-sided p-value; None
    with fewer than two values on a side.  Equal zero variances give p = 1 for
    equal means and p = 0 otherwise."""
    a = [v for v in a if v is not None and math.isfinite(v)]
    b = [v for v in b if v is not None and math.isfinite(v)]
    if len(a) < 2 or len(b) < 2:
        return None
    diff = statistics.fmean(a) - statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return {"diff": diff, "t": math.inf if diff else 0.0, "df": math.nan,
                "p": 0.0 if diff else 1.0}
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return {"diff": diff, "t": t, "df": df, "p": t_two_sided_p(t, df)}


def paired_bootstrap(stat_a: Callable, stat_b: Callable, n_seeds: int, n_units: int,
                     reps: int = 1000, seed: int = 0) -> dict:
    """Hierarchical paired bootstrap of stat_a - stat_b.

    Both settings were run with the same seeds (seed k: the same training data,
    order and sampling seeds) and evaluated on the same units (held-out problems
    or prompts), so each replicate draws seeds with replacement, then units with
    replacement within each drawn seed, and evaluates both statistics on the same
    draw.  ``stat(take)`` computes a statistic from ``take(array)``, which maps a
    (seeds x units) array of per-unit values to the resampled (seeds x units)
    array.  Returns the observed difference, the 95 % percentile interval and a
    two-sided p-value (twice the smaller tail of the replicates around 0)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    identity = lambda arr: np.asarray(arr, dtype=float)  # noqa: E731
    observed = stat_a(identity) - stat_b(identity)
    diffs = []
    for _ in range(reps):
        s = rng.integers(0, n_seeds, size=n_seeds)
        u = rng.integers(0, n_units, size=(n_seeds, n_units))
        take = lambda arr, s=s, u=u: np.asarray(arr, dtype=float)[s[:, None], u]  # noqa: E731
        d = stat_a(take) - stat_b(take)
        if math.isfinite(d):
            diffs.append(d)
    if not diffs:
        return {"diff": observed, "lo": math.nan, "hi": math.nan, "p": math.nan, "reps": 0}
    diffs = np.asarray(diffs)
    p = 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0)))
    return {"diff": observed, "lo": float(np.percentile(diffs, 2.5)),
            "hi": float(np.percentile(diffs, 97.5)), "p": min(1.0, p), "reps": len(diffs)}


def interpolate_at(x_level: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """y at x = x_level on the piecewise-linear curve through (xs, ys) taken in
    order of x (NaN outside the range of xs): e.g. the self-BLEU of a model at a
    given sample accuracy, from its points at several temperatures."""
    pts = sorted((x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x_level <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x_level - x0) / (x1 - x0)
    if pts and pts[0][0] == x_level:
        return pts[0][1]
    return math.nan
