"""Meta / fake tensors and torch.compile(fullgraph=True) (the traced path, fastirl.traced).

Compiled graphs use the "aot_eager" backend (AOTAutograd's forward and backward
graphs, without Inductor's code generation) except for one Inductor training
step: the graph capture, which is what fullgraph=True checks, is the same."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import fastirl
from fastirl import reference as ref
from _problems import grads, make_batch

METRICS = {"nll", "td_penalty", "reward", "value", "entropy", "accuracy", "z_loss"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------ meta and fake tensors


def _meta(*shape, dtype=torch.bfloat16, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("flat", [False, True])
def test_meta_tensors_give_shapes(dtype, flat):
    lead = (6,) if flat else (2, 3)
    h, w, b = _meta(*lead, 8, dtype=dtype, grad=True), _meta(11, 8, dtype=dtype, grad=True), \
        _meta(11, dtype=dtype, grad=True)
    t = torch.empty(lead, dtype=torch.long, device="meta")
    pos = torch.empty(lead, dtype=torch.long, device="meta")
    acc = torch.float32
    loss = fastirl.iq_loss(h, w, t, bias=b, position_ids=pos, num_items_in_batch=7)
    assert loss.shape == () and loss.dtype == acc and loss.device.type == "meta"
    loss.backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
    loss, m = fastirl.iq_loss(h, w, t, position_ids=pos, return_metrics=True,
                              num_items_in_batch=torch.empty((), device="meta"))
    assert loss.shape == () and loss.dtype == acc
    assert set(m) == METRICS and all(v.shape == () and v.dtype == acc for v in m.values())
    loss, m = fastirl.iq_loss(h, w, t, position_ids=pos, reduction="none", return_metrics=True,
                              return_predictions=True)
    assert loss.shape == lead and loss.dtype == acc
    assert m.pop("predicted").shape == lead
    assert set(m) == METRICS and all(v.shape == () and v.dtype == acc for v in m.values())
    loss.sum().backward()
    assert w.grad.shape == w.shape
    r = fastirl.implicit_rewards(h, w, t, bias=b, position_ids=pos)
    assert r.shape == lead and r.dtype == acc and not r.requires_grad
    logits = _meta(*lead, 11, dtype=dtype, grad=True)
    loss = fastirl.iq_loss_from_logits(logits, t, td_weight=torch.tensor(0.5), position_ids=pos)
    assert loss.shape == () and loss.dtype == acc
    loss.backward()
    assert logits.grad.shape == logits.shape
    assert fastirl.LinearIQLoss(gamma=0.9)(h, w, t, position_ids=pos).shape == ()
    assert fastirl.IQLoss(reduction="none")(logits, t, position_ids=pos).shape == lead


def test_meta_tensors_still_get_shape_and_type_checks():
    h, w = _meta(2, 3, 8), _meta(11, 8)
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\)"):
        fastirl.iq_loss(h, w, torch.empty(2, 4, dtype=torch.long, device="meta"))
    with pytest.raises(TypeError, match="weight dtype"):
        fastirl.iq_loss(h, _meta(11, 8, dtype=torch.float32),
                        torch.empty(2, 3, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="gamma must lie in"):
        fastirl.iq_loss(h, w, torch.empty(2, 3, dtype=torch.long, device="meta"), gamma=2.0)


def test_fake_tensors_give_shapes():
    p = make_batch(2, 5, 4, 11, dtype=torch.float32, bias=True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        h = mode.from_tensor(p["hidden"])
        w, b = mode.from_tensor(p["weight"]), mode.from_tensor(p["bias"])
        t = mode.from_tensor(p["targets"])
        loss, m = fastirl.iq_loss(h, w, t, bias=b, return_metrics=True)
        assert loss.shape == () and set(m) == METRICS
        dh, dw, db = torch.autograd.grad(loss, (h, w, b))
        assert (dh.shape, dw.shape, db.shape) == (h.shape, w.shape, b.shape)
        assert fastirl.iq_loss(h, w, t, reduction="none").shape == (2, 5)
        assert fastirl.implicit_rewards(h, w, t).shape == (2, 5)


# ------------------------------------------------------------------ torch.compile


def _compiled(fn, backend="aot_eager"):
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, fullgraph=True, backend=counter), counter


def _leaves(p):
    return [p["hidden"], p["weight"], p["bias"]]


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_loss_matches_eager(reduction):
    p = make_batch(2, 7, 6, 19, dtype=torch.float32, bias=True, packed=True)
    up = torch.randn(2, 7, generator=torch.Generator().manual_seed(4))

    def step(h, w, b, t, pos, gamma):
        loss, m = fastirl.iq_loss(h, w, t, bias=b, position_ids=pos, gamma=gamma,
                                  td_weight=0.3, reduction=reduction, return_metrics=True,
                                  backend="torch")
        return (loss * up).sum() if reduction == "none" else loss, m

    args = (p["hidden"], p["weight"], p["bias"], p["targets"], p["position_ids"])
    compiled, counter = _compiled(step)
    for g in (0.9, 0.5):          # a 0-d tensor hyper-parameter is a graph input
        got, got_m = compiled(*args, torch.tensor(g))
        want, want_m = step(*args, g)
        torch.testing.assert_close(got, want)
        for k in METRICS:
            torch.testing.assert_close(got_m[k], want_m[k])
        for a, e in zip(grads(got, _leaves(p)), grads(want, _leaves(p))):
            torch.testing.assert_close(a, e)
    assert counter.frame_count == 1


def test_compiled_from_logits_and_rewards_match_eager():
    p = make_batch(2, 6, 5, 13, dtype=torch.float32)
    logits = F.linear(p["hidden"], p["weight"]).detach().requires_grad_()

    def f(logits, h, w, t):
        loss = fastirl.iq_loss_from_logits(logits, t, td_weight=0.2, softcap=4.0)
        r = fastirl.implicit_rewards(h, w, t, gamma=0.8)
        return loss, r

    compiled, _ = _compiled(f)
    got, got_r = compiled(logits, p["hidden"], p["weight"], p["targets"])
    want = ref.iq_loss_from_logits(logits, p["targets"], td_weight=0.2, softcap=4.0)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_r, ref.implicit_rewards(p["hidden"], p["weight"],
                                                           p["targets"], gamma=0.8))
    torch.testing.assert_close(grads(got, [logits])[0], grads(want, [logits])[0])


def test_compiled_value_checks_run_inside_the_op():
    p = make_batch(2, 5, 4, 11, dtype=torch.float32)

    def f(h, w, t, gamma):
        return fastirl.iq_loss(h, w, t, gamma=gamma)

    compiled, _ = _compiled(f)
    args = (p["hidden"], p["weight"], p["targets"])
    with pytest.raises(ValueError, match="gamma must lie in"):
        compiled(*args, torch.tensor(1.5))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 11\)"):
        compiled(p["hidden"], p["weight"], torch.full((2, 5), 11), torch.tensor(0.9))


def test_compiled_training_step_inductor():
    """A whole training step's forward compiled by Inductor with fullgraph=True:
    a small model, the fused loss with metrics, backward, optimizer step."""
    torch.manual_seed(0)
    B, T, H, V = 2, 8, 16, 23

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(V, H), torch.nn.Linear(H, H),
                                   torch.nn.Tanh()), torch.nn.Linear(H, V, bias=False)

    ids = torch.randint(0, V, (B, T))
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[0, :3] = -100

    def forward(body, head, ids, targets):
        hidden = body(ids)
        return fastirl.iq_loss(hidden, head.weight, targets, td_weight=0.2, gamma=0.95,
                               return_metrics=True)

    results = []
    for mode in ("eager", "inductor"):
        body, head = make()
        opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.1)
        fwd = forward if mode == "eager" else torch.compile(forward, fullgraph=True)
        losses = []
        for _ in range(2):
            loss, m = fwd(body, head, ids, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        results.append((torch.stack(losses), head.weight.detach().clone(), m["accuracy"]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compiled_patched_hf_forward_with_labels():
    """apply_fastirl's forward with labels (packed rows, metrics) under fullgraph=True."""
    transformers = pytest.importorskip("transformers")
    from fastirl.integrations import apply_fastirl

    torch.manual_seed(0)
    V = 53
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    model = apply_fastirl(transformers.LlamaForCausalLM(config).eval(), backend="torch",
                          td_weight=0.3, gamma=0.9)
    ids = torch.randint(3, V, (2, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    pos = torch.arange(10).repeat(2, 1)
    pos[0, 6:] = torch.arange(4)                     # two packed sequences in row 0

    def forward(ids, labels, pos):
        out = model(input_ids=ids, labels=labels, position_ids=pos, return_metrics=True)
        return out.loss, out.iq_metrics

    params = [model.lm_head.weight, model.model.embed_tokens.weight]
    want, want_m = forward(ids, labels, pos)
    want_g = grads(want, params)
    compiled, counter = _compiled(forward)
    got, got_m = compiled(ids, labels, pos)
    torch.testing.assert_close(got, want)
    for k in METRICS:
        torch.testing.assert_close(got_m[k], want_m[k])
    for a, e in zip(grads(got, params), want_g):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-5)
    assert counter.frame_count == 1


def test_compiled_modules_match_eager():
    p = make_batch(2, 6, 5, 13, dtype=torch.float32, bias=True)
    gamma = torch.tensor(0.9)
    linear = fastirl.LinearIQLoss(gamma=gamma, td_weight=0.4, reduction="sum")
    from_logits = fastirl.IQLoss(temperature=0.7)

    def f(h, w, b, t):
        return linear(h, w, t, bias=b) + from_logits(F.linear(h, w, b), t)

    compiled, counter = _compiled(f)
    args = (p["hidden"], p["weight"], p["bias"], p["targets"])
    for g in (0.9, 0.3):
        gamma.fill_(g)                  # a schedule stepping the module's tensor
        got = compiled(*args)
        want = (ref.iq_loss(*args[:2], p["targets"], bias=p["bias"], gamma=g, td_weight=0.4,
                            reduction="sum")
                + ref.iq_loss_from_logits(F.linear(*args[:3]), p["targets"], temperature=0.7))
        torch.testing.assert_close(got, want)
        for a, e in zip(grads(got, _leaves(p)), grads(want, _leaves(p))):
            torch.testing.assert_close(a, e)
    assert counter.frame_count == 1


def test_compiled_with_dynamic_shapes():
    """dynamic=True: one graph for several (B, T); floats may be symbolic too."""
    def f(h, w, t):
        loss, m = fastirl.iq_loss(h, w, t, reduction="none", return_metrics=True, gamma=0.9)
        return loss.sum() + fastirl.iq_loss(h, w, t, td_weight=0.5), m["nll"]

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for i, (B, T) in enumerate(((2, 5), (3, 7), (1, 1))):
        p = make_batch(B, T, 8, 11, dtype=torch.float32, seed=i)
        args = (p["hidden"], p["weight"], p["targets"])
        got, nll = compiled(*args)
        want = (ref.iq_loss(*args, reduction="sum", gamma=0.9)
                + ref.iq_loss(*args, td_weight=0.5))
        torch.testing.assert_close(got, want)
        for a, e in zip(grads(got, args[:2]), grads(want, args[:2])):
            torch.testing.assert_close(a, e)
