"""Classes 8, 9 and 10 of the data-safety issue: implausible values, OS errors on outputs, and
messages that say in the user's terms what is wrong and what to do (no tracebacks)."""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import tifffile
from click.testing import CliRunner
from PIL import Image

from conic_qp.classes import CONIC
from conic_qp.cli import main
from conic_qp.errors import ConicQPError, OutputError, describe_os_error
from conic_qp.qupath.project import read_project, write_project
from conic_qp.sinks import atomic_path, write_json_atomic
from conic_qp.sinks.geojson import read_regions
from conic_qp.sinks.tables import read_table, write_table
from conic_qp.slides import check_mpp, open_slide
from tests.helpers_slides import write_pyramidal_tiff

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(res: object) -> str:
    """The single error line of a CLI result (and nothing that looks like a traceback)."""
    output = res.output  # type: ignore[attr-defined]
    assert "Traceback" not in output, output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]  # type: ignore[attr-defined]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr  # type: ignore[attr-defined]
    return errors[0]


# ------------------------------------------------------------------------ class 8: plausibility


def test_implausible_mpp_is_refused_unless_forced(tmp_path: Path) -> None:
    png = tmp_path / "tile.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    for typo in (50.0, 5.0, 0.05, 1e-9, 1e9):
        with pytest.raises(ConicQPError, match=r"outside the 0.1-2 um/px") as err:
            open_slide(png, mpp=typo)
        assert "0.25 for 40x" in str(err.value)
        with pytest.raises(ConicQPError):
            check_mpp(typo)
    for nonsense in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ConicQPError, match="not a positive number"):
            check_mpp(nonsense, force=True)
    assert check_mpp(0.5) == 0.5 and check_mpp(50.0, force=True) == 50.0
    with open_slide(png, mpp=50.0, force_mpp=True) as slide:
        assert slide.mpp == 50.0


def test_reads_check_memory_before_allocating(tmp_path: Path) -> None:
    """--mpp 1e-9 (forced) makes one model tile 2.6e11 level-0 px wide: refused, not a crash."""
    png = tmp_path / "tile.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(png)
    with open_slide(png, mpp=1e-9, force_mpp=True) as slide:
        side = 512 * 0.5 / 1e-9
        with pytest.raises(ConicQPError, match=r"needs .* of memory, more than the .* available"):
            slide.read((0, 0, side, side), 0.5, size=(512, 512))
        assert slide.read((0, 0, 64, 64), 1e-9).shape == (64, 64, 3)  # sane reads still work


