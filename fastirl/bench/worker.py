"""Measures one (variant, shape) in a fresh process.

    python -m fastirl.bench.worker '<job json>'

prints one line ``FASTIRL_BENCH_RESULT <json>`` on stdout.  Steps:

1. availability (a one-line reason if the variant cannot run here);
2. correctness guard at a small shape (loss and both gradients against
   ``fastirl.reference`` in float64; a variant that disagrees is "wrong" and
   is not timed).  This also loads every library the variant uses;
3. inputs allocated, then two forward+backward calls, each under the peak
   meter (:mod:`fastirl.bench.memory`): the first call (includes compilation,
   lazy initialisation) and the second (steady state, reported as the peak);
   memory still held after the first call is reported as "retained";
4. timing: ``warmup`` more calls, then ``repeats`` forward calls and
   ``repeats`` forward+backward calls (CUDA: events, synchronised).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

MARKER = "FASTIRL_BENCH_RESULT "

# Small shape of the correctness guard: two sequences, ignored rows (a prompt,
# a hole), a vocabulary that is not a multiple of any block size.
CHECK_SHAPE = dict(batch=2, seq=24, hidden=32, vocab=300)
TOLERANCE = {"float32": 2e-4, "float64": 1e-8, "bfloat16": 4e-2, "float16": 1e-2}


class CompileTimeout(Exception):
    pass


def _alarm(seconds: float | None):
    if not seconds or not hasattr(signal, "SIGALRM"):
        return

    def handler(signum, frame):
        raise CompileTimeout()
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _timed_out(exc: BaseException) -> bool:
    """The alarm fired, possibly wrapped by torch.compile into its own error."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, CompileTimeout) or type(exc).__name__ == "CompileTimeout":
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _cancel_alarm():
    if hasattr(signal, "SIGALRM"):
        signal.setitimer(signal.ITIMER_REAL, 0)


