"""CPU benchmark of the native backend against the torch backend and the GEMM floor.

Forward + backward of ``fastirl.iq_loss`` (single-pass engine) on (B*T, H)
hidden states and a (V, H) weight, timed side by side in one process with the
variants interleaved (so load from other processes hits all of them alike), and
the median of ``--reps`` runs reported:

  floor   the three bare GEMMs per chunk (z = x W^T, dx = z W, dW += z^T x) at
          the native backend's chunk size: what no epilogue could beat;
  torch   backend="torch" (pure PyTorch, chunked);
  cpu     backend="cpu" (this extension).

``--memory`` runs each variant once more in a fresh subprocess and reports its
peak resident memory above the state after the inputs were made and the backend
loaded (Linux; the dx / dW gradients themselves included, identical for all).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_native.py --threads 2 --reps 5

Wall time is what counts, but on a shared machine it swings with other load;
the process CPU time is also reported (with OMP_WAIT_POLICY=PASSIVE idle
OpenMP threads sleep instead of spinning, so it counts work only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def make_inputs(a, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, a.dtype)
    h = (torch.randn(a.B, a.T, a.H, generator=g) * 0.5).to(dtype)
    w = (torch.randn(a.V, a.H, generator=g) * a.H ** -0.5).to(dtype)
    t = torch.randint(0, a.V, (a.B, a.T), generator=g)
    return h.requires_grad_(requires_grad), w.requires_grad_(requires_grad), t


LOSS_OPTIONS: dict = {}


def run_loss(backend, h, w, t, chunk):
    import fastirl
    h.grad = w.grad = None
    out = fastirl.iq_loss(h, w, t, backend=backend, chunk_size=chunk, **LOSS_OPTIONS)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss


def run_floor(h, w, chunk):
    x = h.detach().reshape(-1, h.shape[-1])
    wd = w.detach()
    dw = torch.zeros(wd.shape, dtype=torch.float32)
    dx = torch.empty_like(x)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        z = xs @ wd.t()
        dx[s:s + chunk] = z @ wd
        dw.addmm_(z.t().float(), xs.float())
    return dw


def chunk_of(backend, a):
    from fastirl.backends import get_backend
    dtype = getattr(torch, a.dtype)
    return get_backend(backend).rows_per_chunk(a.B * a.T, a.V, a.H, dtype, a.chunk)


def time_all(a):
    h, w, t = make_inputs(a)
    chunks = {"torch": chunk_of("torch", a), "cpu": chunk_of("cpu", a)}
    variants = {
        "floor": lambda: run_floor(h, w, chunks["cpu"]),
        "torch": lambda: run_loss("torch", h, w, t, a.chunk),
        "cpu": lambda: run_loss("cpu", h, w, t, a.chunk),
    }
    if a.floor_torch_chunk and chunks["torch"] != chunks["cpu"]:
        variants["floor@torch_chunk"] = lambda: run_floor(h, w, chunks["torch"])
    times = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for f in variants.values():   # warm-up (JIT load, allocator)
        f()
    for _ in range(a.reps):
        for k, f in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return med, med_cpu, times, chunks, {k: min(v) for k, v in times.items()}


def _status_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def peak_child(a, variant):
    """Peak RSS (MiB) of one run of `variant` above the RSS after setup (Linux:
    the high-water mark is reset through /proc/self/clear_refs first)."""
    h, w, t = make_inputs(a)
    chunk = chunk_of("cpu", a)
    if variant in ("torch", "cpu"):
        from fastirl.backends import get_backend
        get_backend(variant)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mib("VmRSS")
    if variant == "floor":
        run_floor(h, w, chunk)
    else:
        run_loss(variant, h, w, t, a.chunk)
    return _status_mib("VmHWM") - base


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunk", type=int, default=None, help="rows per chunk (default: backend's)")
    p.add_argument("--floor-torch-chunk", action="store_true",
                   help="also time the floor at the torch backend's chunk size")
    p.add_argument("--softcap", type=float, default=None, help="logit soft cap (e.g. 30)")
    p.add_argument("--metrics", action="store_true",
                   help="return_metrics=True (entropy and argmax in the epilogue)")
    p.add_argument("--memory", action="store_true", help="peak-memory runs in subprocesses")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.softcap is not None:
        LOSS_OPTIONS["softcap"] = a.softcap
    if a.metrics:
        LOSS_OPTIONS["return_metrics"] = True
    if a.child:
        print(json.dumps({"peak_mib": peak_child(a, a.child)}))
        return
    med, med_cpu, raw, chunks, best = time_all(a)
    shape = (f"B={a.B} T={a.T} H={a.H} V={a.V} {a.dtype} threads={a.threads} reps={a.reps} "
             f"options={LOSS_OPTIONS}")
    print(f"# {shape}; rows/chunk: torch {chunks['torch']}, cpu {chunks['cpu']}")
    for k, v in med.items():
        print(f"{k:18s} median {v:7.3f} s wall, {med_cpu[k]:7.3f} s CPU   wall runs "
              + " ".join(f"{x:.3f}" for x in raw[k]))
    for label, m in (("wall", med), ("CPU time", med_cpu), ("best wall", best)):
        print(f"{label:9s}: cpu / torch = {m['cpu'] / m['torch']:.3f}   "
              f"cpu / floor = {m['cpu'] / m['floor']:.3f}   "
              f"torch / floor = {m['torch'] / m['floor']:.3f}")
    if a.memory:
        argv = [sys.executable, __file__] + [x for x in sys.argv[1:] if x != "--memory"]
        for variant in ("floor", "torch", "cpu"):
            out = subprocess.run(argv + ["--child", variant], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            print(f"peak extra memory {variant:6s} {json.loads(out)['peak_mib']:8.1f} MiB")


if __name__ == "__main__":
    main()
