"""Round-robin timing of several variants in one process: ratios on a noisy machine.

    python benchmarks/interleaved.py --batch 2 --seq 4096 --hidden 2048 --vocab 128256 \\
        --dtype bfloat16 --variants fastirl-cpu,cce,matmul-floor --rounds 5 \\
        --csv benchmarks/results/interleaved.csv

``fastirl-bench`` measures each variant in a fresh process, one after another
(and memory, which this script does not): on a shared machine whose load
changes by the minute, two variants may then run under very different loads.
Here every round times each variant once, back to back on the same inputs
(forward+backward, after one untimed warm-up call each), so that each round
gives a ratio to the first ``--reference`` variant measured under about the
same load; the medians of those per-round ratios are reported, with the
median times and the load average.  Variant names and inputs are
``fastirl-bench``'s (``fastirl.bench.variants``, ``fastirl.bench.worker``),
suffixes included: ``fastirl-cpu@compact`` / ``@balanced`` / ``@fast`` (the
``memory=`` setting), ``fastirl-cpu@512MiB`` (a working-memory budget),
``fastirl-cpu@4096`` (an explicit ``chunk_size``); ``--variants memory`` is
every default fastirl IQ variant of the CPU at each setting.  The predicted
time and peak extra memory are the cost model's for that variant, setting
included (``python -m fastirl.bench.roofline --device cpu``); this script
measures no memory (``fastirl-bench`` does, with the same names).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _names(spec: str) -> list[str]:
    """Variant names, the "memory" group expanded; SystemExit for a bad name."""
    import torch

    from fastirl.bench import variants
    out = []
    for name in (v.strip() for v in spec.split(",") if v.strip()):
        if name == "memory":
            out += variants.memory_group(torch.device("cpu"))
            continue
        try:
            variants.info(name)
        except ValueError as exc:
            raise SystemExit(f"interleaved.py: {exc}") from None
        out.append(name)
    return list(dict.fromkeys(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    p.add_argument("--variants", default="fastirl-cpu,cce,matmul-floor",
                   help="comma-separated fastirl-bench variants, @ suffixes included "
                        "(fastirl-cpu@compact, fastirl-cpu@512MiB, fastirl-cpu@4096), or "
                        "'memory' (default %(default)s)")
    p.add_argument("--reference", default="matmul-floor",
                   help="the variant the ratios are taken to (default %(default)s)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--td-weight", type=float, default=0.1)
    p.add_argument("--csv", help="write one row per variant and round")
    args = p.parse_args(argv)

    import torch

    from fastirl.bench import predict, roofline, variants, worker

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    names = _names(args.variants)
    if args.reference not in names:
        names.append(args.reference)
    dtype = getattr(torch, args.dtype)
    x, w, t = worker.make_inputs(torch, batch=args.batch, seq=args.seq, hidden=args.hidden,
                                 vocab=args.vocab, dtype=dtype, device=device, seed=0)
    steps = {}
    for name in names:
        why = variants.unavailable_reason(name, device)
        if why:
            print(f"{name}: skipped - {why}")
            continue
        fn = variants.loss_fn(name, device, td_weight=args.td_weight)
        steps[name] = variants.bind(name, fn, x, w, t).step
        steps[name]()                       # warm-up (compiles, builds, first-touch)
    if args.reference not in steps:
        print(f"the reference {args.reference!r} cannot run here", file=sys.stderr)
        return 2
    times: dict[str, list[float]] = {n: [] for n in steps}
    loads = []
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
            x.grad = w.grad = None
        line = "  ".join(f"{n} {times[n][-1]:.2f}s" for n in steps)
        print(f"round {r + 1}/{args.rounds} (load {loads[-1]:.1f}): {line}", flush=True)
    ref = times[args.reference]
    hw = roofline.calibrate_cpu(seconds=2.0)
    n_tok = args.batch * args.seq
    print(f"\nB={args.batch} T={args.seq} H={args.hidden} V={args.vocab} {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds, load "
          f"{min(loads):.1f}-{max(loads):.1f}")
    width = max(16, *(len(n) for n in times))
    print(f"{'variant':<{width}} {'median':>9} {'ratio / ' + args.reference:>22} "
          f"{'predicted':>10} {'predicted memory':>17}  plan")
    rows = []
    for name, ts in times.items():
        ratios = [a / b for a, b in zip(ts, ref)]
        p = predict.predict_point(name, tokens=n_tok, hidden=args.hidden, vocab=args.vocab,
                                  dtype=args.dtype, hw=hw)
        pred = None if p is None else p.seconds
        mem = None if p is None else p.peak_extra_bytes / 2**20
        print(f"{name:<{width}} {statistics.median(ts):>8.2f}s "
              f"{statistics.median(ratios):>10.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
              f" {'' if pred is None else f'{pred:>9.2f}s'}"
              f" {'' if mem is None else f'{mem:>13.0f} MiB'}  {'' if p is None else p.note}")
        for i, (a, q) in enumerate(zip(ts, ratios)):
            rows.append(dict(variant=name, round=i + 1, seconds=f"{a:.4f}",
                             ratio_to_reference=f"{q:.4f}", reference=args.reference,
                             loadavg_1m=f"{loads[i]:.2f}", batch=args.batch, seq=args.seq,
                             hidden=args.hidden, vocab=args.vocab, dtype=args.dtype,
                             threads=torch.get_num_threads(),
                             predicted_s="" if pred is None else f"{pred:.4f}",
                             predicted_peak_mib="" if mem is None else f"{mem:.1f}",
                             plan="" if p is None else p.note))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
