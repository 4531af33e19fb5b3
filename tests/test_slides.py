"""Opening slides, um/px checks and reading regions at a target resolution."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage.transform import downscale_local_mean, resize

from conic_qp.errors import ConicQPError, MppError, cli_flag
from conic_qp.slides import ImageSource, SlideSource, open_slide
from tests.helpers_slides import smooth_image, write_pyramidal_tiff

FORMATS = {
    "aperio": {"aperio": True},
    "generic": {"aperio": False},
    "ome": {"ome": True},
}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return smooth_image(96, 128, seed=3)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_open_pyramidal_tiff_reads_metadata_and_exact_level0(
    tmp_path: Path, image: np.ndarray, fmt: str
) -> None:
    path = write_pyramidal_tiff(tmp_path / f"s_{fmt}.tif", image, 0.5, levels=3, **FORMATS[fmt])
    with open_slide(path) as slide:
        assert isinstance(slide, SlideSource)
        assert slide.name == path.name
        assert slide.dimensions == (128, 96)
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_mpps == pytest.approx((0.5, 1.0, 2.0))
        np.testing.assert_array_equal(slide.read((0, 0, 128, 96), 0.5), image)
        np.testing.assert_array_equal(slide.read((16, 8, 40, 30), 0.5), image[8:38, 16:56])


def test_read_chooses_the_coarsest_level_not_coarser_than_requested(tmp_path: Path) -> None:
    # Each level is a distinct flat colour, so the colour read tells which level was used.
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    levels = [np.full((64 >> k, 96 >> k, 3), c, np.uint8) for k, c in enumerate(colours)]
    path = write_pyramidal_tiff(tmp_path / "lv.svs", levels[0], 0.25, level_images=levels)
    with open_slide(path) as slide:
        for mpp, level in [(0.25, 0), (0.1, 0), (0.4, 0), (0.5, 1), (0.502, 1), (0.9, 1),
                           (1.0, 2), (3.0, 2)]:  # fmt: skip
            assert slide.best_level(mpp) == level
            out = slide.read((8, 8, 48, 40), mpp)
            expected_size = (round(40 * 0.25 / mpp), round(48 * 0.25 / mpp))
            assert out.shape == (*expected_size, 3)
            assert (out[1:-1, 1:-1] == colours[level]).all(), (mpp, out[2, 2])


@pytest.mark.parametrize("mpp", [1.0, 0.75, 1.6])
def test_read_at_coarser_mpp_matches_antialiased_ground_truth(
    tmp_path: Path, image: np.ndarray, mpp: float
) -> None:
    path = write_pyramidal_tiff(tmp_path / "s.svs", image, 0.5)
    with open_slide(path) as slide:
        out = slide.read((0, 0, 128, 96), mpp)
    shape = (round(96 * 0.5 / mpp), round(128 * 0.5 / mpp))
    assert out.shape == (*shape, 3) and out.dtype == np.uint8
    if mpp == 1.0:
        truth = downscale_local_mean(image.astype(float), (2, 2, 1))
    else:
        truth = resize(image.astype(float), shape, anti_aliasing=True, order=1)
    err = np.abs(out.astype(float) - truth)[2:-2, 2:-2]
    assert err.mean() < 2.0 and err.max() < 12


def test_fractional_region_and_explicit_size(tmp_path: Path, image: np.ndarray) -> None:
    path = write_pyramidal_tiff(tmp_path / "s.svs", image, 0.5)
    with open_slide(path) as slide:
        whole = slide.read((0, 0, 128, 96), 1.0).astype(float)
        # model pixel (y=10, x=20) at 1 um/px is level-0 (40, 20): a 2.004 scale needs floats
        part = slide.read((40.0, 20.0, 60.0, 40.0), 1.0, size=(30, 20)).astype(float)
        assert part.shape == (20, 30, 3)
        assert np.abs(part - whole[10:30, 20:50])[2:-2, 2:-2].mean() < 1.0
        odd = slide.read((0.4, 0.4, 61.2, 33.3), 0.5 * 1.02, size=(60, 33))
        assert odd.shape == (33, 60, 3)
        upsampled = slide.read((10, 10, 20, 20), 0.25)  # finer than level 0
        assert upsampled.shape == (40, 40, 3)
        assert np.abs(upsampled[::2, ::2].astype(float) - image[10:30, 10:30]).mean() < 3


def test_region_outside_the_slide_is_white(tmp_path: Path, image: np.ndarray) -> None:
    path = write_pyramidal_tiff(tmp_path / "s.svs", image, 0.5)
    with open_slide(path) as slide:
        out = slide.read((-20, 80, 40, 40), 0.5)
        assert out.shape == (40, 40, 3)
        assert (out[:, :20] == 255).all() and (out[16:, :] == 255).all()
        np.testing.assert_array_equal(out[:16, 20:], image[80:96, 0:20])
        assert (slide.read((500, 500, 10, 10), 1.0) == 255).all()
        with pytest.raises(ConicQPError, match="positive"):
            slide.read((0, 0, 0, 10), 0.5)


def test_thumbnail_size_and_downsample(tmp_path: Path, image: np.ndarray) -> None:
    path = write_pyramidal_tiff(tmp_path / "s.svs", image, 0.5, levels=3)
    with open_slide(path) as slide:
        thumb, ds = slide.thumbnail(32)
        assert ds == pytest.approx(4.0) and thumb.shape == (24, 32, 3)
        truth = downscale_local_mean(image.astype(float), (4, 4, 1))
        assert np.abs(thumb - truth).mean() < 2.0
        big, ds = slide.thumbnail(1000)  # never upsampled
        assert ds == 1.0 and big.shape == image.shape


def test_missing_mpp_needs_override(tmp_path: Path, image: np.ndarray) -> None:
    path = write_pyramidal_tiff(tmp_path / "nompp.svs", image, None)
    with pytest.raises(MppError, match=r"nompp\.svs has no um/px.*pass mpp") as info:
        open_slide(path)
    assert "pass --mpp with" in info.value.render(cli_flag)  # the CLI names its flag
    with open_slide(path, mpp=0.25) as slide:
        assert slide.mpp == 0.25
        assert slide.read((0, 0, 128, 96), 0.5).shape == (48, 64, 3)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_implausible_mpp_is_refused_unless_overridden(
    tmp_path: Path, image: np.ndarray, fmt: str
) -> None:
    path = write_pyramidal_tiff(tmp_path / f"bogus_{fmt}.tif", image, 1000.0, **FORMATS[fmt])
    with pytest.raises(ConicQPError, match=r"reports 1000 um/px, which is implausible.*pass mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5


def test_explicit_mpp_overrides_metadata_and_is_validated(
    tmp_path: Path, image: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_pyramidal_tiff(tmp_path / "s.svs", image, 0.5)
    with open_slide(path, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.level_mpps[1] == pytest.approx(0.5)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConicQPError, match=r"mpp .* is not a positive number"):
            open_slide(path, mpp=bad)
    for implausible in (5.0, 50.0, 1e-9):  # typos and unit mistakes are refused ...
        with pytest.raises(ConicQPError, match=r"outside the 0.1-2 um/px") as err:
            open_slide(path, mpp=implausible)
        assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="conic_qp.slides"):  # ... unless forced
        with open_slide(path, mpp=5.0, force_mpp=True) as slide:
            assert slide.mpp == 5.0
    assert "outside 0.1-2 um/px (forced)" in caplog.text


def test_plain_png_and_jpeg(tmp_path: Path, image: np.ndarray) -> None:
    png = tmp_path / "tile.png"
    Image.fromarray(image).save(png)
    with pytest.raises(ConicQPError, match=r"tile\.png has no um/px"):
        open_slide(png)
    with open_slide(png, mpp=0.5) as slide:
        assert isinstance(slide, ImageSource) and slide.level_mpps == (0.5,)
        np.testing.assert_array_equal(slide.read((0, 0, 128, 96), 0.5), image)
        assert slide.read((0, 0, 128, 96), 1.0).shape == (48, 64, 3)
    jpg = tmp_path / "tile.jpg"
    Image.fromarray(image).save(jpg, quality=95, dpi=(50800, 50800))  # 0.5 um/px
    with open_slide(jpg) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert np.abs(slide.read((0, 0, 128, 96), 0.5).astype(float) - image).mean() < 3
    default_dpi = tmp_path / "screen.png"
    Image.fromarray(image).save(default_dpi, dpi=(72, 72))
    with pytest.raises(ConicQPError, match="implausible"):
        open_slide(default_dpi)


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = (100, 50, 150)
    rgba[:, 16:, 3] = 255  # left half transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    write_pyramidal_tiff(tmp_path / "a.tif", rgba, 0.5, levels=1, aperio=False)
    for name in ("a.png", "a.tif"):
        with open_slide(tmp_path / name, mpp=0.5) as slide:
            out = slide.read((0, 0, 32, 32), 0.5)
            assert (out[:, :16] == 255).all()
            assert (out[:, 16:] == (100, 50, 150)).all()


def test_non_rgb_images_are_refused(tmp_path: Path) -> None:
    gray = np.full((32, 32), 100, np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    tifffile.imwrite(
        tmp_path / "fluo16.tif", np.zeros((3, 32, 32), np.uint16), photometric="minisblack"
    )
    tifffile.imwrite(tmp_path / "gray.tif", gray, resolution=(2e4, 2e4), resolutionunit=3)
    tifffile.imwrite(
        tmp_path / "two.tif", np.zeros((32, 32, 2), np.uint8), photometric="minisblack"
    )
    for name in ("gray.png", "fluo16.tif", "gray.tif", "two.tif"):
        with pytest.raises(ConicQPError, match="H&E RGB") as err:
            open_slide(tmp_path / name, mpp=0.5)
        assert name in str(err.value) and "\n" not in str(err.value)


def test_non_pyramidal_tiff_is_a_single_level_slide(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(2e4, 2e4), resolutionunit=3)
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.5) and slide.level_mpps == pytest.approx((0.5,))
        np.testing.assert_array_equal(slide.read((0, 0, 128, 96), 0.5), image)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_tiff_fails_with_one_line_naming_the_file(
    tmp_path: Path, image: np.ndarray, keep: float
) -> None:
    good = write_pyramidal_tiff(tmp_path / "good.svs", image, 0.5)
    data = good.read_bytes()
    bad = tmp_path / "cut.svs"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ConicQPError) as err:
        with open_slide(bad) as slide:
            slide.read((0, 0, 128, 96), 0.5)
    msg = str(err.value)
    assert "cut.svs" in msg and "\n" not in msg and ("truncated" in msg or "corrupt" in msg)


def test_random_bytes_missing_file_and_folder(tmp_path: Path) -> None:
    junk = tmp_path / "junk.svs"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ConicQPError, match=r"cannot read .*junk\.svs"):
        open_slide(junk)
    tiff_header_junk = tmp_path / "hdr.tif"
    tiff_header_junk.write_bytes(b"II*\x00" + np.random.default_rng(1).bytes(2000))
    with pytest.raises(ConicQPError, match=r"hdr\.tif"):
        open_slide(tiff_header_junk)
    with pytest.raises(ConicQPError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(ConicQPError, match="folder"):
        open_slide(tmp_path)


def test_dicom_without_reader_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("conic_qp.readers.dicom.has_wsidicom", lambda: False)
    dcm = tmp_path / "slide.dcm"
    dcm.write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 64)
    with pytest.raises(ConicQPError, match="pip install wsidicom"):
        open_slide(dcm)


def test_closed_slide_cannot_be_read(tmp_path: Path, image: np.ndarray) -> None:
    path = write_pyramidal_tiff(tmp_path / "s.svs", image, 0.5)
    slide = open_slide(path)
    slide.close()
    with pytest.raises(ConicQPError, match="closed"):
        slide.read((0, 0, 8, 8), 0.5)


# -- real slides ----------------------------------------------------------------------------


@pytest.mark.shared_data
def test_real_svs_cmu(shared_data: Path) -> None:
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        tile = slide.read((1000, 1000, 256 * 0.5 / 0.499, 256 * 0.5 / 0.499), 0.5, size=(256, 256))
        assert tile.shape == (256, 256, 3) and 50 < tile.mean() < 250
        thumb, ds = slide.thumbnail(256)
        assert max(thumb.shape[:2]) <= 256 and ds == pytest.approx(2967 / 256)


@pytest.mark.shared_data
def test_real_svs_without_mpp(shared_data: Path) -> None:
    path = shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(MppError, match=r"no um/px.*pass mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.25) as slide:
        assert slide.best_level(0.5) == 1  # the 2x level (JPEG 2000)
        assert slide.read((2000, 1500, 512, 512), 0.5).shape == (256, 256, 3)


@pytest.mark.shared_data
def test_real_tiff_with_bogus_mpp(shared_data: Path) -> None:
    path = shared_data / "slides" / "BRACS_1640_N_3_cropped.tiff"
    with pytest.raises(ConicQPError, match="reports 1000 um/px, which is implausible"):
        open_slide(path)
    with open_slide(path, mpp=0.25) as slide:
        assert slide.dimensions == (650, 743) and len(slide.level_mpps) == 3
        assert slide.read((0, 0, 650, 743), 1.0).shape == (186, 162, 3)


@pytest.mark.shared_data
def test_real_dicom_gives_a_clear_error(shared_data: Path) -> None:
    """wsidicom reads it; the file lacks ImageType, pixel spacing and frame positions."""
    pytest.importorskip("wsidicom")
    with pytest.raises(ConicQPError, match=r"no whole-slide image level.*re-export"):
        open_slide(shared_data / "slides" / "pathml_small_dicom_SM.dcm")