def _png_declaring(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\xff" * 3 * 4)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def _patch_tiff(src: Path, dst: Path, **tags: int) -> Path:
    """Copy a TIFF, overwriting the values of some (inline, 4-byte) tags."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tf:
        for tag in tf.pages[0].tags.values():
            if tag.name in tags:
                fmt = "<I" if tag.dtype == 4 else "<H"
                data[tag.valueoffset : tag.valueoffset + struct.calcsize(fmt)] = struct.pack(
                    fmt, tags[tag.name]
                )
    dst.write_bytes(bytes(data))
    return dst


def test_absurd_declared_sizes_are_refused_with_one_line(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    res = {"resolution": (20000, 20000), "resolutionunit": "CENTIMETER"}  # 0.5 um/px
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, rgb, photometric="rgb", **res)  # one uncompressed strip
    huge = {"ImageWidth": 200000, "ImageLength": 200000, "RowsPerStrip": 200000}
    with pytest.raises(ConicQPError, match=r"declares 200000 x 200000 px \(120 GB of pixels\) but "
                       r"holds only 12.3 kB") as err:  # fmt: skip
        open_slide(_patch_tiff(plain, tmp_path / "huge.tif", **huge))
    assert "cannot be reshaped" not in str(err.value)
    packed = tmp_path / "packed.tif"
    tifffile.imwrite(packed, rgb, photometric="rgb", compression="zlib", rowsperstrip=64, **res)
    with pytest.raises(ConicQPError, match="in blocks of 120 GB that are decoded whole"):
        open_slide(_patch_tiff(packed, tmp_path / "huge-z.tif", **huge))
    with pytest.raises(ConicQPError, match=r"declares an image of more than .* convert it"):
        open_slide(_png_declaring(tmp_path / "huge.png", 200000, 200000), mpp=0.5)


# ------------------------------------------------------------------ class 10: unreadable slides


@pytest.fixture
def svs(tmp_path: Path) -> Path:
    image = np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    return write_pyramidal_tiff(tmp_path / "ok.svs", image, 0.5)


def test_unreadable_slides_say_what_the_file_is(tmp_path: Path, svs: Path) -> None:
    data = svs.read_bytes()
    cases = {
        "cut.svs": (data[: len(data) // 3], "is an incomplete copy"),
        "cut-header.svs": (data[:100], "is an incomplete copy (truncated at 100 bytes"),
        "cut-magic.svs": (data[:6], "is an incomplete copy (truncated at 6 bytes)"),
        "zero.tif": (b"", "is an empty file (0 bytes)"),
        "notes.tif": (b"scanner export log\nslide 3 failed\n", "is not an image but text"),
        "page.svs": (b"<!DOCTYPE html><html>403 Forbidden</html>", "is not an image but an HTML"),
        "random.tif": (bytes(range(256)) * 4, "not an image format conic-qp reads"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ConicQPError) as err:
            open_slide(path, mpp=0.5)
        text = str(err.value)
        assert message in text, text
        assert "out of range" not in text and "\n" not in text and str(path) in text
        assert "again" in text or "convert" in text  # says what to do


# -------------------------------------------------------------- class 9: OS errors on outputs


def test_os_errors_read_as_path_cause_and_next_step(tmp_path: Path) -> None:
    import errno

    target = tmp_path / "out" / "a.csv"
    cases = {
        errno.ENOSPC: "the disk is full; free some space",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied; fix the folder's permissions",
        errno.EISDIR: "it is a folder; give a file name",
        errno.ENOENT: "its folder does not exist; create the folder first",
    }
    for code, expected in cases.items():
        exc = OutputError.from_os_error(OSError(code, os.strerror(code)), target)
        assert str(exc) == f"cannot write {target}: {expected}" + str(exc).split(expected)[1]
        assert exc.path == str(target) and exc.exit_code == 1
    neutral = describe_os_error(FileNotFoundError(2, "No such file", str(target)))
    assert neutral == f"{target}: no such file or folder; check the path"


def test_atomic_writes_turn_os_errors_into_output_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="a part of the path is a file") as err:
        write_json_atomic(blocker / "sub" / "a.json", {})
    assert err.value.path == str(blocker / "sub" / "a.json")
    folder = tmp_path / "adir"
    folder.mkdir()
    with pytest.raises(OutputError, match=f"cannot write {folder}: it is a folder"):
        write_json_atomic(folder, {})
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "adir",
        "file",
    ]  # no temporary file left behind
    with pytest.raises(FileNotFoundError):  # errors about other files pass through unchanged
        with atomic_path(tmp_path / "b.json"):
            (tmp_path / "missing-input").read_text()


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    pred = tmp_path / "pred"
    pred.mkdir()
    table = pd.DataFrame(
        {
            "id": ["n0", "n1"],
            "centroid_x": [10.0, 20.0],
            "centroid_y": [10.0, 20.0],
            "class_name": [CONIC.names[0], CONIC.names[1]],
            "polygon_wkb": [shapely.to_wkb(shapely.box(8, 8, 12, 12))] * 2,
        }
    )
    for stem in ("a", "b"):
        write_table(table, pred / f"{stem}.nuclei.parquet", classes=CONIC, mpp=0.5)
    return pred


def test_cli_output_errors_are_one_line(tmp_path: Path, cohort: Path) -> None:
    runner = CliRunner()
    missing = tmp_path / "no-such-folder" / "run.log"
    res = runner.invoke(main, ["--log-file", str(missing), "composition", str(cohort), "-o",
                               str(tmp_path / "c.csv")])  # fmt: skip
    assert res.exit_code == 1
    line = _one_line_error(res)
    assert str(missing) in line and "folder does not exist" in line
    out_dir = tmp_path / "exists.csv"
    out_dir.mkdir()
    res = runner.invoke(main, ["composition", str(cohort), "-o", str(out_dir)])
    assert res.exit_code == 1
    line = _one_line_error(res)
    assert f"cannot write {out_dir}: it is a folder" in line


def test_cli_disk_full_is_one_line(tmp_path: Path, cohort: Path) -> None:
    """A write that the file system refuses half-way (here: a file-size limit, as a full disk
    would) ends with one line naming the file, and no half-written result."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    out = tmp_path / "c.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "conic_qp.cli", "composition", str(cohort), "-o", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=limit,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"cannot write {out}" in errors[0], proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_nan_coordinates_name_the_file_and_feature(tmp_path: Path, cohort: Path) -> None:
    good = [[0, 0], [10, 0], [10, 10], [0, 0]]
    bad = [[0, 0], [float("nan"), 0], [10, 10], [0, 0]]
    fc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [good]},
             "properties": {"objectType": "annotation"}},
            {"type": "Feature", "id": "tumour-1", "geometry": {"type": "Polygon",
             "coordinates": [bad]}, "properties": {"objectType": "annotation", "name": "T1"}},
        ],
    }  # fmt: skip
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(fc))  # json writes NaN, as some tools do
    with pytest.raises(ConicQPError) as err:
        read_regions(path)
    text = str(err.value)
    assert str(path) in text and "feature 1 (name 'T1', id 'tumour-1')" in text
    assert "not a number (nan, 0)" in text
    # the same through the CLI: one line, no GEOSException traceback
    regions = tmp_path / "regions"
    regions.mkdir()
    (regions / "a.geojson").write_text(json.dumps(fc))
    res = CliRunner().invoke(
        main, ["composition", str(cohort), "--regions-geojson", str(regions), "-o",
               str(tmp_path / "c.csv")],
    )  # fmt: skip
    assert res.exit_code == 2
    line = _one_line_error(res)
    assert str(regions / "a.geojson") in line and "feature 1 (name 'T1'" in line


