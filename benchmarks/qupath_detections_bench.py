"""Writing a 1M-nucleus image for QuPath: chunked detection folder vs one GeoJSON file.

    python benchmarks/qupath_detections_bench.py [--n 1000000] [--per-file 100000]

The table is made of real outlines (``instances_to_table`` on synthetic ellipse tiles, as in
``geojson_bench.py``), replicated across a slide-sized grid with fresh ids, written to Parquet as
``predict`` writes it. Then, in the same run:

- ``write_detection_folder`` (what ``conic-qp annotate`` writes for the Groovy import): parents
  from four annotations (one nested in another) by QuPath's rule, files of at most
  ``--per-file`` features, read back from the Parquet file in row batches, twice;
- the baseline: ``write_geojson`` of the same table into one ``.geojson.gz`` (what predict writes).

Prints write times, nuclei/s, file sizes (total, per file, per 100k nuclei) and the peak resident
memory of the process.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from conic_qp.classes import CONIC
from conic_qp.objects import nucleus_id
from conic_qp.sinks.geojson import Region, write_detection_folder, write_geojson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from geojson_bench import make_table


def slide_table(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` nuclei: one real tile table tiled over a grid (about 0.25 um/px, 40x)."""
    base, _ = make_table(min(n, 20_000), seed)
    x0, y0 = base["centroid_x"].min(), base["centroid_y"].min()
    w = base["centroid_x"].max() - x0 + 40
    h = base["centroid_y"].max() - y0 + 40
    reps = -(-n // len(base))
    cols = int(np.ceil(np.sqrt(reps * h / w)))
    parts = []
    geoms = shapely.from_wkb(base["polygon_wkb"].to_numpy())
    for k in range(reps):
        dx, dy = (k % cols) * w, (k // cols) * h
        part = base.copy()
        part["centroid_x"] += dx
        part["centroid_y"] += dy
        part["polygon_wkb"] = shapely.to_wkb(
            shapely.transform(geoms, lambda c, dx=dx, dy=dy: c + np.array([dx, dy]))
        )
        part["id"] = [
            nucleus_id("bench-slide", x, y)
            for x, y in zip(part["centroid_x"], part["centroid_y"], strict=True)
        ]
        parts.append(part)
    return pd.concat(parts, ignore_index=True).iloc[:n].reset_index(drop=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--per-file", type=int, default=100_000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    table = slide_table(args.n)
    t_make = time.perf_counter() - t0
    xmax, ymax = table["centroid_x"].max(), table["centroid_y"].max()
    verts = np.mean([len(b) for b in table["polygon_wkb"].iloc[:10_000]]) / 16 - 1
    print(
        f"# {len(table):,} nuclei (~{verts:.0f} vertices each) over {xmax:,.0f} x {ymax:,.0f} px; "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; table made in {t_make:.0f} s"
    )
    regions = [
        Region(shapely.box(0, 0, xmax / 2, ymax / 2), "Tumor", "Tumor"),
        Region(shapely.box(xmax / 8, ymax / 8, xmax / 4, ymax / 4), "Tumor core", "Tumor"),
        Region(shapely.box(xmax / 2, 0, xmax, ymax / 3), "Stroma", "Stroma"),
        Region(
            shapely.Polygon([(0, ymax * 0.6), (xmax * 0.7, ymax), (0, ymax)]), "Immune", "Other"
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        parquet = d / "slide.nuclei.parquet"
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), parquet)
        del table

        def batches():  # type: ignore[no-untyped-def]
            for b in pq.ParquetFile(parquet).iter_batches(batch_size=20_000):
                yield b.to_pandas()

        t0 = time.perf_counter()
        res = write_detection_folder(
            batches, d / "detections" / "1", CONIC, regions=regions, add_regions=True,
            per_file=args.per_file, info={"entry_id": "1"},
        )  # fmt: skip
        t_folder = time.perf_counter() - t0
        sizes = np.array([p.stat().st_size for p in res.files], dtype=np.float64)
        t0 = time.perf_counter()
        single = write_geojson(batches(), d / "slide.geojson.gz", CONIC)
        t_single = time.perf_counter() - t0
        single_size = single.stat().st_size

    n = res.n_objects
    mib = 2**20
    print(f"{'writer':44s} {'seconds':>8s} {'nuclei/s':>9s} {'total MiB':>10s} {'MiB/100k':>9s}")
    print(
        f"{'write_detection_folder (' + str(len(sizes)) + ' files)':44s} {t_folder:8.1f} "
        f"{n / t_folder:9,.0f} {sizes.sum() / mib:10.1f} {sizes.sum() / mib * 1e5 / n:9.1f}"
    )
    print(
        f"{'write_geojson, one .geojson.gz (baseline)':44s} {t_single:8.1f} {n / t_single:9,.0f} "
        f"{single_size / mib:10.1f} {single_size / mib * 1e5 / n:9.1f}"
    )
    print(f"folder / baseline time: {t_folder / t_single:.2f}x")
    print(
        f"files: {len(sizes)}, {sizes.min() / mib:.2f}-{sizes.max() / mib:.2f} MiB each "
        f"(at most {args.per_file:,} detections per file)"
    )
    for parent, count in res.counts_by_parent().items():
        name = next((a["name"] for a in res.manifest["annotations"] if a["id"] == parent), "root")
        print(f"  under {name}: {count:,}")
    print(f"peak resident memory of this process: {peak_rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
