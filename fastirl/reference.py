"""The naive IQ-Learn loss: materialises the (B, T, V) logits and follows
``docs/objective.md`` line by line.

This is the test oracle (pass float64 tensors for ground truth) and the
benchmark baseline (pass the training dtype to get the naive computation's own
rounding).  It computes in the dtype of its inputs and is deliberately written
apart from the engine: no code is shared with :mod:`fastirl.objective`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["iq_loss", "iq_loss_from_logits", "implicit_rewards", "continuation"]


def continuation(targets: torch.Tensor, *, ignore_index: int = -100,
                 position_ids: torch.Tensor | None = None,
                 done: torch.Tensor | None = None) -> torch.Tensor:
    """d_t (B, T) bool: whether the value of row t+1 is bootstrapped after row t."""
    B, T = targets.shape
    action = targets != ignore_index
    has_next = torch.zeros(B, T, dtype=torch.bool, device=targets.device)
    has_next[:, :-1] = True
    if position_ids is not None:
        has_next[:, :-1] &= position_ids[:, 1:] != 0       # a 0 starts a new sequence
    if done is not None:
        return has_next & ~done
    next_is_action = torch.zeros_like(action)
    next_is_action[:, :-1] = action[:, 1:]
    return has_next & next_is_action


def _phi_prime(r: torch.Tensor, divergence: str) -> torch.Tensor:
    r = r.detach()
    if divergence in ("chi2", "total_variation"):
        return torch.ones_like(r)
    if divergence == "hellinger":
        return 1.0 / (1.0 + r) ** 2
    if divergence == "js":
        return torch.exp(-r) / (2.0 - torch.exp(-r))
    if divergence == "kl_fix":
        return torch.exp(-r)
    if divergence == "kl":
        return torch.exp(-r - 1.0)
    raise ValueError(f"unknown divergence {divergence!r}")


def iq_loss_from_logits(logits, targets, *, gamma=1.0, td_weight=0.1, temperature=1.0,
                        ignore_index=-100, reduction="mean", position_ids=None, done=None,
                        is_expert=None, divergence="chi2", softcap=None,
                        num_items_in_batch=None, value_term=None, td_rows="expert",
                        detach_next_value=False, lse_square_scale=0.0, label_smoothing=0.0,
                        token_scaling=False, ce_weight=None, return_metrics=False):
    """Same options and meaning as :func:`fastirl.iq_loss_from_logits`."""
    z = logits
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    tau, lam, eps = temperature, td_weight, label_smoothing
    m = targets != ignore_index
    a = torch.where(m, targets, torch.zeros_like(targets))

    V = tau * torch.logsumexp(z / tau, dim=-1)                     # soft value
    q = z.gather(-1, a.unsqueeze(-1)).squeeze(-1)                  # Q(s_t, a_t)
    q_smooth = (1 - eps) * q + eps * z.mean(dim=-1)                # label smoothing
    d = continuation(targets, ignore_index=ignore_index, position_ids=position_ids, done=done)
    V_next = torch.zeros_like(V)
    V_next[:, :-1] = V[:, 1:]
    V_next = torch.where(d, V_next, torch.zeros_like(V_next))      # never bootstrap across d = 0
    if detach_next_value:
        V_next = V_next.detach()
    r = q_smooth - gamma * V_next                                  # implicit reward

    mf = m.to(z.dtype)
    if ce_weight is not None:                                      # class weights per row
        mf = mf * ce_weight.to(z.dtype)[a]
    expert = mf if is_expert is None else mf * is_expert.to(z.dtype)[:, None]
    mean = reduction == "mean"
    floor = 1.0 if ce_weight is None else torch.finfo(z.dtype).tiny
    n_all = mf.sum().clamp(min=floor) if mean else 1.0
    n_exp = expert.sum().clamp(min=floor) if mean else 1.0
    if num_items_in_batch is not None and mean:
        n_all = n_exp = torch.as_tensor(num_items_in_batch, dtype=z.dtype, device=z.device)
    online = is_expert is not None
    if value_term is None:
        value_term = "value" if online else "value_expert"
    w_e = expert / n_exp
    w_0 = torch.zeros_like(mf)
    if value_term == "value":
        w_v = mf / n_all
    elif value_term == "value_expert":
        w_v = expert / n_exp
    else:  # v0
        w_v = torch.zeros_like(mf)
        w_0 = (1.0 - gamma) * expert / n_exp
    w_r = expert / n_exp if td_rows == "expert" else mf / n_all

    ell = (-w_e * _phi_prime(r, divergence) * r
           + w_v * (V - gamma * V_next)
           + w_0 * V
           + lam * w_r * r ** 2
           + lse_square_scale * (mf / n_all) * V ** 2)              # z-loss
    if token_scaling:                                              # DFT: times sg(p(a_t))
        ell = ell * torch.exp((q - V) / tau).detach()
    ell = torch.where(m, ell, torch.zeros_like(ell))
    loss = ell if reduction == "none" else ell.sum()
    if not return_metrics:
        return loss
    with torch.no_grad():
        logp = torch.log_softmax(z / tau, dim=-1)
        mc = m.to(z.dtype)                                         # plain counts
        n = mc.sum().clamp(min=1)
        avg = lambda x: (x * mc).sum() / n                         # noqa: E731
        metrics = {
            "nll": avg(-logp.gather(-1, a.unsqueeze(-1)).squeeze(-1)),
            "td_penalty": avg(r ** 2),
            "reward": avg(r),
            "value": avg(V),
            "entropy": avg(-(logp.exp() * logp).sum(-1)),
            "accuracy": avg((z.argmax(-1) == targets).to(z.dtype)),
            "z_loss": lse_square_scale * avg(V ** 2),
        }
    return loss, metrics


def iq_loss(hidden, weight, targets, *, bias=None, **options):
    """Same options and meaning as :func:`fastirl.iq_loss`; builds the logits."""
    logits = F.linear(hidden, weight, bias)
    return iq_loss_from_logits(logits, targets, **options)


@torch.no_grad()
def implicit_rewards(hidden, weight, targets, *, bias=None, gamma=1.0, temperature=1.0,
                     ignore_index=-100, position_ids=None, done=None, softcap=None):
    """r_t = q_t - gamma d_t V_{t+1}, 0 on non-action rows."""
    z = F.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    m = targets != ignore_index
    a = torch.where(m, targets, torch.zeros_like(targets))
    V = temperature * torch.logsumexp(z / temperature, dim=-1)
    q = z.gather(-1, a.unsqueeze(-1)).squeeze(-1)
    d = continuation(targets, ignore_index=ignore_index, position_ids=position_ids, done=done)
    V_next = torch.zeros_like(V)
    V_next[:, :-1] = V[:, 1:]
    r = q - gamma * torch.where(d, V_next, torch.zeros_like(V_next))
    return torch.where(m, r, torch.zeros_like(r))
