"""GeoJSON write speed and size per 100k nuclei: conic-qp's streaming writer vs whole-list dumps.

    python benchmarks/geojson_bench.py [--n 100000]

Inputs are realistic nucleus tables: outlines from ``instances_to_table`` on synthetic instance
maps (ellipses of 6-14 px radius at 0.5 um/px, scaled x2 to a 0.25 um/px slide), so vertex counts
match what the pipeline writes. Baselines write the SAME features the usual way: build every feature
dict (shapely ``mapping``) and ``json.dump`` the whole FeatureCollection at once, or wrap them in
the ``geojson`` library's objects and ``geojson.dump``. Times include building the features.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from shapely.geometry import mapping
from skimage.draw import ellipse

from conic_qp.classes import CONIC
from conic_qp.objects import concat_tables, instances_to_table
from conic_qp.postprocess import Instances
from conic_qp.sinks.geojson import MARKER, write_geojson


def make_table(n: int, seed: int = 0) -> tuple[pd.DataFrame, float]:
    """A nucleus table of ``n`` nuclei; returns it and the objects/s of instances_to_table."""
    rng = np.random.default_rng(seed)
    tables, t_objects, per_tile = [], 0.0, 0
    size, step = 512, 32
    tile = 0
    while sum(len(t) for t in tables) < n:
        labels = np.zeros((size, size), np.int32)
        k = 0
        for r in range(step // 2, size - step // 2, step):
            for c in range(step // 2, size - step // 2, step):
                rr, cc = ellipse(
                    r + rng.integers(-3, 4),
                    c + rng.integers(-3, 4),
                    rng.uniform(5, 12),
                    rng.uniform(5, 14),
                    shape=labels.shape,
                    rotation=rng.uniform(0, np.pi),
                )
                k += 1
                labels[rr, cc] = k
        probs = rng.dirichlet(np.ones(CONIC.n_classes), size=k).astype(np.float32)
        inst = Instances(labels, probs.argmax(1) + 1, probs)
        t0 = time.perf_counter()
        tables.append(
            instances_to_table(
                inst,
                CONIC,
                origin_xy=(tile * 2 * size, 0),
                scale=2.0,
                mpp_level0=0.25,
                image_id="bench",
            )
        )
        t_objects += time.perf_counter() - t0
        per_tile = k
        tile += 1
    table = concat_tables(tables, CONIC).iloc[:n].reset_index(drop=True)
    return table, tile * per_tile / t_objects


def naive_features(table: pd.DataFrame) -> list[dict]:
    """What one usually writes: a dict per nucleus from shapely's ``mapping`` (same content)."""
    geoms = shapely.transform(
        shapely.from_wkb(table["polygon_wkb"].to_numpy()), lambda c: np.round(c, 2)
    )
    colors = {c.name: list(c.color) for c in CONIC}
    probs = {n: table[f"prob_{n}"].to_numpy() for n in CONIC.names}
    feats = []
    for i, row in enumerate(table.itertuples(index=False)):
        meas = {MARKER: 1.0, "Class probability": float(row.class_prob)}
        meas["Nucleus: Area µm^2"] = float(row.area_um2)
        meas["Nucleus: Perimeter µm"] = float(row.perimeter_um)
        meas["Nucleus: Solidity"] = float(row.solidity)
        meas["Nucleus: Eccentricity"] = float(row.eccentricity)
        for n in CONIC.names:
            meas[f"Probability: {n}"] = float(probs[n][i])
        feats.append(
            {
                "type": "Feature",
                "id": row.id,
                "geometry": mapping(geoms[i]),
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": row.class_name, "color": colors[row.class_name]},
                    "measurements": meas,
                },
            }
        )
    return feats


def timed(fn, *args) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def traced_peak(fn, *args) -> float:  # type: ignore[no-untyped-def]
    """Peak Python heap (MiB) while running ``fn`` (separate run: tracing slows it down)."""
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()
    n = args.n
    table, objects_rate = make_table(n)
    verts = np.mean([len(w) for w in table["polygon_wkb"]]) / 16 - 1
    print(
        f"# {n} nuclei, ~{verts:.0f} vertices each; python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"instances_to_table: {objects_rate:,.0f} nuclei/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name in ("a.geojson", "a.geojson.gz"):
            dt = timed(write_geojson, table, d / name, CONIC)
            peak = traced_peak(write_geojson, table, d / name, CONIC)
            rows.append((f"conic-qp write_geojson {name[2:]}", dt, (d / name).stat().st_size, peak))

        def naive(path: Path) -> None:
            fc = {"type": "FeatureCollection", "features": naive_features(table)}
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "wt", encoding="utf-8") as fh:  # type: ignore[operator]
                json.dump(fc, fh)

        for name in ("b.geojson", "b.geojson.gz"):
            dt = timed(naive, d / name)
            peak = traced_peak(naive, d / name)
            rows.append((f"dicts + json.dump {name[2:]}", dt, (d / name).stat().st_size, peak))
        try:
            import geojson

            def geojson_lib(path: Path) -> None:
                feats = [geojson.Feature(**f) for f in naive_features(table)]
                with open(path, "w", encoding="utf-8") as fh:
                    geojson.dump(geojson.FeatureCollection(feats), fh)

            dt = timed(geojson_lib, d / "c.geojson")
            rows.append(
                (
                    "geojson library dump .geojson",
                    dt,
                    (d / "c.geojson").stat().st_size,
                    float("nan"),
                )
            )
        except ImportError:
            pass
    scale = 100_000 / n
    print(f"{'writer':40s} {'nuclei/s':>10s} {'MB/100k':>9s} {'peak MiB':>9s}")
    for name, dt, size, peak in rows:
        print(f"{name:40s} {n / dt:10,.0f} {size * scale / 2**20:9.1f} {peak:9.1f}")


if __name__ == "__main__":
    main()
