"""iq_loss_from_logits against the reference."""

import pytest
import torch

import fastirl
from fastirl import reference as ref
from _problems import make_batch
from test_loss import _options


@pytest.mark.parametrize("name", ["default", "gamma_tau_lambda", "softcap", "js", "online_v0",
                                  "done", "detach_next"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_from_logits_matches_reference(name, reduction, chunk_size):
    p = make_batch(packed=True)
    opts = _options(name)
    logits = (p["hidden"] @ p["weight"].T).detach().requires_grad_()
    kw = dict(opts, position_ids=p["position_ids"], reduction=reduction)
    got = fastirl.iq_loss_from_logits(logits, p["targets"], backend="torch", chunk_size=chunk_size,
                                      **kw)
    want = ref.iq_loss_from_logits(logits, p["targets"], **kw)
    torch.testing.assert_close(got, want)
    up = torch.randn(want.shape, dtype=want.dtype) if reduction == "none" else None
    (g,) = torch.autograd.grad(got, logits, up)
    (w,) = torch.autograd.grad(want, logits, up)
    torch.testing.assert_close(g, w)


def test_from_logits_gradient_is_input_dtype_and_metrics():
    p = make_batch(dtype=torch.bfloat16)
    logits = (p["hidden"] @ p["weight"].T).detach().requires_grad_()
    loss, m = fastirl.iq_loss_from_logits(logits, p["targets"], return_metrics=True)
    assert loss.dtype == torch.float32          # outputs in the accumulation dtype
    (g,) = torch.autograd.grad(loss, logits)
    assert g.dtype == torch.bfloat16 and g.shape == logits.shape
    want_loss, want = ref.iq_loss_from_logits(logits.double(), p["targets"], return_metrics=True)
    for k in want:
        torch.testing.assert_close(m[k].double(), want[k], atol=1e-5, rtol=1e-5)
