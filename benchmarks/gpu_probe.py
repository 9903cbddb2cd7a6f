"""The pieces of benchmarks/gpu_check.sh that are Python.

    python benchmarks/gpu_probe.py versions OUT/versions.txt
    python benchmarks/gpu_probe.py ceilings OUT/ceilings.csv [--gpu h200]
    python benchmarks/gpu_probe.py profile OUT/profile.csv [--gpu h200]
    python benchmarks/gpu_probe.py join OUT [--gpu h200]
    python benchmarks/gpu_probe.py imports           # every import gpu_check makes (no GPU)

versions: python, torch, triton, CUDA, driver, GPU, and the optional packages.
ceilings: bare ``torch.mm`` efficiency at the GEMM shapes of the Llama-3-8B
head step (and 8192^3), a device-to-device copy: measured against the
data-sheet peak and beside the calibrated model's prediction.
profile: ``torch.profiler`` of one default (``backend="triton"``)
forward+backward at the head shape, CUDA time per kernel class beside the
cost model's breakdown of the same step.
join: measured (bench.csv, bench-random.csv) beside predicted, one CSV.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(tokens=8192, hidden=4096, vocab=128256)


def versions(path: str) -> int:
    import torch
    lines = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"cuda {torch.version.cuda}"]
    for name in ("triton", "transformers", "liger_kernel", "cut_cross_entropy", "fastirl",
                 "numpy"):
        try:
            mod = importlib.import_module(name)
            lines.append(f"{name} {getattr(mod, '__version__', '?')} ({Path(mod.__file__).parent})")
        except Exception as exc:   # noqa: BLE001
            lines.append(f"{name} not importable: {type(exc).__name__}: {exc}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"gpu {p.name}, {p.multi_processor_count} SMs, "
                     f"{getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB L2, "
                     f"{p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
    from fastirl.bench import report
    lines.append(f"fastirl git {report.git_revision()}")
    Path(path).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _time(fn, reps: int = 10) -> float:
    import torch
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in ev)
    return ts[len(ts) // 2] / 1e3


def ceilings(path: str, gpu: str) -> int:
    import torch

    from fastirl.backends import hardware
    from fastirl.bench import launches as L
    from fastirl.bench import predict as P
    hw = hardware.gpu(gpu)
    N, H, V = SHAPE["tokens"], SHAPE["hidden"], SHAPE["vocab"]
    c = 4096
    shapes = [("square 8192^3", 8192, 8192, 8192), ("logits (c x V x H)", c, V, H),
              ("dx (c x H x V)", c, H, V), ("dW (V x H x c)", V, H, c),
              ("floor logits (N x V x H)", N, V, H)]
    out = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, m, n, k in shapes:
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=g)
        o = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        s = _time(lambda: torch.mm(a, b, out=o))
        pred = L.gemm("mm", m, n, k, "bfloat16").seconds(hw)
        tf = 2 * m * n * k / s / 1e12
        out.append(dict(what=name, m=m, n=n, k=k, measured_ms=s * 1e3, predicted_ms=pred * 1e3,
                        tflops=tf, fraction_of_peak=tf * 1e12 / hw.gemm_flops("bfloat16")))
        del a, b, o
    src = torch.randn(1 << 31, device="cuda", dtype=torch.bfloat16, generator=g)   # 4.3 GB
    dst = torch.empty_like(src)
    s = _time(lambda: dst.copy_(src))
    moved = 2 * src.numel() * 2
    pred = L.elementwise("copy", src.numel(), 4, 0.0).seconds(hw)
    out.append(dict(what="copy 4.3 GB", m="", n="", k="", measured_ms=s * 1e3,
                    predicted_ms=pred * 1e3, tflops="", fraction_of_peak=moved / s / hw.bandwidth))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    for r in out:
        print(f"  {r['what']:<26} {r['measured_ms']:8.3f} ms measured, {r['predicted_ms']:8.3f} ms "
              f"predicted, {r['fraction_of_peak']:.2f} of peak")
    return 0


_CLASSES = [("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "ampere", "sm80_xmma", "gemv")),
            ("epilogue_stats", ("logits_stats",)), ("merge", ("merge",)),
            ("epilogue_grad", ("logits_grad",)), ("fill", ("fill", "zero")),
            ("copy_cast", ("copy", "cast", "convert"))]


def _kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in _CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def profile(path: str, gpu: str) -> int:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    import fastirl
    from fastirl.backends import hardware
    from fastirl.bench import launches as L
    from fastirl.bench import predict as P
    from fastirl.bench.logits import make_inputs

    N, H, V = SHAPE["tokens"], SHAPE["hidden"], SHAPE["vocab"]
    x, w, t = make_inputs("lm", tokens=N, hidden=H, vocab=V, device="cuda")
    x = x.cuda().bfloat16().requires_grad_()
    w = w.cuda().bfloat16().requires_grad_()
    t = t.cuda()

    def step():
        x.grad = w.grad = None
        fastirl.iq_loss(x, w, t, backend="triton").backward()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with tprofile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    per: dict[str, list] = {}
    for e in prof.key_averages():
        dev = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if not dev or e.key.startswith(("aten::", "cuda", "Memcpy", "Memset")) and "Memset" not in e.key:
            continue
        cls = _kernel_class(e.key)
        slot = per.setdefault(cls, [0.0, 0, []])
        slot[0] += dev / 1e3
        slot[1] += e.count
        slot[2].append(e.key[:60])
    pred = P.predict("fastirl-triton", L.Shape(N, H, V, "bfloat16"), hardware.gpu(gpu))
    model_cls: dict[str, float] = {}
    for k, v in pred.by_kind().items():
        cls = ("gemm" if k.startswith("gemm") else "fill" if "zero_fill" in k else
               "copy_cast" if k in ("dW_cast", "dx_put") else
               k if k in ("epilogue_stats", "merge", "epilogue_grad") else "other")
        model_cls[cls] = model_cls.get(cls, 0.0) + v * 1e3
    rows = []
    for cls in sorted(set(per) | set(model_cls)):
        m = per.get(cls, [0.0, 0, []])
        rows.append(dict(kernel_class=cls, measured_ms=round(m[0], 4), launches=m[1],
                         predicted_ms=round(model_cls.get(cls, 0.0), 4),
                         kernels="; ".join(sorted(set(m[2]))[:4])))
    rows.append(dict(kernel_class="TOTAL (wall, one step)", measured_ms=round(wall * 1e3, 3),
                     launches=sum(r["launches"] for r in rows),
                     predicted_ms=round(pred.seconds * 1e3, 3), kernels=""))
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    for r in rows:
        print(f"  {r['kernel_class']:<24} measured {r['measured_ms']:9.3f} ms ({r['launches']} "
              f"launches), model {r['predicted_ms']:9.3f} ms")
    return 0


def join(out: str, gpu: str) -> int:
    from fastirl.backends import hardware
    from fastirl.bench import predict as P
    from fastirl.bench import report
    hw = hardware.gpu(gpu)
    cols = ["variant", "inputs", "gpu", "status", "measured_fb_ms", "predicted_ms",
            "measured_vs_predicted", "measured_peak_mib", "reason"]
    rows = []
    for name in ("bench.csv", "bench-random.csv"):
        p = Path(out) / name
        if not p.exists() or p.stat().st_size == 0:
            continue
        for r in report.read_csv(p):
            if r.get("sweep") != "main":
                continue
            inputs = r.get("inputs") or ("random" if "random" in name else "lm")
            pred = P.predict_ms(r["variant"], tokens=int(r["tokens"]), hidden=int(r["hidden"]),
                                vocab=int(r["vocab"]), dtype=r["dtype"], hw=hw, inputs=inputs)
            meas = r.get("fb_ms_median") or ""
            ratio = f"{float(meas) / pred:.3f}" if meas and pred else ""
            rows.append(dict(variant=r["variant"], inputs=inputs, gpu=gpu, status=r["status"],
                             measured_fb_ms=meas, predicted_ms=f"{pred:.3f}" if pred else "",
                             measured_vs_predicted=ratio, measured_peak_mib=r.get("peak_mib", ""),
                             reason=r.get("reason", "")))
    report.write_rows(Path(out) / "gpu-check.csv", rows, cols)
    for r in rows:
        print(f"  {r['variant']:<22} {r['inputs']:<6} {r['status']:<8} measured "
              f"{r['measured_fb_ms'] or '-':>10} ms  predicted {r['predicted_ms'] or '-':>10} ms  "
              f"ratio {r['measured_vs_predicted'] or '-'}")
    return 0


def imports() -> int:
    """Every module gpu_check.sh imports, checked without a GPU."""
    import torch  # noqa: F401

    import fastirl.bench  # noqa: F401
    import fastirl.bench.cli  # noqa: F401
    import fastirl.bench.worker  # noqa: F401
    from fastirl.bench import (calibration, launches, logits, model, peers,  # noqa: F401
                               predict, roofline)
    from fastirl.backends import hardware, triton_plan  # noqa: F401
    for name in ("triton", "fastirl.backends.triton_kernels", "liger_kernel",
                 "cut_cross_entropy"):
        try:
            importlib.import_module(name)
            print(f"  import {name}: ok")
        except Exception as exc:   # noqa: BLE001
            print(f"  import {name}: {type(exc).__name__}: {str(exc)[:120]}")
    print("  cost model:", f"{predict.predict('fastirl-triton', launches.Shape(8192, 4096, 128256), hardware.gpu('h200')).seconds * 1e3:.1f} ms predicted on h200")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("versions", "ceilings", "profile", "join", "imports"))
    ap.add_argument("path", nargs="?")
    ap.add_argument("--gpu", default="h200")
    a = ap.parse_args(argv)
    if a.what == "versions":
        return versions(a.path)
    if a.what == "ceilings":
        return ceilings(a.path, a.gpu)
    if a.what == "profile":
        return profile(a.path, a.gpu)
    if a.what == "join":
        return join(a.path, a.gpu)
    return imports()


if __name__ == "__main__":
    sys.exit(main())
