"""Write tiny DICOM whole-slide images for tests (pydicom for the base level, wsidicom for the
pyramid), so the DICOM reader is tested on files made the way DICOM WSI writers make them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"


def write_dicom_level(
    path: str | Path,
    image: np.ndarray,
    mpp: float | None,
    tile: int = 32,
    *,
    image_type: str | None = "VOLUME",
) -> Path:
    """One VL Whole Slide Microscopy instance, TILED_FULL, uncompressed; ``image`` (H, W, 3)
    uint8 RGB or (H, W) uint8 grayscale; ``mpp=None`` writes no pixel spacing."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    rgb = image.ndim == 3
    h, w = image.shape[:2]
    rows, cols = -(-h // tile), -(-w // tile)
    shape = (rows * cols, tile, tile, 3) if rgb else (rows * cols, tile, tile)
    frames = np.full(shape, 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            part = image[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
            frames[r * cols + c, : part.shape[0], : part.shape[1]] = part
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VL_WSI
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = VL_WSI, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "SM"
    if image_type is not None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "NONE"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = tile, tile, rows * cols
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = Sequence([optical])
    if mpp is not None:
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w * mpp / 1000, h * mpp / 1000
        ds.ImagedVolumeDepth = 0.001
        measures = Dataset()
        measures.PixelSpacing = [mpp / 1000, mpp / 1000]
        measures.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_wsi(folder: str | Path, image: np.ndarray, mpp: float, tile: int = 32) -> Path:
    """A pyramidal DICOM WSI folder: the base level from pydicom, its pyramid saved by wsidicom
    (``add_missing_levels``: one file per level, as scanners and converters write them)."""
    from wsidicom import WsiDicom

    folder = Path(folder)
    base = folder.parent / f".{folder.name}.base"
    base.mkdir(parents=True, exist_ok=True)
    write_dicom_level(base / "base.dcm", image, mpp, tile)
    folder.mkdir(parents=True, exist_ok=True)
    with WsiDicom.open(base / "base.dcm") as wsi:
        wsi.save(folder, add_missing_levels=True)
    for f in base.iterdir():
        f.unlink()
    base.rmdir()
    return folder
