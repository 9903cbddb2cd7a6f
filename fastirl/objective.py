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

import torch

__all__ = ["IQOptions", "RowPlan", "plan_rows", "row_losses", "metrics", "DIVERGENCES"]

DIVERGENCES = ("chi2", "total_variation", "hellinger", "js", "kl", "kl_fix")
REDUCTIONS = ("mean", "sum", "none")
VALUE_TERMS = ("value_expert", "value", "v0")
TD_ROWS = ("expert", "all")


@dataclass(frozen=True)
class IQOptions:
    """Hyper-parameters of the objective (validated on construction).

    gamma, td_weight, temperature and softcap are Python numbers; only on the
    traced path (torch.compile, fake / meta tensors: :mod:`fastirl.traced`) may
    they be 0-d CPU tensors, whose values the fused op checks when it runs."""

    gamma: float | torch.Tensor = 1.0
    td_weight: float | torch.Tensor = 0.1
    temperature: float | torch.Tensor = 1.0
    ignore_index: int = -100
    reduction: str = "mean"
    divergence: str = "chi2"
    softcap: float | torch.Tensor | None = None
    value_term: str | None = None      # None: "value_expert" offline, "value" online
    td_rows: str = "expert"
    detach_next_value: bool = False

    def __post_init__(self):
        def number(name, lo, hi, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, torch.Tensor):
                return          # traced call: the value is checked by the fused op
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
            if not -math.inf < v < math.inf:     # also False for NaN; traceable
                raise ValueError(f"{name} must be finite, got {v}")
            if (v <= lo if lo_open else v < lo) or v > hi:
                interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
                raise ValueError(f"{name} must lie in {interval}, got {v}")

        number("gamma", 0.0, 1.0)
        number("td_weight", 0.0, math.inf)
        number("temperature", 0.0, math.inf, lo_open=True)
        if self.softcap is not None:
            number("softcap", 0.0, math.inf, lo_open=True)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        for name, allowed in (("reduction", REDUCTIONS), ("divergence", DIVERGENCES),
                              ("td_rows", TD_ROWS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.value_term is not None and self.value_term not in VALUE_TERMS:
            raise ValueError(f"value_term must be None or one of {VALUE_TERMS}, "
                             f"got {self.value_term!r}")


@dataclass
class RowPlan:
    """Which rows are computed and how each enters the objective.

    index:   (n,) int64 positions of the active rows in the flattened (B*T) batch,
             or None when every row is active (then position j is row j).
    targets: (n,) int64 action token, -1 on rows needed only as a next state.
    cont:    (n,) bool, row j bootstraps from V of row j + 1.
    w_e, w_v, w_0, w_r: (n,) float32 weights of the spec's general form, already
             divided by their normalisers for reduction="mean".
    action:  (n,) bool, row j is an action row.
    shape:   the (B, T) shape of the batch.
    """

    index: torch.Tensor | None
    targets: torch.Tensor
    cont: torch.Tensor
    w_e: torch.Tensor
    w_v: torch.Tensor
    w_0: torch.Tensor
    w_r: torch.Tensor
    action: torch.Tensor
    shape: tuple[int, int]

    @property
    def n(self) -> int:
        return self.targets.shape[0]

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """(n,) values -> (B, T), zero on inactive rows."""
        B, T = self.shape
        if self.index is None:
            return rows.reshape(B, T)
        out = rows.new_zeros(B * T)
        return out.index_copy_(0, self.index, rows).reshape(B, T)

    def slice(self, start: int, stop: int) -> "RowPlan":
        """Rows [start, stop) with the continuation of the last row kept (its next
        state is then row stop, outside the slice: see row_losses' v_next)."""
        f = lambda t: t[start:stop]  # noqa: E731
        return RowPlan(None if self.index is None else f(self.index), f(self.targets),
                       f(self.cont), f(self.w_e), f(self.w_v), f(self.w_0), f(self.w_r),
                       f(self.action), self.shape)


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
              is_expert=None, num_items_in_batch=None, dtype=torch.float32) -> RowPlan:
    """Masks, continuation and objective weights of a (B, T) batch."""
    B, T = targets.shape
    action = targets != opts.ignore_index
    cont = continuation(action, position_ids, done) & action
    # Active rows: actions, and rows that an action bootstraps from.
    active = action.clone()
    active[:, 1:] |= cont[:, :-1]

    m = action.to(dtype)
    expert = m if is_expert is None else m * is_expert.to(dtype)[:, None]
    if opts.reduction == "mean":
        if num_items_in_batch is not None:
            n_all = n_exp = torch.as_tensor(num_items_in_batch, dtype=dtype,
                                            device=m.device)
        else:
            n_all, n_exp = m.sum().clamp(min=1), expert.sum().clamp(min=1)
        m_all, m_exp = m / n_all, expert / n_exp
    else:
        m_all, m_exp = m, expert
    value_term = opts.value_term or ("value" if is_expert is not None else "value_expert")
    zero = torch.zeros_like(m)
    w_v = {"value": m_all, "value_expert": m_exp, "v0": zero}[value_term]
    w_0 = (1.0 - opts.gamma) * m_exp if value_term == "v0" else zero
    w_r = m_exp if opts.td_rows == "expert" else m_all

    flat = lambda t: t.reshape(-1)  # noqa: E731
    tgt = torch.where(action, targets, torch.full_like(targets, -1))
    if bool(active.all()):
        pick, index = flat, None
    else:
        index = flat(active).nonzero().squeeze(1)
        pick = lambda t: flat(t).index_select(0, index)  # noqa: E731
    return RowPlan(index, pick(tgt), pick(cont), pick(m_exp), pick(w_v), pick(w_0), pick(w_r),
                   pick(action), (B, T))


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
    return torch.cat([value[1:], tail]) * plan.cont


def row_losses(q: torch.Tensor, value: torch.Tensor, plan: RowPlan, opts: IQOptions,
               v_after: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss terms and implicit rewards (both (n,), float32):

        r_j = q_j - gamma d_j V_{j+1}
        l_j = -w^E phi'(r_j) r_j + w^V (V_j - gamma d_j V_{j+1}) + w^0 V_j + lambda w^R r_j^2
    """
    v_next = next_values(value, plan, v_after)
    if opts.detach_next_value:
        v_next = v_next.detach()
    r = q - opts.gamma * v_next
    loss = (-plan.w_e * phi_prime(r, opts.divergence) * r
            + plan.w_v * (value - opts.gamma * v_next)
            + plan.w_0 * value
            + opts.td_weight * plan.w_r * r.square())
    return torch.where(plan.action, loss, torch.zeros_like(loss)), r


@torch.no_grad()
def metrics(q, value, r, entropy, argmax, plan: RowPlan, opts: IQOptions) -> dict:
    """Detached means over action rows."""
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
    }
