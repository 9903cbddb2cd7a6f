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
``fastirl-bench``'s (``fastirl.bench.variants``, ``fastirl.bench.worker``); ``fastirl-cpu@4096`` is a fastirl variant with an
explicit ``chunk_size``.  (The prediction column is the policy's chunking.)
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


def _with_chunk(name: str, chunk: int, td_weight: float):
    """A fastirl variant with an explicit chunk_size ("fastirl-cpu@4096")."""
    import fastirl
    from fastirl.bench import variants
    backend = variants.fastirl_backend(name)
    if backend is None:
        raise SystemExit(f"@chunk only applies to fastirl variants, not {name!r}")
    lam = 0.0 if name.endswith(variants.CE_SUFFIX) else td_weight
    return lambda x, w, t: fastirl.iq_loss(x, w, t, td_weight=lam, backend=backend,
                                           chunk_size=chunk,
                                           ignore_index=variants.IGNORE_INDEX)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    p.add_argument("--variants", default="fastirl-cpu,cce,matmul-floor")
    p.add_argument("--reference", default="matmul-floor",
                   help="the variant the ratios are taken to (default %(default)s)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int)
    p.add_argument("--td-weight", type=float, default=0.1)
    p.add_argument("--csv", help="write one row per variant and round")
    args = p.parse_args(argv)

    import torch

    from fastirl.bench import roofline, variants, worker

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.reference not in names:
        names.append(args.reference)
    dtype = getattr(torch, args.dtype)
    x, w, t = worker.make_inputs(torch, batch=args.batch, seq=args.seq, hidden=args.hidden,
                                 vocab=args.vocab, dtype=dtype, device=device, seed=0)
    steps = {}
    for name in names:
        base, _, chunk = name.partition("@")
        chunk = int(chunk) if chunk else None
        why = variants.unavailable_reason(base, device)
        if why:
            print(f"{name}: skipped - {why}")
            continue
        fn = variants.loss_fn(base, device, td_weight=args.td_weight)
        if chunk:
            fn = _with_chunk(base, chunk, args.td_weight)
        steps[name] = variants.bind(base, fn, x, w, t).step
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
    print(f"{'variant':<16} {'median':>9} {'ratio / ' + args.reference:>22} {'predicted':>10}")
    rows = []
    for name, ts in times.items():
        ratios = [a / b for a, b in zip(ts, ref)]
        pred = roofline.predict_ms(name.partition("@")[0], tokens=n_tok, hidden=args.hidden, vocab=args.vocab,
                                   dtype=args.dtype, hw=hw)
        print(f"{name:<16} {statistics.median(ts):>8.2f}s "
              f"{statistics.median(ratios):>10.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
              f" {'' if pred is None else f'{pred / 1e3:>9.2f}s'}")
        for i, (a, q) in enumerate(zip(ts, ratios)):
            rows.append(dict(variant=name, round=i + 1, seconds=f"{a:.4f}",
                             ratio_to_reference=f"{q:.4f}", reference=args.reference,
                             loadavg_1m=f"{loads[i]:.2f}", batch=args.batch, seq=args.seq,
                             hidden=args.hidden, vocab=args.vocab, dtype=args.dtype,
                             threads=torch.get_num_threads(),
                             predicted_s="" if pred is None else f"{pred / 1e3:.4f}"))
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
