#!/usr/bin/env bash
# Rebuild the bundled demonstration model (conic_qp/models/demo-consep) and its model-card scores.
# Needs ../shared/data (CoNSeP, MoNuSeg). CPU: about 75 min of training on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
conic-qp train --config examples/demo-consep/train.yaml            # best checkpoint by val mPQ+
conic-qp tune --model runs/demo-consep/best --config examples/demo-consep/train.yaml --task both
rm -rf conic_qp/models/demo-consep && mkdir -p conic_qp/models
cp -r runs/demo-consep/best conic_qp/models/demo-consep
# Scores on the official CoNSeP test images (14 images, 224 tiles at 0.5 um/px), as in docs/models.md:
conic-qp evaluate --model conic_qp/models/demo-consep --data tiles:../shared/data/consep@test --json
conic-qp evaluate --model conic_qp/models/demo-consep --data tiles:../shared/data/consep@test --tta 4 --json
