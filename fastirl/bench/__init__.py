"""``fastirl-bench``: time and peak memory of the fused IQ loss against the naive
loss, cross-entropy anchors and the matmul floor.

    fastirl-bench                      # default shape on the present device
    fastirl-bench --preset cpu-fp32    # CPU fp32, B=4 T=1024 H=512 V=32000 + token sweep
    fastirl-bench --list               # variants and whether they run here
    python -m fastirl.bench --help

Each (variant, shape) is measured in a fresh process (:mod:`fastirl.bench.worker`),
after a correctness check against :mod:`fastirl.reference`; results go to
``--out`` as ``results.csv``, ``table.md`` and PNG plots.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv=None) -> int:
    """Entry point of ``fastirl-bench``; returns the exit status (0 ok, 2 bad
    request, 3 a fastirl variant wrong or failed)."""
    from .cli import run
    return run(argv)
