"""Tissue detection on thumbnails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conic_qp.tissue import has_tissue, mask_region, tissue_fraction, tissue_mask

PINK = (225, 140, 190)  # eosin-rich stroma
PURPLE = (120, 70, 150)  # haematoxylin-rich nuclei


def _thumbnail(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Glass with a tissue piece (with a lumen), a speck, black padding and grey dust."""
    rng = np.random.default_rng(seed)
    img = np.full((120, 160, 3), 242, np.float64) + rng.normal(0, 3, (120, 160, 3))
    yy, xx = np.indices((120, 160))
    piece = ((yy - 60) / 40) ** 2 + ((xx - 70) / 50) ** 2 <= 1
    lumen = ((yy - 60) / 8) ** 2 + ((xx - 70) / 10) ** 2 <= 1
    img[piece] = PINK
    img[piece & (rng.random((120, 160)) < 0.3)] = PURPLE
    img[lumen] = 245  # white lumen inside the tissue
    img[5:7, 150:152] = PURPLE  # 4 px speck
    img[:, :4] = 0  # black scanner padding
    img[100:110, 135:150] = 128  # grey dust / shadow
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    return img, piece  # the lumen is tissue for tiling purposes (filled)


def test_tissue_mask_finds_the_piece_fills_holes_and_drops_debris() -> None:
    img, truth = _thumbnail()
    mask = tissue_mask(img)
    assert mask.dtype == bool and mask.shape == truth.shape
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.97
    assert mask[60, 70]  # lumen filled
    assert not mask[5:7, 150:152].any()  # speck removed
    assert not mask[:, :4].any() and not mask[100:110, 135:150].any()  # black / grey
    unfilled = tissue_mask(img, fill_holes=False)
    assert not unfilled[60, 70]


def test_glass_only_has_no_tissue_and_all_tissue_is_not_split() -> None:
    rng = np.random.default_rng(1)
    glass = np.clip(240 + rng.normal(0, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert not has_tissue(tissue_mask(glass))
    tissue = np.empty((64, 64, 3), np.uint8)
    tissue[:] = PINK
    tissue[rng.random((64, 64)) < 0.5] = PURPLE
    mask = tissue_mask(tissue)
    assert has_tissue(mask) and mask.mean() > 0.99
    assert has_tissue(mask, min_fraction=0.5) and not has_tissue(mask[:0])


def test_tissue_mask_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="RGB"):
        tissue_mask(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="RGB"):
        tissue_mask(np.zeros((10, 10, 3), np.float32))


def test_tissue_fraction_maps_boxes_from_another_grid() -> None:
    mask = np.array(
        [
            [1, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 1],
        ],
        bool,
    )
    assert tissue_fraction(mask, (0, 0, 2, 2)) == 1.0
    assert tissue_fraction(mask, (0, 0, 4, 4)) == 5 / 16
    # a grid 10x finer: the box (0, 0, 20, 40) covers mask rows 0-1, columns 0-3
    assert tissue_fraction(mask, (0, 0, 20, 40), shape=(40, 40)) == 0.5
    # a 1-px box deep in the bottom-right cell still sees that cell
    assert tissue_fraction(mask, (35, 35, 36, 36), shape=(40, 40)) == 1.0
    with pytest.raises(ValueError, match="not inside"):
        tissue_fraction(mask, (0, 0, 5, 5))


def test_mask_region_crops_a_slide_mask_to_a_level0_region() -> None:
    mask = np.zeros((50, 80), bool)
    mask[10:20, 30:40] = True
    # downsample 16: level-0 region x 480..640, y 160..320 is mask [10:20, 30:40]
    crop = mask_region(mask, 16.0, (480, 160, 160, 160))
    assert crop.shape == (10, 10) and crop.all()
    # fractional edges round outwards
    crop = mask_region(mask, 16.0, (470, 150, 175, 175))
    assert crop.shape == (12, 12) and crop.sum() == 100
    # a region leaving the slide is clipped
    assert mask_region(mask, 16.0, (1200, 700, 500, 500)).shape == (7, 5)


@pytest.mark.shared_data
def test_tissue_on_a_real_slide_thumbnail(shared_data: Path) -> None:
    from conic_qp.slides import open_slide

    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        thumb, _ = slide.thumbnail(256)
    mask = tissue_mask(thumb)
    assert 0.2 < mask.mean() < 0.6
    brightness = thumb.mean(axis=-1)
    assert brightness[mask].mean() < brightness[~mask].mean() - 40
    assert (brightness[~mask] > 200).mean() > 0.9  # what is left out is mostly glass
