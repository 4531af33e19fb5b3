#!/usr/bin/env bash
# GPU checks in ONE call of a lent GPU machine, within ~8 minutes. Results under $OUT.
#
# Prepare first (here, with PyPI): bash benchmarks/gpu_prepare.sh
# Then one device call: carry [".whl", ".gpu-data"], command "bash benchmarks/gpu_check.sh",
# timeout_s 540. The machine's own python3 (with its preinstalled torch) is used; the carried
# wheels (.whl) go to /tmp/site without dependencies or an index (nothing can be fetched there).
#
# What it measures (see benchmarks/predict_bench.py): `pytest -m gpu`; network-only tiles/s of
# EfficientNet-B5 with 1 and 16 TTA passes (AMP) and its peak GPU memory; post-processing
# core-seconds per Mpx at real density (the bundled model on CMU-1) and so the CPU workers a
# GPU needs; end to end s/mm^2 at 0.5 um/px of B5 x 16 passes on a synthetic slide and on CMU-1
# (and of the bundled model), the time split and the mean GPU utilisation of each run; peak RSS
# of a small and a large synthetic slide.
#
#   SKIP_TESTS=1 bash benchmarks/gpu_check.sh      # benchmark only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CONIC_QP_SHARED_DATA="$PWD/.gpu-data"
START=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
PY="${PYTHON:-python3}"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 || log "wheel install failed (see pip.log)"
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  log "no .whl folder carried: relying on what the machine has"
fi
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/summary.txt"
import os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "cpus", os.cpu_count())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
import conic_qp.predict, tiffslide, zarr, shapely  # noqa: E401,F401  the project imports
print("conic_qp imports fine")
PYEOF
nvidia-smi --query-gpu=name,memory.total,utilization.gpu,clocks.sm --format=csv >>"$OUT/summary.txt" 2>&1

status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  log "pytest -m gpu"
  timeout 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests >"$OUT/pytest_gpu.log" 2>&1
  rc=$?
  tail -3 "$OUT/pytest_gpu.log" | tee -a "$OUT/summary.txt"
  [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1
fi

WORKERS=$(( $(nproc) - 1 ))
LEFT=$(( 470 - ($(date +%s) - START) ))
log "predict benchmark on cuda: efficientnet_b5, TTA 16, $WORKERS workers (limit ${LEFT}s)"
timeout "$LEFT" "$PY" benchmarks/predict_bench.py --device cuda --encoder efficientnet_b5 \
  --tta 16 --batch 16 --threads 4 --workers "$WORKERS" --net-tiles 32 --post-blocks 6 \
  --small 4096 --large 8192 --gpu-util --out "$OUT/predict_bench.json" 2>&1 |
  tee "$OUT/predict_bench.log"
[ "${PIPESTATUS[0]}" -ne 0 ] && status=1
grep -E "machine|network only|post-processing|e2e_|bounded" "$OUT/predict_bench.log" >>"$OUT/summary.txt"
log "done (status $status); results in $OUT"
exit $status
