#!/usr/bin/env bash
# GPU checks for a lent GPU machine (no internet): `pytest -m gpu` and the predict benchmark on
# CUDA with EfficientNet-B5 and 16 TTA passes. Everything is written under $OUT (default ./gpu_out).
#
# Environment: the repository's .venv is not used (built on another machine). A venv is created
# in .venv-gpu with --system-site-packages, so a preinstalled torch is reused; missing packages
# are installed offline from wheels/ when that folder was carried along, else from PyPI if
# reachable.
#
#   bash benchmarks/gpu_check.sh                   # tests + benchmark
#   SKIP_TESTS=1 bash benchmarks/gpu_check.sh      # benchmark only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/summary.txt"; }

PY="${PYTHON:-python3}"
VENV=.venv-gpu
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV (system site packages: reuses a preinstalled torch)"
  "$PY" -m venv --system-site-packages "$VENV" || { log "venv creation failed"; exit 3; }
fi
VPY="$VENV/bin/python"
PIP_ARGS=()
if [ -d wheels ]; then PIP_ARGS=(--no-index --find-links wheels); fi
if ! "$VPY" -c "import conic_qp, torch, timm, tiffslide, zarr, pytest" 2>/dev/null; then
  log "installing conic-qp[dev] ${PIP_ARGS[*]:-from the index}"
  "$VPY" -m pip install -q "${PIP_ARGS[@]}" -e ".[dev]" >"$OUT/pip.log" 2>&1 ||
    "$VPY" -m pip install -q "${PIP_ARGS[@]}" --no-deps -e . >>"$OUT/pip.log" 2>&1 ||
    log "pip install failed (see pip.log); trying with what is installed"
fi
"$VPY" - <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
EOF

status=0
if [ -z "${SKIP_TESTS:-}" ]; then
  log "pytest -m gpu"
  "$VPY" -m pytest -m gpu -q -p no:cacheprovider tests >"$OUT/pytest_gpu.log" 2>&1
  rc=$?
  tail -3 "$OUT/pytest_gpu.log" | tee -a "$OUT/summary.txt"
  [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1
fi

# B5, 16 TTA passes (MC dropout), 512 px tiles, AMP; post-processing on all cores but one.
WORKERS=$(( $(nproc) - 1 ))
log "predict benchmark on cuda: efficientnet_b5, TTA 16, $WORKERS workers"
"$VPY" benchmarks/predict_bench.py --device cuda --encoder efficientnet_b5 --tta 16 \
  --batch 16 --threads 4 --workers "$WORKERS" --net-tiles 32 --post-tiles 8 \
  --small 4096 --large 8192 --out "$OUT/predict_bench.json" 2>&1 | tee "$OUT/predict_bench.log"
[ "${PIPESTATUS[0]}" -ne 0 ] && status=1
grep -E "network only|cores|e2e_|bounded" "$OUT/predict_bench.log" >>"$OUT/summary.txt"
log "done (status $status); results in $OUT"
exit $status
