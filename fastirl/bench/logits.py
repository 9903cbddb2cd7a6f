"""Benchmark inputs whose logits look like a trained LM's, and what that does to
Cut Cross-Entropy's gradient filtering.

Two kinds of input (``fastirl-bench --inputs``, ``make_inputs(kind=...)``):

``lm`` (the default)
    hidden states and a head whose logits ``z = x Wᵀ`` have the statistics of
    a trained language model's: a shared unigram prior (token frequency falls
    as a Zipf law of rank, and every row's logits lean towards common
    tokens), a Gaussian bulk, and a few plausible tokens per row boosted
    above it, the target drawn from the row's own softmax (a calibrated
    model: the mean NLL equals the mean entropy).  The parameters
    (:data:`LM`) were chosen so that entropy, top-1 probability, the gap
    between the two largest logits and the number of tokens above CCE's
    filter threshold match SmolLM2-135M-Instruct's logits on English text
    (``python benchmarks/logit_stats.py``, results in
    ``benchmarks/results/logit-stats.md``; docs/benchmarks.md).
``random``
    the earlier inputs: ``x ~ N(0, 1)``, ``W ~ N(0, 4 / H)``: logits
    ~ N(0, 4) with uniform random targets.  Every probability is within a
    factor ~30 of 1 / V, so no vocabulary tile of CCE's backward falls below
    its filter threshold: filtering never skips anything.

Cut Cross-Entropy's backward (``impl="cce"``) recomputes each
(128 rows x 128 vocabulary) logits tile and skips the tile's two gradient
GEMMs and its locked accumulation when every ``|softmax - onehot|`` in it is
below ``eps`` (``filter_eps="auto"``: bf16 epsilon / 32 = 2^-12 since
cut-cross-entropy 24.11.4, / 8 = 2^-10 before), after sorting the
vocabulary by mean logit so that likely tokens share tiles.
:func:`cce_kept_fraction` measures the fraction of tiles kept on a sample of
the generator's logits; the cost model (:mod:`fastirl.bench.peers`) charges
the backward's gradient work by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["KINDS", "LM", "LMParams", "make_inputs", "sample_logits", "logit_stats",
           "cce_kept_fraction", "CCE_EPS", "CCE_EPS_2024"]

KINDS = ("lm", "random")
CCE_EPS = 2.0 ** -12          # bf16 eps / 32: cut-cross-entropy >= 24.11.4
CCE_EPS_2024 = 2.0 ** -10     # bf16 eps / 8: the version of the paper's Table 1


@dataclass(frozen=True)
class LMParams:
    """The LM-like generator (see the module doc).

    zipf: slope of the unigram prior in logits per e-fold of rank
        (``prior(r) = -zipf * ln r``, centred).
    sigma: standard deviation of the Gaussian bulk of each row's logits.
    plausible: tokens per row boosted above the bulk, drawn from the unigram
        distribution (so common tokens recur across rows).
    boost: logit of the first plausible token above the row's mean; the j-th
        is lifted to ``boost * decay**j`` plus a N(0, jitter) draw (plus the
        bulk's noise), never lowered.
    """

    zipf: float = 1.0
    sigma: float = 2.9
    plausible: int = 24
    boost: float = 12.7
    decay: float = 0.95
    jitter: float = 0.0


# Matched to SmolLM2-135M-Instruct on English text (benchmarks/logit_stats.py).
LM = LMParams()


def _prior(vocab: int, p: LMParams) -> torch.Tensor:
    """Unigram prior logits of the vocabulary (rank order = index order after a
    fixed shuffle, so frequent tokens are spread over the vocabulary)."""
    rank = torch.arange(1, vocab + 1, dtype=torch.float64)
    prior = -p.zipf * torch.log(rank)
    prior -= prior.mean()
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(12345))
    out = torch.empty(vocab, dtype=torch.float64)
    out[perm] = prior
    return out.float()


def _unigram_sample(prior: torch.Tensor, shape, g: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(prior.double(), 0)
    return torch.multinomial(probs, int(torch.tensor(shape).prod()), replacement=True,
                             generator=g).reshape(shape)


def _lm_parts(n: int, hidden: int, vocab: int, g: torch.Generator, p: LMParams = LM):
    """x (n, H) float32, W (V, H) float32, targets (n,): logits x Wᵀ as described."""
    if hidden < 8:
        raise ValueError("the lm inputs need hidden >= 8")
    prior = _prior(vocab, p)
    d = hidden - 1
    # W: [prior | Gaussian directions with |w| ~ 1]; x: [1 | sigma-scaled bulk + boosts]
    dirs = torch.randn(vocab, d, generator=g) / math.sqrt(d)
    w = torch.cat([prior[:, None], dirs], 1)
    k = max(1, min(p.plausible, vocab))
    picks = _unigram_sample(prior, (n, k), g)
    # the j-th plausible token's logit is lifted to about boost * decay^j (+ jitter)
    # above the row's mean, whatever its prior
    level = p.boost * p.decay ** torch.arange(k, dtype=torch.float32)
    level = level + p.jitter * torch.randn(n, k, generator=g)
    strength = (level - prior[picks]).clamp_min(0.0)
    # a token drawn twice in a row is boosted once (its first, strongest draw)
    srt, idx = picks.sort(dim=1, stable=True)
    dup = torch.zeros_like(picks, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    strength = strength * (~dup.scatter(1, idx, dup)).float()
    # Each boost moves every other logit by ~N(0, s^2 / d): shrink the bulk so
    # that the logits' spread is sigma whatever H (down to half of it at small H).
    leak = float((strength ** 2).sum(1).mean()) / d
    bulk = torch.randn(n, d, generator=g) * math.sqrt(max(p.sigma ** 2 - leak,
                                                          0.25 * p.sigma ** 2))
    # boost token t by s: add s * dir_t / |dir_t|^2 (other logits move by ~s / sqrt(H))
    ctx = bulk
    for j in range(k):
        sel = dirs[picks[:, j]]                         # (n, d)
        norm2 = (sel * sel).sum(-1, keepdim=True).clamp_min(1e-6)
        ctx = ctx + strength[:, j:j + 1] * sel / norm2
    x = torch.cat([torch.ones(n, 1), ctx], 1)
    return x, w


def _targets_from(logits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One draw per row from the row's softmax (Gumbel-max; ``g`` is a
    generator on the logits' device)."""
    u = torch.rand(logits.shape, generator=g, device=logits.device).clamp_(1e-20, 1.0)
    return (logits.float() - torch.log(-torch.log(u))).argmax(-1).cpu()


def make_inputs(kind: str, *, tokens: int, hidden: int, vocab: int, seed: int = 0,
                chunk: int = 1024, device: str | torch.device = "cpu"):
    """(x (tokens, hidden), W (vocab, hidden), targets (tokens,)) as float32 CPU
    tensors of input kind ``kind`` ("lm" or "random").  The random draws are
    made on the CPU (the same inputs on every device); ``device`` only runs
    the "lm" targets' logits GEMMs (a GPU makes them instant)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(tokens, hidden, generator=g)
        w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5 * 2.0
        t = torch.randint(0, vocab, (tokens,), generator=g)
        return x, w, t
    if kind != "lm":
        raise ValueError(f"input kind must be one of {KINDS}, got {kind!r}")
    x, w = _lm_parts(tokens, hidden, vocab, g)
    t = torch.empty(tokens, dtype=torch.long)
    wd = w.to(device)
    gd = torch.Generator(device=wd.device).manual_seed(seed + 1)
    for r0 in range(0, tokens, chunk):       # targets from each row's own softmax
        r1 = min(tokens, r0 + chunk)
        t[r0:r1] = _targets_from(x[r0:r1].to(device) @ wd.t(), gd)
    return x, w, t


def sample_logits(kind: str, *, rows: int, vocab: int, hidden: int = 2048, seed: int = 0,
                  softcap: float | None = None, dtype: torch.dtype = torch.bfloat16):
    """(logits (rows, vocab) float32 as the GEMM would give them in ``dtype``,
    targets) of input kind ``kind``; ``softcap`` applies ``c tanh(z / c)``."""
    x, w, t = make_inputs(kind, tokens=rows, hidden=hidden, vocab=vocab, seed=seed)
    z = (x.to(dtype) @ w.to(dtype).t()).float() if dtype != torch.float32 else x @ w.t()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z, t


def logit_stats(logits: torch.Tensor, targets: torch.Tensor, eps: float = CCE_EPS) -> dict:
    """Mean per-row statistics of a (rows, V) float32 logits block."""
    lp = torch.log_softmax(logits.double(), -1)
    p = lp.exp()
    top2 = logits.topk(2, -1).values
    return {
        "rows": logits.shape[0], "vocab": logits.shape[1],
        "entropy": float(-(p * lp).sum(-1).mean()),
        "nll": float(-lp.gather(1, targets[:, None]).mean()),
        "top1_prob": float(p.max(-1).values.mean()),
        "gap_top1_top2": float((top2[:, 0] - top2[:, 1]).mean()),
        "logit_std": float(logits.double().std(-1).mean()),
        "above_eps": float((p >= eps).double().sum(-1).mean()),
    }


def kept_tiles(logits: torch.Tensor, targets: torch.Tensor, *, eps: float, sort: bool,
               tile: int = 128, order: torch.Tensor | None = None) -> float:
    """Fraction of (tile x tile) tiles of CCE's backward that survive its filter
    (some |softmax - onehot| >= eps) on a (rows, V) logits sample, with the
    vocabulary sorted by mean logit (``sort``) as CCE does."""
    p = torch.softmax(logits.double(), -1).float()
    rows, vocab = p.shape
    hit = p >= eps
    hit[torch.arange(rows), targets] = True
    if sort:
        order = torch.argsort(logits.mean(0)) if order is None else order
        hit = hit[:, order]
    vb = -(-vocab // tile)
    pad = vb * tile - vocab
    if pad:
        hit = torch.cat([hit, hit.new_zeros(rows, pad)], 1)
    kept, total = 0, 0
    for r0 in range(0, rows - tile + 1, tile):
        blk = hit[r0:r0 + tile].reshape(tile, vb, tile).any(2).any(0)
        kept += int(blk.sum())
        total += vb
    return kept / max(total, 1)


@lru_cache(maxsize=64)
def cce_kept_fraction(kind: str, vocab: int, *, eps: float = CCE_EPS, sort: bool = True,
                      softcap: float | None = None, rows: int = 512, tile: int = 128,
                      seed: int = 0) -> float:
    """Fraction of CCE backward tiles kept by its gradient filter for inputs of
    kind ``kind`` at vocabulary ``vocab``, measured on ``rows`` sampled rows
    (a few seconds at V = 256k).  1.0 for ``random``-like logits."""
    z, t = sample_logits(kind, rows=rows, vocab=vocab, seed=seed, softcap=softcap)
    return kept_tiles(z, t, eps=eps, sort=sort, tile=tile)
