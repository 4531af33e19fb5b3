#!/usr/bin/env bash
# Prepare, on a machine with PyPI access, what benchmarks/gpu_check.sh carries to a lent GPU
# machine (no internet there; its python3 already has torch, timm, numpy, scipy, scikit-image,
# pandas, pyarrow, pillow, click, rich, pytest, nvidia-ml-py, ...):
#   .whl/       wheels of the packages that image lacks (CPython 3.12, manylinux x86_64), the
#               versions this project is tested with
#   .gpu-data/  slides/CMU-1-Small-Region.svs, the real slide of the benchmark
# Both folders are git-ignored; together ~40 MiB (the carried tree must stay under 64 MiB).
#
#   bash benchmarks/gpu_prepare.sh
#   then one device call: carry [".whl", ".gpu-data"], command "bash benchmarks/gpu_check.sh",
#   timeout_s 540 (the script budgets itself to ~8 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
SHARED="${CONIC_QP_SHARED_DATA:-$PWD/../shared/data}"
mkdir -p .whl .gpu-data/slides
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl tiffslide==3.0.1 imagecodecs==2026.3.6 zarr==3.1.6 numcodecs==0.16.6 \
  donfig==0.8.1.post1 google-crc32c==1.9.0 shapely==2.2.0 geojson==3.3.0 tifffile==2026.3.3
if [ -f "$SHARED/slides/CMU-1-Small-Region.svs" ]; then
  cp "$SHARED/slides/CMU-1-Small-Region.svs" .gpu-data/slides/
else
  echo "no $SHARED/slides/CMU-1-Small-Region.svs: the GPU run will skip the real slide" >&2
fi
du -sh .whl .gpu-data