def test_truncated_tables_say_rerun_predict(tmp_path: Path, cohort: Path) -> None:
    table = cohort / "b.nuclei.parquet"
    data = table.read_bytes()
    table.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConicQPError, match=r"is incomplete .*footer is missing.*re-run `conic-qp "
                       r"predict` for that slide"):  # fmt: skip
        read_table(table)
    res = CliRunner().invoke(main, ["composition", str(cohort), "-o", str(tmp_path / "c.csv")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "magic bytes" not in res.output and "re-run `conic-qp predict`" in res.output
    table.write_bytes(b"")
    with pytest.raises(ConicQPError, match="is an empty file"):
        read_table(table)
    table.write_text("id,class\n1,2\n")
    with pytest.raises(ConicQPError, match=r"is text .* not a Parquet table"):
        read_table(table)


# ---------------------------------------------------------------- class 10: QuPath projects


def test_damaged_projects_give_the_next_step(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    file = write_project(tmp_path / "p", [image, image])
    raw = json.loads(file.read_text())
    text = file.read_text().replace('"imageName": "a.png"', '"imageName": "caf\\u00e9"', 1)
    file.write_bytes(text.encode().replace(b"caf\\u00e9", b"caf\xe9"))  # Latin-1 byte
    with pytest.raises(ConicQPError, match=r"is not UTF-8 text \(byte 0xe9") as err:
        read_project(file)
    assert "restore project.qpproj.backup" in str(err.value)
    assert "codec" not in str(err.value)
    dup = dict(raw, images=[raw["images"][0], dict(raw["images"][1], entryID=1)])
    file.write_text(json.dumps(dup))
    with pytest.raises(ConicQPError, match="entries 1 and 2 share entryID 1") as err:
        read_project(file)
    assert "unused id above lastID" in str(err.value) and "text editor" in str(err.value)
    file.write_text(json.dumps(dict(raw, images=[raw["images"][0], "image 2"])))
    with pytest.raises(ConicQPError, match="entry 2 of 2 is a str, not an object") as err:
        read_project(file)
    assert "restore project.qpproj.backup" in str(err.value)