def make_inputs(torch, *, batch, seq, hidden, vocab, dtype, device, seed, ignore_frac=0.0,
                check=False, inputs="lm"):
    """hidden (B, T, H), weight (V, H) requiring grad, targets (B, T).  inputs:
    "lm" (logits with a trained LM's statistics) or "random" (logits ~ N(0, 4),
    uniform targets); see fastirl.bench.logits."""
    from .logits import make_inputs as generate

    if check or hidden < 8:
        inputs = "random"     # the correctness guard's tiny shape
    x, w, t = generate(inputs, tokens=batch * seq, hidden=hidden, vocab=vocab, seed=seed,
                       device=device)
    x = x.reshape(batch, seq, hidden)
    t = t.reshape(batch, seq)
    if check:               # a prompt, a hole, a fully-ended sequence tail
        t[0, :3] = -100
        t[1, seq // 2] = -100
        t[1, -2:] = -100
    elif ignore_frac > 0:   # a prompt at the start of every sequence
        t[:, : int(round(seq * ignore_frac))] = -100
    x = x.to(device=device, dtype=dtype).requires_grad_()
    w = w.to(device=device, dtype=dtype).requires_grad_()
    return x, w, t.to(device)


def _rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    if not bool(a.isfinite().all()):
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def correctness(torch, name, fn, *, device, dtype, dtype_name, td_weight, seed):
    """Returns (ok, max relative error, detail)."""
    from fastirl import reference

    from .variants import info

    ce = info(name).mode == "CE"
    x, w, t = make_inputs(torch, **CHECK_SHAPE, dtype=dtype, device=device, seed=seed + 1,
                          check=True)
    loss = fn(x, w, t)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = reference.iq_loss(x64, w64, t, td_weight=0.0 if ce else td_weight)
    ref.backward()
    if x.grad is None or w.grad is None:
        return False, float("inf"), "no gradient for hidden or weight"
    errs = {"loss": _rel_err(loss.detach().reshape(()), ref.detach()),
            "d_hidden": _rel_err(x.grad, x64.grad), "d_weight": _rel_err(w.grad, w64.grad)}
    worst = max(errs.values())
    tol = TOLERANCE.get(dtype_name, 1e-2)
    detail = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
    return worst <= tol, worst, f"max relative error {detail} (tolerance {tol:.0e})"


def _timer(torch, device):
    if device.type == "cuda":
        def run(call):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            out = call()
            end.record()
            torch.cuda.synchronize(device)
            del out
            return start.elapsed_time(end)
    else:
        def run(call):
            t0 = time.perf_counter()
            out = call()
            t1 = time.perf_counter()
            del out
            return (t1 - t0) * 1e3
    return run


def run_job(job: dict) -> dict:
    import torch

    from . import memory
    from .variants import bind, info, loss_fn, unavailable_reason

    name = job["variant"]
    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    threads = job.get("threads") or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    res = {"status": "ok", "reason": "", "threads": threads,
           "loadavg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}

    reason = unavailable_reason(name, device)
    if reason:
        return dict(res, status="skipped", reason=reason)
    meta = info(name)
    compile_timeout = job.get("compile_timeout") if meta.compiles else None

    try:
        fn = loss_fn(name, device, td_weight=job["td_weight"],
                     loss_preset=job.get("loss_preset", "default"))
    except Exception as exc:   # an optional anchor that does not import / build
        return dict(res, status="skipped", reason=f"cannot build: {_one_line(exc)}")

    t_compile = time.perf_counter()
    try:
        _alarm(compile_timeout)
        if fn is not None and job.get("check", True):
            ok, err, detail = correctness(torch, name, fn, device=device, dtype=dtype,
                                          dtype_name=job["dtype"], td_weight=job["td_weight"],
                                          seed=job.get("seed", 0))
            res.update(check_err=err, check=detail)
            if not ok:
                return dict(res, status="wrong", reason=f"disagrees with the reference: {detail}")
        elif fn is None:
            a = torch.randn(64, 64, device=device, dtype=dtype)
            (a @ a.t()).sum().item()                    # load the GEMM libraries
            res.update(check="n/a (no loss)")
        else:
            res.update(check="not checked (--no-check)")
        _cancel_alarm()
    except CompileTimeout:
        return _compile_skipped(res, compile_timeout, device)
    except Exception as exc:
        _cancel_alarm()
        if _timed_out(exc):
            return _compile_skipped(res, compile_timeout, device)
        return dict(res, status="failed", reason=f"at the check shape: {_one_line(exc)}")

    x, w, t = make_inputs(torch, batch=job["batch"], seq=job["seq"], hidden=job["hidden"],
                          vocab=job["vocab"], dtype=dtype, device=device,
                          seed=job.get("seed", 0), ignore_frac=job.get("ignore_frac", 0.0),
                          inputs=job.get("inputs", "lm"))
    bound = bind(name, fn, x, w, t)
    meter = memory.PeakMeter(device)
    if device.type == "cpu" and not memory.exact_malloc():
        meter.method += " (glibc mallopt unavailable: freed heap blocks may count)"
    res["mem_method"] = meter.method
    try:
        _alarm(compile_timeout)
        memory.release_free_memory()
        base = meter.current()
        with meter.measure():
            out = bound.step()
        del out
        _cancel_alarm()
        res["compile_s"] = round(time.perf_counter() - t_compile, 2) if meta.compiles else None
        res["peak_first_bytes"] = meter.peak
        x.grad = w.grad = None
        memory.release_free_memory()
        res["retained_bytes"] = max(0, meter.current() - base)
        with meter.measure():
            out = bound.step()
        del out
        res["peak_bytes"] = meter.peak
        x.grad = w.grad = None
        if device.type == "cpu":
            memory.default_malloc()

        timer = _timer(torch, device)
        for _ in range(job.get("warmup", 1)):
            timer(bound.step)
        repeats = job["repeats"]
        res["fwd_ms"] = [timer(bound.forward) for _ in range(repeats)] if job.get(
            "forward", True) else []
        res["fb_ms"] = [timer(bound.step) for _ in range(repeats)]
    except CompileTimeout:
        return _compile_skipped(res, compile_timeout, device)
    except torch.OutOfMemoryError as exc:   # noqa: F841
        return dict(res, status="failed", reason="out of memory")
    except Exception as exc:
        _cancel_alarm()
        if _timed_out(exc):
            return _compile_skipped(res, compile_timeout, device)
        return dict(res, status="failed", reason=_one_line(exc))
    return res


def _compile_skipped(res: dict, compile_timeout: float, device: torch.device) -> dict:
    return dict(res, status="skipped",
                reason=f"torch.compile took longer than {compile_timeout:g} s on "
                       f"{device.type} (--compile-timeout)")


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(argv[0])
    try:
        res = run_job(job)
    except Exception as exc:
        traceback.print_exc()
        res = {"status": "failed", "reason": _one_line(exc)}
    sys.stdout.write(MARKER + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
