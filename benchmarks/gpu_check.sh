#!/usr/bin/env bash
# One-shot GPU check of fastirl (issue 11): correctness on the GPU, then time and
# memory at the Llama-3-8B head shape beside the roofline model's prediction.
#
#   bash benchmarks/gpu_check.sh                 # writes gpu-check-out/
#   OUT=dir PYTHON=python3 bash benchmarks/gpu_check.sh
#
# On one H100 / H200 it takes about 5-8 minutes (first use compiles the Triton
# kernels and the CUDA extension).  Steps:
#   1. pytest -m gpu: every CUDA backend against the float64 reference, a head
#      on a non-current device (2+ GPUs), N*V > 2^31 logits, > 65,535 rows,
#      bf16 in-place epilogues, extreme logits, float16 underflow
#      (tests/test_gpu_check.py, test_triton_gpu.py, test_native_gpu.py);
#   2. fastirl-bench, N = B*T = 8192, H = 4096, V = 128256, bf16, forward+backward:
#      every fastirl CUDA backend, liger, cce, torch-lce, naive, the 3-GEMM floor;
#   3. python -m fastirl.bench.roofline for the same shape on this GPU;
#   4. $OUT/gpu-check.csv: one row per variant, measured time and peak memory
#      beside the predicted ones.
# Without a CUDA device it prints these commands and exits 0.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-gpu-check-out}
BATCH=1 SEQ=8192 HIDDEN=4096 VOCAB=128256 DTYPE=bfloat16
VARIANTS=${VARIANTS:-fastirl-triton,fastirl-cuda,fastirl-triton-fused,fastirl-torch,liger,cce,torch-lce,naive,matmul-floor}
SHAPE=(--batch "$BATCH" --seq "$SEQ" --hidden "$HIDDEN" --vocab "$VOCAB" --dtype "$DTYPE")

GPU=$("$PY" - <<'EOF' 2>/dev/null
import torch
if torch.cuda.is_available():
    name = torch.cuda.get_device_name(0).lower()
    print(next((g for g in ("h200", "h100", "a100") if g in name), "h100"))
EOF
)

PYTEST=("$PY" -m pytest -m gpu -q -rfE -p no:cacheprovider
        tests/test_gpu_check.py tests/test_triton_gpu.py tests/test_native_gpu.py
        --junitxml "$OUT/pytest.xml")
BENCH=("$PY" -m fastirl.bench --device cuda "${SHAPE[@]}" --variants "$VARIANTS"
       --repeats 5 --warmup 2 --no-plots --out "$OUT/bench" --csv "$OUT/bench.csv")
MODEL=("$PY" -m fastirl.bench.roofline --gpu "${GPU:-h100}" "${SHAPE[@]}"
       --sweep-tokens "$SEQ" --csv "$OUT/predicted.csv")

if [ -z "$GPU" ]; then
    echo "gpu_check.sh: no CUDA device here; on a GPU it would run:"
    echo "  1. timeout 300 ${PYTEST[*]}"
    echo "  2. timeout 330 ${BENCH[*]}"
    echo "  3. ${MODEL[*]}"
    echo "  4. join bench.csv and predicted.csv into $OUT/gpu-check.csv"
    echo "     (variant, gpu, measured_fb_ms, predicted_ms, measured_vs_predicted,"
    echo "      measured_peak_mib, predicted_peak_mib, status)"
    exit 0
fi

mkdir -p "$OUT"
echo "== gpu_check on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))') ($GPU)"
echo "== 1. pytest -m gpu"
timeout 300 "${PYTEST[@]}" 2>&1 | tee "$OUT/pytest.log"
TESTS=${PIPESTATUS[0]}
echo "== 2. fastirl-bench at N=$((BATCH * SEQ)) H=$HIDDEN V=$VOCAB $DTYPE"
timeout 330 "${BENCH[@]}" 2>&1 | tee "$OUT/bench.log"
echo "== 3. roofline model"
"${MODEL[@]}" > "$OUT/predicted.txt" 2>&1
echo "== 4. measured beside predicted: $OUT/gpu-check.csv"
"$PY" - "$OUT" "$GPU" <<'EOF'
import csv, sys
out, gpu = sys.argv[1], sys.argv[2]

def rows(path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []

pred = {r["variant"]: r for r in rows(f"{out}/predicted.csv")}
meas = {r["variant"]: r for r in rows(f"{out}/bench.csv") if r.get("mode") in ("IQ", "CE", "floor", "", None)}
cols = ["variant", "gpu", "measured_fb_ms", "predicted_ms", "measured_vs_predicted",
        "measured_peak_mib", "predicted_peak_mib", "status"]
with open(f"{out}/gpu-check.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for v in list(meas) + [v for v in pred if v not in meas]:
        m, p = meas.get(v, {}), pred.get(v, {})
        ms, pm = m.get("fb_ms_median") or "", p.get("predicted_ms") or ""
        ratio = f"{float(ms) / float(pm):.3f}" if ms and pm else ""
        w.writerow(dict(variant=v, gpu=gpu, measured_fb_ms=ms, predicted_ms=pm,
                        measured_vs_predicted=ratio, measured_peak_mib=m.get("peak_mib", ""),
                        predicted_peak_mib=p.get("peak_extra_mib", ""),
                        status=m.get("status", "not run")))
print(open(f"{out}/gpu-check.csv").read())
EOF
echo "== tests exit status: $TESTS (0 = all passed)"
exit "$TESTS"
