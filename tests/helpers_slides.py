"""Write tiny pyramidal TIFF slides for tests (Aperio SVS-like, generic, or OME-TIFF).

Tests write their own slides instead of relying on real data: a few kB, any resolution, any
content, with or without um/px metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Halve ``image`` ``levels - 1`` times with 2x2 box averaging (sizes rounded up)."""
    out = [np.ascontiguousarray(image)]
    for _ in range(levels - 1):
        out.append(np.asarray(Image.fromarray(out[-1]).reduce(2)))
    return out


def write_pyramidal_tiff(
    path: str | Path,
    image: np.ndarray,
    mpp: float | None,
    levels: int = 3,
    aperio: bool = True,
    *,
    ome: bool = False,
    compression: str = "zlib",
    tile: int = 16,
    level_images: Sequence[np.ndarray] | None = None,
) -> Path:
    """Write ``image`` as a tiled pyramidal TIFF and return its path.

    Parameters
    ----------
    image : (H, W, 3) uint8 level 0 (or any array the format allows, to test rejections).
    mpp : level-0 um/px stored in the metadata; None writes no resolution at all.
    levels : pyramid levels, each half the size of the previous one.
    aperio : SVS layout (baseline, thumbnail, levels as pages) with an Aperio ImageDescription
        ``... |MPP = x``; otherwise levels are SubIFDs with TIFF resolution tags (generic TIFF).
    ome : write OME-TIFF (PhysicalSizeX/Y) instead; overrides ``aperio``.
    compression : "zlib" (lossless, exact comparisons) or "jpeg".
    level_images : explicit images per level (to make levels distinguishable in tests).
    """
    path = Path(path)
    images = list(level_images) if level_images is not None else pyramid(image, levels)
    photometric = "rgb" if images[0].ndim == 3 and images[0].shape[-1] in (3, 4) else None
    extra = (
        {"extrasamples": ["unassalpha"]} if images[0].ndim == 3 and images[0].shape[-1] == 4 else {}
    )
    common = dict(tile=(tile, tile), compression=compression, photometric=photometric, **extra)
    if ome:
        meta: dict[str, object] = {"axes": "YXS" if images[0].ndim == 3 else "YX"}
        if mpp is not None:
            meta.update(
                PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm"
            )
        with tifffile.TiffWriter(path, ome=True) as tw:
            tw.write(images[0], subifds=len(images) - 1, metadata=meta, **common)
            for level in images[1:]:
                tw.write(level, subfiletype=1, metadata=None, **common)
        return path
    if aperio:
        h, w = images[0].shape[:2]
        desc = f"Aperio Image Library v12.0.15 \r\n{w}x{h} ({tile}x{tile}) {compression}/RGB"
        desc += "|AppMag = 20" + (f"|MPP = {mpp}" if mpp is not None else "")
        with tifffile.TiffWriter(path) as tw:
            tw.write(images[0], description=desc, metadata=None, **common)
            thumb = images[-1]
            tw.write(
                thumb,
                photometric=photometric,
                compression=compression,
                metadata=None,
                description="Aperio Image Library thumbnail",
                **extra,
            )
            for level in images[1:]:
                tw.write(level, metadata=None, **common)
        return path
    res: dict[str, object] = {}
    if mpp is not None:
        res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(images[0], subifds=len(images) - 1, metadata=None, **res, **common)
        for level in images[1:]:
            tw.write(level, subfiletype=1, metadata=None, **res, **common)
    return path


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image: resampling errors on it are small, so tolerances are tight."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    noise = rng.random((height, width, 3))
    smooth = ndi.gaussian_filter(noise, sigma=(6, 6, 0))
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return np.round(smooth * 235 + 10).astype(np.uint8)
