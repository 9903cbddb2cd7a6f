"""Bad input gets a clear error naming the argument."""

import math

import pytest
import torch

import fastirl
from _problems import make_batch, use_op_path
from fastirl import reference as ref


@pytest.fixture
def p():
    return make_batch(2, 5, 4, 11, dtype=torch.float32)


@pytest.fixture(params=["eager", "op"])
def path(request, monkeypatch):
    """Every check holds on the eager path and on the traced path's op."""
    if request.param == "op":
        use_op_path(monkeypatch)
    return request.param


def call(p, **kw):
    args = dict(hidden=p["hidden"], weight=p["weight"], targets=p["targets"])
    args.update(kw)
    return fastirl.iq_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(hidden=torch.randn(5)), ValueError, "hidden must have 2 or 3 dimensions"),
    (dict(hidden=torch.randn(2, 5, 3)), ValueError, r"weight must have shape \(vocab, 3\)"),
    (dict(hidden=torch.randint(0, 3, (2, 5, 4))), TypeError, "hidden must be float32"),
    (dict(hidden=[1.0]), TypeError, "hidden must be a torch.Tensor"),
    (dict(weight=torch.randn(11, 4, dtype=torch.float64)), TypeError, "weight dtype"),
    (dict(weight=torch.randn(11)), ValueError, "weight must have 2 dimensions"),
    (dict(targets=torch.zeros(2, 5)), TypeError, "targets must be an integer tensor"),
    (dict(targets=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"targets must have shape \(2, 5\)"),
    (dict(targets=torch.full((2, 5), 11)), ValueError, r"targets must lie in \[0, 11\)"),
    (dict(targets=torch.full((2, 5), -5)), ValueError, "found -5"),
    (dict(bias=torch.randn(10)), ValueError, r"bias must have shape \(11,\)"),
    (dict(bias=torch.randn(11, dtype=torch.float64)), TypeError, "bias dtype"),
    (dict(temperature=0.0), ValueError, "temperature must lie in"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=math.nan), ValueError, "temperature must be finite"),
    (dict(gamma=1.5), ValueError, r"gamma must lie in \[0.0, 1.0\]"),
    (dict(gamma=-0.1), ValueError, "gamma"),
    (dict(td_weight=-1.0), ValueError, "td_weight"),
    (dict(td_weight=math.inf), ValueError, "td_weight must be finite"),
    (dict(td_weight="0.1"), TypeError, "td_weight must be a real number"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(divergence="wasserstein"), ValueError, "divergence must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(backend="tpu"), ValueError, "backend must be 'auto' or one of"),
    (dict(preset="turbo"), ValueError, "preset must be one of"),
    (dict(value_term="q"), ValueError, "value_term"),
    (dict(td_rows="some"), ValueError, "td_rows"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be a positive"),
    (dict(num_items_in_batch=torch.tensor([1, 2])), ValueError, "num_items_in_batch must be a scalar"),
    (dict(num_items_in_batch="7"), TypeError, "num_items_in_batch"),
    (dict(position_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, "position_ids must have shape"),
    (dict(position_ids=torch.zeros(2, 5)), TypeError, "position_ids must be an integer"),
    (dict(done=torch.zeros(2, 5, dtype=torch.long)), TypeError, "done must be a bool"),
    (dict(done=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "done must have shape"),
    (dict(is_expert=torch.ones(3, dtype=torch.bool)), ValueError, r"is_expert must have shape \(2,\)"),
    (dict(is_expert=torch.ones(2)), TypeError, "is_expert must be a bool"),
    (dict(position_ids=torch.tensor([[0, 1, 2, -1, 0], [0, 1, 2, 3, 4]])), ValueError,
     r"position_ids must be >= 0 \(a 0 starts a sequence\); found -1"),
    (dict(gamma=torch.tensor(1.5)), ValueError, r"gamma must lie in \[0.0, 1.0\], got 1.5"),
    (dict(td_weight=torch.tensor(-0.5)), ValueError, "td_weight must lie in"),
    (dict(temperature=torch.tensor(0.0)), ValueError, "temperature must lie in"),
    (dict(softcap=torch.tensor(math.nan)), ValueError, "softcap must be finite"),
    (dict(gamma=torch.tensor([0.9])), ValueError, "gamma must be a number or a 0-d tensor"),
    (dict(gamma=torch.tensor(True)), TypeError, "gamma must be a real number"),
    (dict(td_weight=torch.tensor(0.5, device="meta")), ValueError,
     "td_weight must be a number or a 0-d CPU tensor"),
    (dict(num_items_in_batch=torch.tensor(True)), TypeError,
     "num_items_in_batch must be a real"),
    (dict(num_items_in_batch=torch.tensor(0.0)), ValueError,
     "num_items_in_batch must be a positive"),
])
def test_bad_input(p, path, kw, exc, match):
    with pytest.raises(exc, match=match):
        call(p, **kw)


def test_device_mismatch_is_named(p):
    meta = torch.empty(11, 4, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but hidden is on cpu"):
        call(p, weight=meta)
    with pytest.raises(ValueError, match="targets is on meta"):
        call(p, targets=torch.empty(2, 5, dtype=torch.long, device="meta"))


def test_from_logits_bad_input():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\)"):
        fastirl.iq_loss_from_logits(logits, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\)"):
        fastirl.iq_loss_from_logits(logits, torch.full((2, 3), 7))
    with pytest.raises(TypeError, match="logits must be float32"):
        fastirl.iq_loss_from_logits(logits.long(), torch.zeros(2, 3, dtype=torch.long))


def test_unavailable_backend_says_why(p):
    # The CUDA extension can never load on a machine without a CUDA device.
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may have the CUDA backend")
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        call(p, backend="cuda")


@pytest.mark.parametrize("entry", ["iq_loss", "from_logits", "implicit_rewards"])
def test_negative_position_ids_every_entry_point(p, path, entry):
    pos = torch.tensor([[0, 1, -2, 3, 4], [0, 1, 0, 1, 2]])
    with pytest.raises(ValueError, match="position_ids must be >= 0.*found -2"):
        if entry == "iq_loss":
            fastirl.iq_loss(p["hidden"], p["weight"], p["targets"], position_ids=pos)
        elif entry == "implicit_rewards":
            fastirl.implicit_rewards(p["hidden"], p["weight"], p["targets"], position_ids=pos)
        else:
            logits = p["hidden"] @ p["weight"].T
            fastirl.iq_loss_from_logits(logits, p["targets"], position_ids=pos)


@pytest.mark.parametrize("dtype,numbers", [
    (torch.float64, dict(gamma=0.75, td_weight=0.5, temperature=0.5, softcap=3.0)),
    (torch.float32, dict(gamma=0.75, td_weight=0.5, temperature=0.5, softcap=3.0)),
    (torch.int64, dict(gamma=1, td_weight=2, temperature=2, softcap=3))])
def test_hyper_parameters_as_0d_cpu_tensors(p, path, dtype, numbers):
    """A schedule keeps gamma / td_weight / temperature / softcap as 0-d tensors:
    they give the result of the same Python numbers."""
    tensors = {k: torch.tensor(v, dtype=dtype) for k, v in numbers.items()}
    args = (p["hidden"], p["weight"], p["targets"])
    got = fastirl.iq_loss(*args, **tensors)
    want = ref.iq_loss(*args, **numbers)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, args[:2]), torch.autograd.grad(want, args[:2])):
        torch.testing.assert_close(g, w)
    r = fastirl.implicit_rewards(*args, gamma=tensors["gamma"], softcap=tensors["softcap"])
    torch.testing.assert_close(r, ref.implicit_rewards(*args, gamma=numbers["gamma"],
                                                       softcap=numbers["softcap"]))


def test_hyper_parameter_tensors_in_modules_follow_a_schedule(p):
    gamma = torch.tensor(0.9)
    mod = fastirl.LinearIQLoss(gamma=gamma, td_weight=torch.tensor(0.3))
    args = (p["hidden"], p["weight"], p["targets"])
    torch.testing.assert_close(mod(*args), ref.iq_loss(*args, gamma=0.9, td_weight=0.3))
    gamma.fill_(0.5)                  # the schedule steps: the next call sees the new value
    torch.testing.assert_close(mod(*args), ref.iq_loss(*args, gamma=0.5, td_weight=0.3))
    with pytest.raises(ValueError, match="gamma must lie in"):
        fastirl.LinearIQLoss(gamma=torch.tensor(2.0))
