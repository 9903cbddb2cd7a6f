#!/usr/bin/env bash
# One-shot GPU check of fastirl for the lent H200 (or any H100 / H200 / A100),
# in under 9 minutes.  How to run it through the device tool, and what to
# commit from it: docs/gpu-check.md.
#
#   bash benchmarks/gpu_check.sh                    # writes $OUT (default gpu-check-out/)
#   OUT=dir PYTHON=python3 bash benchmarks/gpu_check.sh
#
# Uses the checkout as it is (PYTHONPATH, no install, no network); peers'
# pure-Python wheels (liger-kernel, cut-cross-entropy) are installed from the
# ignored folder .whl/ when it is there (docs/gpu-check.md: how to fetch them).
# Steps, each under its own time cap (seconds), in this order:
#   0. versions                                                  ($OUT/versions.txt)      10
#   1. fastirl-bench, N=8192 H=4096 V=128256 bf16, lm inputs,    ($OUT/bench.csv)        250
#      each row written to the CSV as it finishes
#   2. cce and fastirl-triton again on random inputs             ($OUT/bench-random.csv)  60
#   3. bare torch.mm at the step's GEMM shapes, a copy           ($OUT/ceilings.csv)      40
#   4. torch.profiler of one default step beside the model       ($OUT/profile.csv)       50
#   5. pytest -m gpu                                             ($OUT/pytest.txt)       110
#   6. measured beside predicted                                 ($OUT/gpu-check.csv)     15
# Everything printed also goes to $OUT/log.txt.  Without a CUDA device it checks
# every import it would make, prints the plan and exits 0.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/log.txt"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu-check-site .whl/*.whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu-check-site"
fi

GPU=$("$PY" - <<'EOF' 2>/dev/null
import torch
if torch.cuda.is_available():
    name = torch.cuda.get_device_name(0).lower()
    print(next((g for g in ("h200", "h100", "a100") if g in name), "h100"))
EOF
)

SHAPE=(--batch 1 --seq 8192 --hidden 4096 --vocab 128256 --dtype bfloat16)
VARIANTS=${VARIANTS:-matmul-floor,fastirl-triton,naive,liger,cce,fastirl-triton-fused,torch-lce,fastirl-cuda}
BENCH=("$PY" -m fastirl.bench --device cuda "${SHAPE[@]}" --variants "$VARIANTS"
       --repeats 5 --warmup 1 --no-plots --job-timeout 120 --compile-timeout 60
       --out /tmp/gpu-check-bench --csv "$OUT/bench.csv" --inputs lm)
BENCH_RANDOM=("$PY" -m fastirl.bench --device cuda "${SHAPE[@]}" --variants cce,fastirl-triton
              --repeats 5 --warmup 1 --no-plots --job-timeout 50 --no-check
              --out /tmp/gpu-check-bench-random --csv "$OUT/bench-random.csv" --inputs random)
PYTEST=("$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider -x
        tests/test_gpu_check.py tests/test_triton_gpu.py tests/test_native_gpu.py)

if [ -z "$GPU" ]; then
    say "gpu_check.sh: no CUDA device here.  Imports it makes:"
    "$PY" benchmarks/gpu_probe.py imports 2>&1 | tee -a "$LOG"
    say "On a GPU it would run (caps in seconds):"
    say "  0. timeout 10  $PY benchmarks/gpu_probe.py versions $OUT/versions.txt"
    say "  1. timeout 250 ${BENCH[*]}"
    say "  2. timeout 60  ${BENCH_RANDOM[*]}"
    say "  3. timeout 40  $PY benchmarks/gpu_probe.py ceilings $OUT/ceilings.csv --gpu <gpu>"
    say "  4. timeout 50  $PY benchmarks/gpu_probe.py profile $OUT/profile.csv --gpu <gpu>"
    say "  5. timeout 110 ${PYTEST[*]}"
    say "  6. timeout 15  $PY benchmarks/gpu_probe.py join $OUT --gpu <gpu>"
    "$PY" -m fastirl.bench "${SHAPE[@]}" --device cpu --variants "$VARIANTS" --dry-run \
        2>&1 | tail -n 12 | tee -a "$LOG"
    exit 0
fi

step() {   # step CAP NAME COMMAND...: run under a time cap, log, never abort the script
    local cap=$1 name=$2
    shift 2
    say "== $name (cap ${cap}s) $(date +%T)"
    timeout --kill-after=5 "$cap" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "== $name: exit $rc"
    return 0
}

say "== gpu_check on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))') ($GPU)"
step 10 "0. versions" "$PY" benchmarks/gpu_probe.py versions "$OUT/versions.txt"
step 250 "1. fastirl-bench, lm inputs" "${BENCH[@]}"
step 60 "2. fastirl-bench, random inputs" "${BENCH_RANDOM[@]}"
step 40 "3. torch.mm and copy ceilings" "$PY" benchmarks/gpu_probe.py ceilings "$OUT/ceilings.csv" --gpu "$GPU"
step 50 "4. profile of one default step" "$PY" benchmarks/gpu_probe.py profile "$OUT/profile.csv" --gpu "$GPU"
say "== 5. pytest -m gpu (cap 110s) $(date +%T)"
timeout --kill-after=5 110 "${PYTEST[@]}" > "$OUT/pytest.txt" 2>&1
TESTS=$?
tail -n 15 "$OUT/pytest.txt" | tee -a "$LOG"
step 15 "6. measured beside predicted" "$PY" benchmarks/gpu_probe.py join "$OUT" --gpu "$GPU"
say "== tests exit status: $TESTS (0 = all passed, 124 = time cap)"
exit 0
