"""pytest-benchmark suite over the variants of ``fastirl-bench`` (time only).

    pytest benchmarks --benchmark-only
    FASTIRL_BENCH_SHAPE=4,1024,512,32000 pytest benchmarks --benchmark-only -k "step"

Same variants, inputs and correctness guard as the command (see
:mod:`fastirl.bench`); a variant that disagrees with the reference fails its
test instead of being timed.  Peak memory needs a fresh process per variant,
so it is measured by ``fastirl-bench`` only, not here.

Environment:
    FASTIRL_BENCH_SHAPE   "B,T,H,V" (default 4,256,256,8192, the command's CPU default)
    FASTIRL_BENCH_DTYPE   float32 (default), bfloat16 or float16
    FASTIRL_BENCH_ROUNDS  timed rounds per case (default 3)
"""

from __future__ import annotations

import os

import pytest
import torch

from fastirl.bench import variants, worker

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, T, H, V = (int(v) for v in os.environ.get("FASTIRL_BENCH_SHAPE", "4,256,256,8192").split(","))
DTYPE_NAME = os.environ.get("FASTIRL_BENCH_DTYPE", "float32")
DTYPE = getattr(torch, DTYPE_NAME)
ROUNDS = int(os.environ.get("FASTIRL_BENCH_ROUNDS", "3"))
TD_WEIGHT = 0.1

torch.set_num_threads(len(os.sched_getaffinity(0)))
NAMES = [n for n in variants.all_names() if variants.relevant(n, DEVICE)]


@pytest.fixture(scope="module")
def inputs():
    return worker.make_inputs(torch, batch=B, seq=T, hidden=H, vocab=V, dtype=DTYPE,
                              device=DEVICE, seed=0)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("op", ["forward", "step"])
@pytest.mark.parametrize("name", NAMES)
def test_variant(benchmark, inputs, name, op):
    why = variants.unavailable_reason(name, DEVICE)
    if why:
        pytest.skip(why)
    fn = variants.loss_fn(name, DEVICE, td_weight=TD_WEIGHT)
    if fn is not None:
        ok, _, detail = worker.correctness(torch, name, fn, device=DEVICE, dtype=DTYPE,
                                           dtype_name=DTYPE_NAME, td_weight=TD_WEIGHT, seed=0)
        if not ok:
            pytest.fail(f"{name} is wrong (not timed): {detail}")
    x, w, t = inputs
    bound = variants.bind(name, fn, x, w, t)
    call = getattr(bound, op)

    def run():
        out = call()
        _sync()
        return out

    benchmark.group = f"{op} B={B} T={T} H={H} V={V} {DTYPE_NAME} {DEVICE.type}"
    benchmark.extra_info.update(mode=variants.info(name).mode, tokens=B * T, hidden=H, vocab=V,
                                dtype=DTYPE_NAME, device=DEVICE.type)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    x.grad = w.grad = None
