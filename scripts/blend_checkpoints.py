"""Blend a model with one fine-tuned from it (WiSE-FT) into a new checkpoint folder.

The weights are ``(1 - weight) * FIRST + weight * SECOND``; classes, um/px, thresholds (Task 1
and Task 2) and inference settings come from FIRST, the model that was fine-tuned. The shipped
demonstration model is such a blend (docs/models.md: weight 0.5, chosen on the CoNSeP validation
tiles and NuCLS). Re-run ``conic-qp tune`` on the blend when FIRST's thresholds may not fit it.

    python scripts/blend_checkpoints.py FIRST SECOND OUT [--weight 0.5]
"""

from __future__ import annotations

import argparse
import sys

from conic_qp.checkpoint import (
    THRESHOLDS_TASK2_FILE,
    blend_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from conic_qp.errors import ConicQPError
from conic_qp.inputs import read_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", help="the model that was fine-tuned")
    ap.add_argument("second", help="the fine-tuned model (train --init-from FIRST)")
    ap.add_argument("out", help="the blended checkpoint folder")
    ap.add_argument("--weight", type=float, default=0.5, help="share of SECOND (0-1)")
    args = ap.parse_args()
    try:
        first, second = load_checkpoint(args.first), load_checkpoint(args.second)
        model = blend_checkpoints(first, second, args.weight)
        task2 = first.path / THRESHOLDS_TASK2_FILE
        save_checkpoint(
            args.out,
            model,
            first.classes,
            first.mpp,
            thresholds=first.thresholds,
            thresholds_task2=(
                read_json(task2, "Task 2 thresholds", "re-run conic-qp tune --task 2")
                if task2.is_file()
                else None
            ),
            training={
                "blend": {
                    "weight": args.weight,
                    "first": args.first,
                    "first_weights_sha256": first.meta.get("weights_sha256"),
                    "second": args.second,
                    "second_weights_sha256": second.meta.get("weights_sha256"),
                },
                "first": first.training,
                "second": second.training,
            },
            half=first.meta.get("weights_dtype") == "float16",
            inference={"mc_dropout": model.mc_dropout_default, "zoom": model.inference_zoom},
        )
    except ConicQPError as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {args.out}: {1 - args.weight:g} x {args.first} + {args.weight:g} x {args.second}")


if __name__ == "__main__":
    main()
