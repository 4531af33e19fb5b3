"""DICOM (wsidicom) and OpenSlide readers: levels, exact pixels, um/px checks, clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conic_qp.errors import ConicQPError
from conic_qp.slides import TiffSlideSource
from tests.helpers_slides import smooth_image, write_pyramidal_tiff

wsidicom = pytest.importorskip("wsidicom")


def test_dicom_pyramid_opens_with_its_levels_and_exact_pixels(tmp_path: Path) -> None:
    from conic_qp.readers.dicom import DicomSource
    from tests.helpers_dicom import write_dicom_wsi

    image = smooth_image(200, 150)
    folder = write_dicom_wsi(tmp_path / "slide", image, mpp=0.25)
    with DicomSource(folder) as src:
        assert src.name == "slide" and src.dimensions == (150, 200) and src.mpp == 0.25
        # one file per level, halving down to a single 32 px tile
        assert len(list(folder.glob("*.dcm"))) == len(src.level_mpps) == 4
        assert src.level_mpps[:3] == pytest.approx((0.25, 0.5, 1.0), rel=0.03)
        assert np.array_equal(src.read((10, 20, 30, 40), 0.25), image[20:60, 10:40])
        # 0.5 um/px comes from wsidicom's level 1 (its own 2x2 downsample of level 0)
        assert src.best_level(0.5) == 1
        half = src.read((0, 0, 150, 200), 0.5).astype(float)
        mean = image[:200, :150].reshape(100, 2, 75, 2, 3).mean(axis=(1, 3))
        assert np.abs(half - mean).max() <= 2
        thumb, downsample = src.thumbnail(50)
        assert max(thumb.shape[:2]) <= 50 and downsample == pytest.approx(4.0)
    with pytest.raises(ConicQPError, match="closed"):
        src.read((0, 0, 4, 4), 0.25)


def test_dicom_um_px_checks_and_refusals(tmp_path: Path) -> None:
    from conic_qp.readers.dicom import DicomSource
    from tests.helpers_dicom import write_dicom_level

    image = smooth_image(64, 64)
    implausible = write_dicom_level(tmp_path / "a.dcm", image, mpp=5.0)
    with pytest.raises(ConicQPError, match="implausible"):
        DicomSource(implausible)
    with DicomSource(implausible, mpp=0.5) as src:  # an explicit um/px rescues it
        assert src.mpp == 0.5 and np.array_equal(src.read((0, 0, 64, 64), 0.5), image)
    no_spacing = write_dicom_level(tmp_path / "b.dcm", image, mpp=None)
    with pytest.raises(ConicQPError, match="no pixel spacing"):
        DicomSource(no_spacing)
    no_type = write_dicom_level(tmp_path / "c.dcm", image, mpp=0.5, image_type=None)
    with pytest.raises(ConicQPError, match="no whole-slide image level"):
        DicomSource(no_type)
    gray = write_dicom_level(tmp_path / "d.dcm", image[..., 0], mpp=0.5)
    with pytest.raises(ConicQPError, match="RGB"):
        DicomSource(gray)


@pytest.mark.shared_data
def test_real_dicom_file_is_refused_in_one_line(shared_data: Path) -> None:
    """The shared DICOM lacks ImageType and pixel spacing (and frame positions): neither
    wsidicom nor OpenSlide can place its frames, so it is refused with the reason."""
    from conic_qp.readers.dicom import DicomSource

    with pytest.raises(ConicQPError) as info:
        DicomSource(shared_data / "slides" / "pathml_small_dicom_SM.dcm")
    message = str(info.value)
    assert "\n" not in message and "no whole-slide image level" in message
    assert "re-export" in message


openslide = pytest.importorskip("openslide")


def test_openslide_reads_an_aperio_svs_exactly_like_tiffslide(tmp_path: Path) -> None:
    from conic_qp.readers.openslide import OpenSlideSource, openslide_format

    image = smooth_image(200, 240)
    path = write_pyramidal_tiff(tmp_path / "s.svs", image, mpp=0.25, levels=3, tile=16)
    assert openslide_format(path) == "aperio"
    assert openslide_format(tmp_path / "missing.svs") is None
    with OpenSlideSource(path) as osl, TiffSlideSource(path) as ts:
        assert osl.vendor == "aperio" and osl.mpp == ts.mpp == 0.25
        assert osl._level_dims == ts._level_dims
        for level in range(3):
            a = osl._read_level(level, 3, 5, 40, 30)
            assert np.array_equal(a, ts._read_level(level, 3, 5, 40, 30)), level
        region = (10.5, 20.25, 100.0, 80.0)
        assert np.array_equal(osl.read(region, 0.5), ts.read(region, 0.5))
        assert np.array_equal(osl.read((-8, -8, 16, 16), 0.25)[:8, :8], np.full((8, 8, 3), 255))


def test_openslide_um_px_and_broken_files(tmp_path: Path) -> None:
    from conic_qp.readers.openslide import OpenSlideSource

    image = smooth_image(64, 64)
    nompp = write_pyramidal_tiff(tmp_path / "n.svs", image, mpp=None, levels=1)
    with pytest.raises(ConicQPError, match="no um/px"):
        OpenSlideSource(nompp)
    with OpenSlideSource(nompp, mpp=0.5) as src:
        assert src.mpp == 0.5
    broken = tmp_path / "b.mrxs"
    broken.write_text("[GENERAL]\nSLIDE_VERSION = 1.0\n")
    with pytest.raises(ConicQPError, match="OpenSlide cannot open it"):
        OpenSlideSource(broken)
