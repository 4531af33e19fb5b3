"""Out-of-domain check of a checkpoint on NuCLS's test fields of view (breast, another lab).

NuCLS's classes (tumour / non-tumour) are not a model's classes, so ``conic-qp evaluate`` cannot
score them; this script gives the two figures docs/models.md reports for the bundled model:

- binary PQ / DQ / SQ / AJI with HoVer-Net's whole-image protocol (each field predicted whole at
  the model's um/px, labels scaled back to NuCLS's 0.2 um/px and scored there);
- which class the model gives the nuclei of each NuCLS class (majority of the predicted class
  under each true nucleus): do tumour nuclei come out epithelial more often than non-tumour ones?

    python scripts/nucls_check.py conic_qp/models/demo-consep [--nucls ../shared/data/nucls]
        [--zoom Z] [--thresholds T.json]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from conic_qp.checkpoint import load_checkpoint
from conic_qp.metrics import HOVERNET_RADIUS_UM, evaluate_whole_images
from conic_qp.postprocess import PostprocessParams
from conic_qp.train.data import read_nucls
from conic_qp.train.evaluation import checkpoint_params, predict_whole_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--nucls", default="../shared/data/nucls")
    ap.add_argument("--tta", type=int, default=1)
    ap.add_argument("--zoom", type=float, default=None, help="default: the checkpoint's")
    ap.add_argument("--thresholds", default=None, help="thresholds.json instead of the model's")
    args = ap.parse_args()
    ckpt = load_checkpoint(args.model, device="cpu")
    params = checkpoint_params(ckpt, args.model)
    if args.thresholds:
        params = PostprocessParams.from_json(json.loads(Path(args.thresholds).read_text()))
    data = read_nucls(args.nucls, splits=("test",))
    assert data.scheme is not None and data.class_maps is not None
    scored: list[tuple[str, np.ndarray, np.ndarray]] = []
    calls: dict[str, Counter[str]] = {name: Counter() for name in data.scheme.names}
    for i in range(len(data)):
        image = np.asarray(data.images[i])
        pred = predict_whole_image(ckpt, image, data.mpp, params, args.tta, i, zoom=args.zoom)
        labels, classes = pred[..., 0], pred[..., 1]
        true = data.inst_maps[i].astype(np.int32)
        t_bin, p_bin = (np.stack([m, (m > 0).astype(np.int32)], -1) for m in (true, labels))
        scored.append((str(i), t_bin, p_bin))
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
