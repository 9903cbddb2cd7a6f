"""The IQ-Learn objective over per-row statistics (docs/objective.md).

Everything here is O(rows) PyTorch.  The engine gives it, for the *active* rows
(action rows and rows needed as next states, in order), the soft values V and
target logits q; autograd through these few lines yields the two per-row
gradient coefficients dL/dV and dL/dq that the backends turn into gradients.

Rows are held in a compact list; row j's next state, when it has one
(``cont[j]``), is row j + 1 of the list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .options import IQOptions

__all__ = ["RowPlan", "plan_rows", "row_losses", "metrics", "coupling", "METRICS"]

# The metrics of return_metrics=True (detached means over action rows).
METRICS = ("nll", "td_penalty", "reward", "value", "entropy", "accuracy", "z_loss")


def resolved_value_term(iq: IQOptions, online: bool) -> str:
    return iq.value_term or ("value" if online else "value_expert")


def coupling(iq: IQOptions, *, online: bool, loss: bool = True) -> str | None:
    """Why row t's loss (or, with ``loss=False``, its reward) depends on the next
    row's value V_{t+1}, i.e. why the order of the rows matters; None if it
    does not.

    With phi' = 1 (chi2, total_variation) and w^V = w^E the V_{t+1} of the
    reward term and of the value term cancel: cross-entropy (td_weight = 0)
    reads every row on its own.  A 0-d tensor td_weight counts as non-zero."""
    if isinstance(iq.gamma, (int, float)) and iq.gamma == 0:
        return None
    if not loss:
        return "implicit rewards (r_t = q_t - gamma V_{t+1})"
    if not isinstance(iq.td_weight, (int, float)) or iq.td_weight != 0:
        return "td_weight > 0"
    if iq.divergence not in ("chi2", "total_variation"):
        return f"divergence={iq.divergence!r}"
    term = resolved_value_term(iq, online)
    if term == "v0" or (term == "value" and online):
        return f"value_term={term!r}"
    return None


@dataclass
class RowPlan:
    """Which rows are computed and how each enters the objective.

    index:   (n,) int64 positions of the active rows in the flattened (B*T) batch,
             or None when every row is active (then position j is row j).
    targets: (n,) int64 action token, -1 on rows needed only as a next state.
    cont:    (n,) bool, row j bootstraps from V of row j + 1.
    w_e, w_v, w_0, w_r, w_a: (n,) float32 weights of the general form
             (docs/objective.md), already divided by their normalisers for
             reduction="mean"; w_a weighs per-action terms (z-loss) like w_v
             with value_term="value".
    action:  (n,) bool, row j is an action row.
    shape:   the (B, T) shape of the batch.
    vocab:   the vocabulary size (label smoothing's mean logit).
    """

    index: torch.Tensor | None
    targets: torch.Tensor
    cont: torch.Tensor
    w_e: torch.Tensor
    w_v: torch.Tensor
    w_0: torch.Tensor
    w_r: torch.Tensor
    w_a: torch.Tensor
    action: torch.Tensor
    shape: tuple[int, int]
    vocab: int = 0

    @property
    def n(self) -> int:
        return self.targets.shape[0]

    def scatter(self, rows: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """(n,) values -> (B, T), ``fill`` on inactive rows."""
        B, T = self.shape
        if self.index is None:
            return rows.reshape(B, T)
        out = rows.new_full((B * T,), fill)
        return out.index_copy_(0, self.index, rows).reshape(B, T)

    def slice(self, start: int, stop: int) -> "RowPlan":
        """Rows [start, stop) with the continuation of the last row kept (its next
        state is then row stop, outside the slice: see row_losses' v_next)."""
        f = lambda t: t[start:stop]  # noqa: E731
        return RowPlan(None if self.index is None else f(self.index), f(self.targets),
                       f(self.cont), f(self.w_e), f(self.w_v), f(self.w_0), f(self.w_r),
                       f(self.w_a), f(self.action), self.shape, self.vocab)


def continuation(action: torch.Tensor, position_ids: torch.Tensor | None,
                 done: torch.Tensor | None) -> torch.Tensor:
    """d_t (B, T): row t+1 exists, is in the same sequence, and (without
    ``done``) is an action row; with ``done``, not done_t."""
    nxt = torch.zeros_like(action)
    if done is not None:
        nxt[:, :-1] = ~done[:, :-1]
    else:
        nxt[:, :-1] = action[:, 1:]
    if position_ids is not None:
        nxt[:, :-1] &= position_ids[:, 1:] != 0
    return nxt


def plan_rows(targets: torch.Tensor, opts: IQOptions, *, position_ids=None, done=None,
              is_expert=None, num_items_in_batch=None, dtype=torch.float32, vocab: int = 0,
              check: Callable | None = None) -> RowPlan:
    """Masks, continuation and objective weights of a (B, T) batch.

    ``check(targets, vocab, ignore_index, position_ids, extra)`` (the value checks
    of :mod:`fastirl._validate`) reads its flags and ``extra`` (whether some row
    is inactive) in one host read; without it, that read is ``bool(...)``."""
    B, T = targets.shape
    action = targets != opts.ignore_index
    cont = continuation(action, position_ids, done) & action
    # Active rows: actions, and rows that an action bootstraps from.
    active = action.clone()
    active[:, 1:] |= cont[:, :-1]
    inactive = ~active.all()
    some_inactive = (check(targets, vocab, opts.ignore_index, position_ids, inactive)
                     if check is not None else bool(inactive))

    m = action.to(dtype)
    if opts.ce_weight is not None:        # class weights: row t weighs ce_weight[a_t]
        w = opts.ce_weight.to(device=m.device, dtype=dtype)
        m = m * w.index_select(0, torch.where(action, targets, 0).reshape(-1)).reshape(B, T)
    expert = m if is_expert is None else m * is_expert.to(dtype)[:, None]
    if opts.reduction == "mean":
        if num_items_in_batch is not None:
            n_all = n_exp = torch.as_tensor(num_items_in_batch, dtype=dtype,
                                            device=m.device)
        else:
            n_all, n_exp = m.sum().clamp(min=torch.finfo(dtype).tiny), \
                expert.sum().clamp(min=torch.finfo(dtype).tiny)
            if opts.ce_weight is None:     # counts: an empty batch divides by 1
                n_all, n_exp = n_all.clamp(min=1), n_exp.clamp(min=1)
        m_all, m_exp = m / n_all, expert / n_exp
    else:
        m_all, m_exp = m, expert
    value_term = resolved_value_term(opts, is_expert is not None)
    zero = torch.zeros_like(m)
    w_v = {"value": m_all, "value_expert": m_exp, "v0": zero}[value_term]
    w_0 = (1.0 - opts.gamma) * m_exp if value_term == "v0" else zero
    w_r = m_exp if opts.td_rows == "expert" else m_all

    flat = lambda t: t.reshape(-1)  # noqa: E731
    tgt = torch.where(action, targets, torch.full_like(targets, -1))
    if not some_inactive:
        pick, index = flat, None
    else:
        index = flat(active).nonzero().squeeze(1)
        pick = lambda t: flat(t).index_select(0, index)  # noqa: E731
    return RowPlan(index, pick(tgt), pick(cont), pick(m_exp), pick(w_v), pick(w_0), pick(w_r),
                   pick(m_all), pick(action), (B, T), vocab)


def phi_prime(r: torch.Tensor, divergence: str) -> torch.Tensor:
    """phi'(r) of the divergence, without gradient."""
    r = r.detach()
    if divergence in ("chi2", "total_variation"):
        return torch.ones_like(r)
    if divergence == "hellinger":
        return (1.0 + r).square().reciprocal()
    e = torch.exp(-r)
    return {"js": lambda: e / (2.0 - e), "kl_fix": lambda: e, "kl": lambda: e * math.exp(-1.0)}[
        divergence]()


def next_values(value: torch.Tensor, plan: RowPlan, v_after: torch.Tensor | None = None
                ) -> torch.Tensor:
    """d_j * V_{j+1} for the rows of ``plan``; ``v_after`` is V of the row just
    after the plan's last row (single-pass chunks), or None at the end."""
    tail = value.new_zeros(1) if v_after is None else v_after.reshape(1)
    nxt = torch.cat([value[1:], tail])
    return torch.where(plan.cont, nxt, torch.zeros_like(nxt))    # NaN-safe where d_j = 0


def target_logit(q: torch.Tensor, logit_sum: torch.Tensor | None, plan: RowPlan,
                 opts: IQOptions) -> torch.Tensor:
    """The target logit the objective reads: q, or with label smoothing eps
    (1 - eps) q + eps * mean_v z[v] (logit_sum / vocab)."""
    eps = opts.label_smoothing
    if not eps:
        return q
    return (1.0 - eps) * q + (eps / plan.vocab) * logit_sum


def row_losses(q: torch.Tensor, value: torch.Tensor, plan: RowPlan, opts: IQOptions,
               v_after: torch.Tensor | None = None, logit_sum: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss terms and implicit rewards (both (n,), float32):

        q~_j = (1 - eps) q_j + eps mean_v z_j[v]                 (label smoothing)
        r_j  = q~_j - gamma d_j V_{j+1}
        l_j  = s_j [ -w^E phi'(r_j) r_j + w^V (V_j - gamma d_j V_{j+1}) + w^0 V_j
                     + lambda w^R r_j^2 + zeta w^A V_j^2 ]
        s_j  = sg(exp((q_j - V_j) / tau)) with token_scaling, else 1
    """
    v_next = next_values(value, plan, v_after)
    if opts.detach_next_value:
        v_next = v_next.detach()
    r = target_logit(q, logit_sum, plan, opts) - opts.gamma * v_next
    loss = (-plan.w_e * phi_prime(r, opts.divergence) * r
            + plan.w_v * (value - opts.gamma * v_next)
            + plan.w_0 * value
            + opts.td_weight * plan.w_r * r.square())
    if opts.lse_square_scale:
        loss = loss + opts.lse_square_scale * plan.w_a * value.square()
    if opts.token_scaling:
        loss = loss * torch.exp((q - value) / opts.temperature).detach()
    return torch.where(plan.action, loss, torch.zeros_like(loss)), r


@torch.no_grad()
def metrics(q, value, r, entropy, argmax, plan: RowPlan, opts: IQOptions) -> dict:
    """Detached means over action rows (in :data:`METRICS` order)."""
    m = plan.action.to(value.dtype)
    n = m.sum().clamp(min=1)
    avg = lambda t: (t.to(m.dtype) * m).sum() / n  # noqa: E731
    return {
        "nll": avg((value - q) / opts.temperature),
        "td_penalty": avg(r.square()),
        "reward": avg(r),
        "value": avg(value),
        "entropy": avg(entropy),
        "accuracy": avg(argmax == plan.targets),
        "z_loss": opts.lse_square_scale * avg(value.square()),
    }
