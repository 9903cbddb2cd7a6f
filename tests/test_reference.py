"""The oracle itself against independent facts of the spec."""

import pytest
import torch
import torch.nn.functional as F

from fastirl import reference as ref
from _problems import make_batch


def test_mle_limit_is_cross_entropy():
    p = make_batch()
    loss = ref.iq_loss(p["hidden"], p["weight"], p["targets"], td_weight=0.0)
    logits = p["hidden"] @ p["weight"].T
    ce = F.cross_entropy(logits.flatten(0, 1), p["targets"].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, ce)


def test_continuation_default_packed_and_done():
    t = torch.tensor([[-100, 5, 6, 7, -100], [1, 2, 3, 4, 5]])
    d = ref.continuation(t)
    # last action before padding / end of tensor is terminal; prompt row is not an action
    assert d.tolist() == [[True, True, True, False, False], [True, True, True, True, False]]
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]])
    d = ref.continuation(t, position_ids=pos)
    assert d[1].tolist() == [True, True, False, True, False]
    done = torch.zeros(2, 5, dtype=torch.bool)
    done[0, 2] = True
    d = ref.continuation(t, done=done)
    # with `done`, the next row's value is used even if it is not an action
    assert d[0].tolist() == [True, True, False, True, False]


def test_reward_sum_identity():
    """gamma = 1, terminal V = 0: sum_t r_t = tau log p(response) + V_0."""
    p = make_batch(B=2, T=8, ignore_frac=0.0, prompt=3, pad_last=False, requires_grad=False)
    tau = 0.7
    r = ref.implicit_rewards(p["hidden"], p["weight"], p["targets"], temperature=tau)
    z = p["hidden"] @ p["weight"].T
    logp = torch.log_softmax(z / tau, -1)
    m = p["targets"] != -100
    a = p["targets"].clamp(min=0)
    lp = (logp.gather(-1, a[..., None])[..., 0] * m).sum(1)
    v0 = tau * torch.logsumexp(z[:, 3] / tau, -1)
    torch.testing.assert_close(r.sum(1), tau * lp + v0)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_offline_chi2_equals_value_difference_form(gamma):
    """(V - q) + lam r^2 equals -r + (V - gamma d V') + lam r^2 (spec's cancellation)."""
    p = make_batch()
    loss = ref.iq_loss(p["hidden"], p["weight"], p["targets"], gamma=gamma, td_weight=0.3,
                       reduction="none")
    z = p["hidden"] @ p["weight"].T
    V = torch.logsumexp(z, -1)
    q = z.gather(-1, p["targets"].clamp(min=0)[..., None])[..., 0]
    r = ref.implicit_rewards(p["hidden"], p["weight"], p["targets"], gamma=gamma)
    m = p["targets"] != -100
    torch.testing.assert_close(loss, torch.where(m, V - q + 0.3 * r ** 2, torch.zeros_like(V)))
