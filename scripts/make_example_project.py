"""Regenerate ``examples/CMU-1``: a QuPath project around OpenSlide's CMU-1-Small-Region.svs.

    python scripts/make_example_project.py [--slide PATH]

Copies the slide (freely redistributable OpenSlide test data) beside the project, writes
``project.qpproj`` with :func:`conic_qp.qupath.project.write_project` and two hand-drawn-like
annotations (``regions/<entryID>.geojson``, level-0 px, as QuPath's export writes them): "Tumor"
over the epidermis (standing in for an epithelial region) and "Stroma" over the dermis.

QuPath needs absolute URIs, so the project is written as if it lived at :data:`PLACEHOLDER`:
no path of the machine that made it is committed, and because the slide keeps its place
relative to the project's ``uri``, QuPath's *search relative* (when the project is opened in
QuPath first) and ``conic-qp annotate`` (which then writes the clone's real paths into
``project.qpproj``, backup first) find the slide wherever the repository is cloned.
"""

from __future__ import annotations

import argparse
import json
import shutil
import uuid
from pathlib import Path

from conic_qp.qupath.project import read_project, regions_path, write_project

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "CMU-1"
SLIDE_NAME = "CMU-1-Small-Region.svs"
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "slides" / SLIDE_NAME

#: Level-0 px polygons traced on a thumbnail of the slide (2220 x 2967 px, 0.499 um/px).
REGIONS = {
    "Tumor": [
        (1014, 692), (1150, 655), (1286, 643), (1320, 820), (1335, 989), (1290, 1240),
        (1261, 1484), (1245, 1800), (1236, 2077), (1113, 2176), (1085, 1950), (1063, 1731),
        (1030, 1480), (1014, 1236), (1000, 950),
    ],
    "Stroma": [
        (791, 1484), (900, 1470), (1014, 1484), (1025, 1850), (1038, 2225), (990, 2500),
        (940, 2769), (840, 2790), (742, 2769), (735, 2400), (742, 2077), (770, 1750),
    ],
}  # fmt: skip
COLORS = {"Tumor": [200, 0, 0], "Stroma": [150, 200, 150]}
#: Where the committed project.qpproj says it lives (no real machine's path).
PLACEHOLDER = "/path/to/conic-qp/examples/CMU-1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SOURCE, help="CMU-1-Small-Region.svs")
    args = parser.parse_args()
    EXAMPLE.mkdir(parents=True, exist_ok=True)
    slide = EXAMPLE / SLIDE_NAME
    if not slide.exists():
        shutil.copyfile(args.slide, slide)
    project = write_project(EXAMPLE, [slide], overwrite=True, as_if_at=PLACEHOLDER)
    for leftover in EXAMPLE.glob("project.qpproj*.bak"):
        leftover.unlink()  # write_project backs up the previous file; the example needs none
    entry = read_project(project).images[0].entry_id
    features = [
        {
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"conic-qp/examples/CMU-1/{name}")),
            "geometry": {"type": "Polygon", "coordinates": [[*map(list, pts), list(pts[0])]]},
            "properties": {
                "objectType": "annotation",
                "name": name,
                "classification": {"name": name, "color": COLORS[name]},
            },
        }
        for name, pts in REGIONS.items()
    ]
    out = regions_path(EXAMPLE, entry)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"type": "FeatureCollection", "features": features}, indent=1) + "\n")
    print(f"wrote {project} and {out}")


if __name__ == "__main__":
    main()
