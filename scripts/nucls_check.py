"""Out-of-domain check of a checkpoint on NuCLS's test fields of view (breast, another lab).

NuCLS's classes (tumour / non-tumour) are not a model's classes, so ``conic-qp evaluate`` cannot
score them; this script gives the two figures docs/models.md reports for the bundled model:

- binary PQ / DQ / SQ / AJI with HoVer-Net's whole-image protocol (each field predicted whole at
  the model's um/px, labels scaled back to NuCLS's 0.2 um/px and scored there);
- which class the model gives the nuclei of each NuCLS class (majority of the predicted class
  under each true nucleus): do tumour nuclei come out epithelial more often than non-tumour ones?

    python scripts/nucls_check.py conic_qp/models/demo-consep [--nucls ../shared/data/nucls]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from skimage.transform import resize

from conic_qp.checkpoint import load_checkpoint
from conic_qp.metrics import HOVERNET_RADIUS_UM, evaluate_whole_images
from conic_qp.postprocess import PostprocessParams, postprocess
from conic_qp.train.data import read_nucls, resample_labelled
from conic_qp.train.evaluation import whole_image_probabilities


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--nucls", default="../shared/data/nucls")
    ap.add_argument("--tta", type=int, default=1)
    args = ap.parse_args()
    ckpt = load_checkpoint(args.model, device="cpu")
    params = (
        PostprocessParams.from_json(ckpt.thresholds)
        if ckpt.thresholds
        else PostprocessParams.default(ckpt.classes.n_classes)
    )
    data = read_nucls(args.nucls, splits=("test",))
    assert data.scheme is not None and data.class_maps is not None
    scored = []
    calls: dict[str, Counter[str]] = {name: Counter() for name in data.scheme.names}
    for i in range(len(data)):
        image = np.asarray(data.images[i])
        small, _, _ = resample_labelled(
            image, np.zeros(image.shape[:2], np.int32), None, data.mpp / ckpt.mpp
        )
        sem, tl = whole_image_probabilities(ckpt.model, small, tta=args.tta, seed=i)
        inst = postprocess(sem, tl, params)
        lut = np.concatenate([[0], inst.classes]).astype(np.int32)
        size = image.shape[:2]
        labels = resize(inst.labels, size, order=0, preserve_range=True, anti_aliasing=False)
        labels = labels.astype(np.int32)
        classes = lut[labels]
        true = data.inst_maps[i].astype(np.int32)
        scored.append(
            (str(i), np.stack([true, (true > 0) * 1], -1), np.stack([labels, (labels > 0) * 1], -1))
        )
        for nid in np.unique(true[true > 0]):
            mask = true == nid
            tc = data.class_maps[i][mask]
            tc = tc[tc > 0]
            if tc.size == 0:
                continue
            pc = classes[mask]
            pc = pc[pc > 0]
            call = ckpt.classes.names[int(np.bincount(pc).argmax()) - 1] if pc.size else "missed"
            calls[data.scheme.names[int(np.bincount(tc).argmax()) - 1]][call] += 1
    scores = evaluate_whole_images(scored, ["nucleus"], radius=HOVERNET_RADIUS_UM / data.mpp)
    summary = scores.to_json()
    out = {k: round(float(summary[k]), 3) for k in ("pq", "dq", "sq", "aji")}
    print(json.dumps({"model": str(Path(args.model)), "binary": out, "calls": calls}, indent=1))


if __name__ == "__main__":
    main()
