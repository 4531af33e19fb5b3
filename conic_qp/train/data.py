"""Training data readers: every source becomes one in-memory :class:`LabelledSet`.

Sources differ in layout, resolution and class list; training wants fixed-size tiles at the
model's um/px with class ids of the model's scheme. So every reader does the same four steps:
read and check the files, map classes (optionally to another scheme, with ``"ignore"``),
resample to ``target_mpp`` (images anti-aliased, label maps nearest-neighbour so instance ids
survive unchanged), and cut tiles of ``tile_size`` (optional; images smaller than the tile size
are padded with white glass and background labels, see :func:`retile`). All problems are
reported as one-line :class:`~conic_qp.errors.ConicQPError` before any training starts.

Label conventions: instance maps hold 0 for background and arbitrary positive ids (the source's
ids are kept, so they can be traced back); class maps hold 0 for background, 1..C for nuclei and
:data:`IGNORE` (-1) for nucleus pixels whose class is unknown or deliberately not learned. A set
without any class labels (e.g. MoNuSeg) has ``class_maps = None``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from skimage.transform import downscale_local_mean, resize

from conic_qp.classes import CONIC, CONSEP, ClassScheme
from conic_qp.errors import ConicQPError
from conic_qp.inputs import load_npy, load_pickled_arrays, read_json

logger = logging.getLogger(__name__)

#: Class-map value of pixels the semantic loss must skip.
IGNORE = -1

#: NuCLS classes as shipped in the "Example-Segmentation" sample (type_map 1, 2).
NUCLS = ClassScheme.from_names("nucls", ["non-tumour", "tumour"])

#: CoNSeP -> CoNIC: inflammatory cannot be resolved into the four CoNIC immune classes.
CONSEP_TO_CONIC: dict[int | str, int | str | None] = {
    "other": "ignore",
    "inflammatory": "ignore",
    "epithelial": "epithelial",
    "spindle": "connective",
}

#: NuCLS -> CoNIC: tumour nuclei are epithelial; non-tumour is a mix of CoNIC classes.
NUCLS_TO_CONIC: dict[int | str, int | str | None] = {"non-tumour": "ignore", "tumour": "epithelial"}

META_COLUMNS = ("name", "source", "split", "centre")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass
class LabelledSet:
    """Tiles of one (or several concatenated) data sets, in one resolution and class scheme.

    Attributes
    ----------
    images : (N, H, W, 3) uint8 RGB (a read-only memmap for CoNIC ``images.npy``).
    inst_maps : (N, H, W) int32 instance ids, 0 background.
    class_maps : (N, H, W) int32 class ids (0 background, 1..C, :data:`IGNORE`), or None when the
        set has no class labels at all.
    meta : one row per tile with at least ``name`` (unique), ``source`` (source image),
        ``split`` (official split or "") and ``centre`` (centre/sub-dataset or "").
    scheme : the class scheme of ``class_maps`` (None when unlabelled).
    mpp : um/px of the tiles.
    """

    images: np.ndarray
    inst_maps: np.ndarray
    class_maps: np.ndarray | None
    meta: pd.DataFrame
    scheme: ClassScheme | None
    mpp: float
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ConicQPError(
                f"images must be (N, H, W, 3) uint8 RGB, got {self.images.shape} "
                f"{self.images.dtype}; convert the images to 8-bit RGB"
            )
        if self.inst_maps.shape != self.images.shape[:3]:
            raise ConicQPError(
                f"instance maps {self.inst_maps.shape} do not match images {self.images.shape[:3]}"
                "; every image needs a label map of its size"
            )
        if self.class_maps is not None and self.class_maps.shape != self.inst_maps.shape:
            raise ConicQPError(
                f"class maps {self.class_maps.shape} do not match instance maps "
                f"{self.inst_maps.shape}"
            )
        if len(self.meta) != n:
            raise ConicQPError(f"metadata has {len(self.meta)} rows for {n} tiles")
        missing = [c for c in META_COLUMNS if c not in self.meta.columns]
        if missing:
            raise ConicQPError(f"tile metadata lacks columns {missing}")
        if self.mpp <= 0:
            raise ConicQPError(f"um/px must be positive, got {self.mpp}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labelled(self) -> bool:
        """Whether the set carries class labels (some tiles may still be all IGNORE)."""
        return self.class_maps is not None

    @property
    def tile_shape(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledSet:
        """Tiles ``indices`` (copies the arrays; for memmapped sets index lazily instead)."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            images=self.images[idx],
            inst_maps=self.inst_maps[idx],
            class_maps=None if self.class_maps is None else self.class_maps[idx],
            meta=self.meta.iloc[idx].reset_index(drop=True),
        )


# --------------------------------------------------------------------------- class handling


def scheme_from_json(data: Mapping[str, Any], name: str = "custom") -> ClassScheme:
    """A scheme from ``classes.json``: ``{"classes": {"1": "name", ...}}`` or ClassScheme JSON.

    Known schemes (CoNIC, CoNSeP) keep their predefined colours when the names match.
    """
    classes = data.get("classes")
    if isinstance(classes, Mapping):
        try:
            pairs = sorted((int(k), str(v)) for k, v in classes.items() if int(k) != 0)
        except ValueError as exc:
            raise ConicQPError(f"class ids in classes.json must be integers ({exc})") from exc
        ids = [i for i, _ in pairs]
        if ids != list(range(1, len(ids) + 1)):
            raise ConicQPError(f"class ids in classes.json are {ids}; they must be 1..C")
        names = [n for _, n in pairs]
        for known in (CONIC, CONSEP, NUCLS):
            if known.names == names:
                return known
        return ClassScheme.from_names(name, names)
    return ClassScheme.from_json(data)


def class_lut(
    source: ClassScheme,
    target: ClassScheme,
    mapping: Mapping[int | str, int | str | None],
) -> np.ndarray:
    """Lookup table ``lut[source_id] -> target id`` (``lut[0] = 0``; "ignore"/None -> -1).

    Every source class must be mapped explicitly, so that no class is dropped by accident.
    Keys are source ids or names, values target ids, names, ``"ignore"`` or None.
    """
    lut = np.zeros(source.n_classes + 1, dtype=np.int32)
    seen: set[int] = set()
    for key, value in mapping.items():
        src = source.by_name(key).id if isinstance(key, str) else source.by_id(int(key)).id
        if value is None or (isinstance(value, str) and value.lower() == "ignore"):
            dst = IGNORE
        elif isinstance(value, str):
            dst = target.by_name(value).id
        else:
            dst = target.by_id(int(value)).id
        lut[src] = dst
        seen.add(src)
    unmapped = [c.name for c in source if c.id not in seen]
    if unmapped:
        raise ConicQPError(
            f"classes {unmapped} of scheme {source.name!r} have no mapping to {target.name!r}; "
            "map each to a target class or to 'ignore'"
        )
    return lut


def apply_lut(class_map: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map class ids through ``lut``, leaving IGNORE pixels as they are."""
    out = lut[np.clip(class_map, 0, None)]
    return np.where(class_map < 0, IGNORE, out).astype(np.int32)


def map_classes(
    data: LabelledSet, mapping: Mapping[int | str, int | str | None], target: ClassScheme
) -> LabelledSet:
    """The set with its class maps translated to ``target`` (see :func:`class_lut`)."""
    if data.class_maps is None or data.scheme is None:
        raise ConicQPError("cannot map classes of a set without class labels; drop the mapping")
    lut = class_lut(data.scheme, target, mapping)
    return replace(data, class_maps=apply_lut(data.class_maps, lut), scheme=target)


# --------------------------------------------------------------------------- resampling, tiling


def resample_labelled(
    image: np.ndarray,
    inst_map: np.ndarray,
    class_map: np.ndarray | None,
    factor: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Resize one image and its label maps by ``factor`` (= source um/px / target um/px).

    The image is block-averaged or interpolated with anti-aliasing when shrinking; label maps use
    nearest-neighbour on the same output grid, so every output pixel carries an id and class from
    one source pixel: ids are unchanged (nuclei of about one output pixel or less may vanish).
    """
    h, w = inst_map.shape
    shape = (max(1, round(h * factor)), max(1, round(w * factor)))
    if shape == (h, w):
        return image, inst_map, class_map
    step = round(1 / factor)
    if factor < 1 and abs(1 / factor - step) < 1e-9 and h % step == 0 and w % step == 0:
        # Integer shrink (e.g. 40x -> 20x): the block mean is the exact box anti-aliasing filter,
        # on the same grid as the nearest-neighbour labels, and much faster than resize.
        img = downscale_local_mean(image, (step, step, 1))
    else:
        img = resize(image, (*shape, 3), order=1, anti_aliasing=factor < 1, preserve_range=True)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def nearest(lab: np.ndarray) -> np.ndarray:
        out = resize(lab, shape, order=0, anti_aliasing=False, preserve_range=True)
        return np.rint(out).astype(np.int32)

    return img, nearest(inst_map), None if class_map is None else nearest(class_map)


def tile_origins(length: int, size: int, stride: int) -> list[int]:
    """Tile starts along one axis: every ``stride``, plus one flush with the end; [0] if short."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def _pad_to(arr: np.ndarray, size: int, value: int) -> np.ndarray:
    ph, pw = max(0, size - arr.shape[0]), max(0, size - arr.shape[1])
    if ph == 0 and pw == 0:
        return arr
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, pad, constant_values=value)


@dataclass
class _Item:
    """One source image with its labels before stacking (shapes may differ between items)."""

    name: str
    source: str
    split: str
    centre: str
    image: np.ndarray
    inst: np.ndarray
    cls: np.ndarray | None
    y0: int = 0
    x0: int = 0


def _cut(item: _Item, size: int, stride: int) -> list[_Item]:
    out = []
    h, w = item.inst.shape
    for y in tile_origins(h, size, stride):
        for x in tile_origins(w, size, stride):
            sl = (slice(y, y + size), slice(x, x + size))
            out.append(
                _Item(
                    f"{item.name}@{item.y0 + y},{item.x0 + x}",
                    item.source,
                    item.split,
                    item.centre,
                    _pad_to(item.image[sl], size, 255),
                    _pad_to(item.inst[sl], size, 0),
                    None if item.cls is None else _pad_to(item.cls[sl], size, 0),
                    item.y0 + y,
                    item.x0 + x,
                )
            )
    return out


def _items_of(data: LabelledSet) -> Iterable[_Item]:
    for i in range(len(data)):
        row = data.meta.iloc[i]
        yield _Item(
            str(row["name"]),
            str(row["source"]),
            str(row["split"]),
            str(row["centre"]),
            np.asarray(data.images[i]),
            np.asarray(data.inst_maps[i]),
            None if data.class_maps is None else np.asarray(data.class_maps[i]),
            int(row["y0"]) if "y0" in row else 0,
            int(row["x0"]) if "x0" in row else 0,
        )


def _stack(
    items: Sequence[_Item], scheme: ClassScheme | None, mpp: float, what: str
) -> LabelledSet:
    if not items:
        raise ConicQPError(f"{what}: no tiles found; check the folder and the split filter")
    shapes = {it.inst.shape for it in items}
    if len(shapes) > 1:
        raise ConicQPError(
            f"{what}: images have different sizes {sorted(shapes)[:4]}; pass tile_size to cut "
            "them into tiles of one size"
        )
    labelled = [it.cls is not None for it in items]
    if any(labelled) and not all(labelled):
        raise ConicQPError(f"{what}: some tiles have class labels and others not")
    meta = pd.DataFrame(
        {
            "name": [it.name for it in items],
            "source": [it.source for it in items],
            "split": [it.split for it in items],
            "centre": [it.centre for it in items],
            "y0": [it.y0 for it in items],
            "x0": [it.x0 for it in items],
        }
    )
    if meta["name"].duplicated().any():
        dup = meta.loc[meta["name"].duplicated(), "name"].iloc[0]
        raise ConicQPError(f"{what}: tile name {dup!r} occurs twice; tile names must be unique")
    return LabelledSet(
        images=np.stack([it.image for it in items]),
        inst_maps=np.stack([it.inst for it in items]).astype(np.int32, copy=False),
        class_maps=np.stack([it.cls for it in items]).astype(np.int32, copy=False)  # type: ignore[misc]
        if all(labelled)
        else None,
        meta=meta,
        scheme=scheme if all(labelled) else None,
        mpp=mpp,
    )


def _finish(
    items: Iterable[_Item],
    *,
    scheme: ClassScheme | None,
    mpp: float,
    what: str,
    class_mapping: Mapping[int | str, int | str | None] | None,
    target_scheme: ClassScheme | None,
    target_mpp: float | None,
    tile_size: int | None,
    stride: int | None,
) -> LabelledSet:
    """Map classes, resample and cut every item, then stack them into a set."""
    lut = None
    if class_mapping is not None:
        if scheme is None:
            raise ConicQPError(f"{what}: has no class labels, so a class mapping cannot apply")
        if target_scheme is None:
            raise ConicQPError(f"{what}: a class mapping needs the target class scheme")
        lut = class_lut(scheme, target_scheme, class_mapping)
        scheme = target_scheme
    factor = 1.0 if target_mpp is None else mpp / target_mpp
    if tile_size is not None and tile_size < 1:
        raise ConicQPError(f"tile_size must be positive, got {tile_size}")
    out: list[_Item] = []
    for it in items:
        if lut is not None and it.cls is not None:
            it.cls = apply_lut(it.cls, lut)
        if factor != 1.0:
            it.image, it.inst, it.cls = resample_labelled(it.image, it.inst, it.cls, factor)
        if tile_size is not None:
            out.extend(_cut(it, tile_size, stride or tile_size))
        else:
            out.append(it)
    return _stack(out, scheme, mpp if target_mpp is None else target_mpp, what)


def resample(data: LabelledSet, target_mpp: float) -> LabelledSet:
    """The set at ``target_mpp`` (see :func:`resample_labelled`)."""
    if target_mpp <= 0:
        raise ConicQPError(f"target um/px must be positive, got {target_mpp}")
    return _finish(
        _items_of(data),
        scheme=data.scheme,
        mpp=data.mpp,
        what="resample",
        class_mapping=None,
        target_scheme=None,
        target_mpp=target_mpp,
        tile_size=None,
        stride=None,
    )


def retile(data: LabelledSet, size: int = 256, stride: int | None = None) -> LabelledSet:
    """Cut every tile into ``size`` x ``size`` tiles every ``stride`` px (default: ``size``).

    The last tile of a row/column is placed flush with the image edge (so tiles may overlap a
    little instead of being padded). Images smaller than ``size`` are padded at the bottom/right
    with white (255) pixels, background instance id 0 and class 0, like glass around tissue.
    Tile names become ``"<name>@<y>,<x>"``; ``meta`` columns ``y0``/``x0`` hold the offsets.
    """
    return _finish(
        _items_of(data),
        scheme=data.scheme,
        mpp=data.mpp,
        what="retile",
        class_mapping=None,
        target_scheme=None,
        target_mpp=None,
        tile_size=size,
        stride=stride,
    )


def concat_sets(sets: Sequence[LabelledSet]) -> LabelledSet:
    """Concatenate sets of one tile size and um/px; unlabelled sets get all-IGNORE nuclei."""
    if not sets:
        raise ConicQPError("no data sets to concatenate")
    mpps = {round(s.mpp, 6) for s in sets}
    shapes = {s.tile_shape for s in sets}
    if len(mpps) > 1 or len(shapes) > 1:
        raise ConicQPError(
            f"data sets differ in um/px {sorted(mpps)} or tile size {sorted(shapes)}; "
            "read them with the same target_mpp and tile_size"
        )
    schemes = {s.scheme for s in sets if s.scheme is not None}
    if len(schemes) > 1:
        raise ConicQPError(
            f"data sets use different class schemes {[s.name for s in schemes]}; "
            "map them to one scheme with class_mapping"
        )
    scheme = next(iter(schemes), None)
    class_maps = None
    if scheme is not None:
        class_maps = np.concatenate(
            [
                s.class_maps
                if s.class_maps is not None
                else np.where(s.inst_maps > 0, IGNORE, 0).astype(np.int32)
                for s in sets
            ]
        )
    meta = pd.concat([s.meta for s in sets], ignore_index=True)
    if meta["name"].duplicated().any():
        raise ConicQPError("tile names repeat across the data sets; give each set distinct names")
    return LabelledSet(
        images=np.concatenate([np.asarray(s.images) for s in sets]),
        inst_maps=np.concatenate([s.inst_maps for s in sets]),
        class_maps=class_maps,
        meta=meta,
        scheme=scheme,
        mpp=sets[0].mpp,
    )


# --------------------------------------------------------------------------- file helpers


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConicQPError(f"{what} not found: {path}; check the data folder")
    return path


def _check_image(arr: np.ndarray, path: Path) -> np.ndarray:
    opaque_rgba = arr.ndim == 3 and arr.shape[-1] == 4 and arr.dtype == np.uint8
    if opaque_rgba and (arr[..., 3] == 255).all():
        arr = arr[..., :3]
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ConicQPError(
            f"{path} is not an 8-bit RGB image (shape {arr.shape}, {arr.dtype}); convert it to "
            "8-bit RGB"
        )
    return arr


def read_image(path: Path) -> np.ndarray:
    """An 8-bit RGB image file as (H, W, 3) uint8 (PNG/JPEG via Pillow, TIFF via tifffile)."""
    _require(path, "image")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except ConicQPError:
        raise
    except Exception as exc:
        raise ConicQPError(f"cannot read image {path} ({exc}); is it a valid image file?") from exc
    return _check_image(arr, path)


def read_label_image(path: Path) -> np.ndarray:
    """An instance map file (16/32-bit PNG, TIFF or .npy) as (H, W) int32."""
    _require(path, "instance map")
    try:
        if path.suffix.lower() == ".npy":
            arr = load_npy(path, "instance map")
        elif path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im)
    except ConicQPError:
        raise
    except Exception as exc:
        raise ConicQPError(f"cannot read instance map {path} ({exc})") from exc
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or (arr.size and arr.min() < 0):
        raise ConicQPError(
            f"instance map {path} must be a 2-D non-negative integer image, got shape "
            f"{arr.shape} {arr.dtype}"
        )
    return arr.astype(np.int32)


def _load_mat(path: Path) -> dict[str, Any]:
    import scipy.io

    _require(path, "label .mat file")
    try:
        return dict(scipy.io.loadmat(path))
    except Exception as exc:
        raise ConicQPError(f"cannot read {path} ({exc}); is it a MATLAB .mat file?") from exc


def instance_class_map(
    inst: np.ndarray, ids: np.ndarray, classes: np.ndarray, n_classes: int, where: str
) -> np.ndarray:
    """Class map from per-instance classes: instance ``ids[i]`` has class ``classes[i]``."""
    ids = np.asarray(ids).ravel().astype(np.int64)
    classes = np.asarray(classes).ravel().astype(np.int64)
    if ids.shape != classes.shape:
        raise ConicQPError(f"{where}: {ids.size} instance ids but {classes.size} classes")
    bad = classes[(classes < 1) | (classes > n_classes)]
    if bad.size:
        raise ConicQPError(
            f"{where}: class id {int(bad[0])} is outside the class list 1..{n_classes}; fix the "
            "labels or the class list"
        )
    top = int(max(inst.max(initial=0), ids.max(initial=0)))
    lut = np.full(top + 1, -2, dtype=np.int64)
    lut[0] = 0
    lut[ids] = classes
    present = np.unique(inst)
    orphans = present[lut[present] == -2]
    if orphans.size:
        raise ConicQPError(
            f"{where}: instance {int(orphans[0])} in the instance map has no class entry"
        )
    return lut[inst].astype(np.int32)


def _check_class_range(cls: np.ndarray, n_classes: int, where: str) -> None:
    lo, hi = int(cls.min(initial=0)), int(cls.max(initial=0))
    if lo < IGNORE or hi > n_classes:
        bad = hi if hi > n_classes else lo
        raise ConicQPError(
            f"{where}: class id {bad} is outside the class list 0..{n_classes}; fix the labels "
            "or the class list"
        )


# --------------------------------------------------------------------------- CoNIC patches


def read_conic(
    folder: str | Path,
    *,
    scheme: ClassScheme = CONIC,
    mpp: float = 0.5,
    class_mapping: Mapping[int | str, int | str | None] | None = None,
    target_scheme: ClassScheme | None = None,
    target_mpp: float | None = None,
    chunk: int = 256,
) -> LabelledSet:
    """The CoNIC 2022 patches: ``images.npy``, ``labels.npy``, ``patch_info.csv``, ``counts.csv``.

    ``images.npy`` is memory-mapped (1 GB for the 4981 patches); ``labels.npy`` is converted to
    int32 instance and class maps in chunks. Tile names come from ``patch_info.csv`` (column
    ``patch_info``, e.g. ``consep_1-0000``): source image = text before the last dash, centre =
    text before the first underscore (consep, crag, dpath, glas, pannuke).
    """
    folder = Path(folder)
    _require(folder, "CoNIC folder")
    images = load_npy(_require(folder / "images.npy", "images.npy"), "CoNIC images", mmap_mode="r")
    labels = load_npy(_require(folder / "labels.npy", "labels.npy"), "CoNIC labels", mmap_mode="r")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ConicQPError(
            f"{folder / 'images.npy'} must be (N, H, W, 3) uint8 RGB, got {images.shape} "
            f"{images.dtype}"
        )
    if labels.ndim != 4 or labels.shape[-1] != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ConicQPError(
            f"{folder / 'labels.npy'} must be (N, H, W, 2) integers (instance ids, class ids), "
            f"got {labels.shape} {labels.dtype}"
        )
    if labels.shape[:3] != images.shape[:3]:
        raise ConicQPError(
            f"images.npy {images.shape[:3]} and labels.npy {labels.shape[:3]} differ in count or "
            "size; they must describe the same patches"
        )
    n = len(images)
    if n == 0:
        raise ConicQPError(f"{folder / 'images.npy'} holds no patches")
    inst = np.empty(labels.shape[:3], np.int32)
    cls = np.empty(labels.shape[:3], np.int32)
    for s in range(0, n, chunk):
        block = np.asarray(labels[s : s + chunk])
        inst[s : s + chunk] = block[..., 0]
        cls[s : s + chunk] = block[..., 1]
        _check_class_range(cls[s : s + chunk], scheme.n_classes, str(folder / "labels.npy"))
    if inst.min() < 0:
        raise ConicQPError(f"{folder / 'labels.npy'} has negative instance ids")

    info_path = folder / "patch_info.csv"
    if info_path.exists():
        info = pd.read_csv(info_path)
        if "patch_info" not in info.columns or len(info) != n:
            raise ConicQPError(
                f"{info_path} must have a 'patch_info' column with {n} rows, got columns "
                f"{list(info.columns)} and {len(info)} rows"
            )
        names = info["patch_info"].astype(str).tolist()
    else:
        logger.warning("%s missing; tiles get generic names and no source/centre", info_path)
        names = [f"patch_{i:05d}" for i in range(n)]
    counts_path = folder / "counts.csv"
    if counts_path.exists():
        n_counts = len(pd.read_csv(counts_path))
        if n_counts != n:
            raise ConicQPError(f"{counts_path} has {n_counts} rows for {n} patches")
    has_info = info_path.exists()
    meta = pd.DataFrame(
        {
            "name": names,
            "source": [nm.rsplit("-", 1)[0] if has_info else nm for nm in names],
            "split": [""] * n,
            "centre": [nm.split("_", 1)[0] if has_info else "" for nm in names],
        }
    )
    data = LabelledSet(images, inst, cls, meta, scheme, mpp)
    if class_mapping is not None:
        if target_scheme is None:
            raise ConicQPError("a class mapping needs the target class scheme")
        data = map_classes(data, class_mapping, target_scheme)
    if target_mpp is not None and abs(target_mpp - mpp) > 1e-9:
        data = resample(data, target_mpp)
    return data


def save_conic_patches(
    folder: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str] | None = None,
    class_names: Sequence[str] = tuple(CONIC.names),
) -> Path:
    """Write patches in the CoNIC layout (e.g. synthetic data for examples and tests).

    ``counts.csv`` follows the CoNIC Task 2 rule: a nucleus counts when any of its pixels lies in
    the central 224 x 224 crop.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", np.ascontiguousarray(images, dtype=np.uint8))
    np.save(folder / "labels.npy", np.ascontiguousarray(labels))
    n, h, w = labels.shape[:3]
    names = list(names) if names is not None else [f"synthetic_{i}-{i:04d}" for i in range(n)]
    pd.DataFrame({"patch_info": names}).to_csv(folder / "patch_info.csv", index=False)
    mh, mw = max(0, (h - 224) // 2), max(0, (w - 224) // 2)
    rows = []
    for i in range(n):
        crop = labels[i, mh : h - mh, mw : w - mw]
        ids = np.unique(crop[..., 0])
        ids = ids[ids > 0]
        uniq, first = np.unique(labels[i, ..., 0], return_index=True)
        class_of = dict(zip(uniq.tolist(), labels[i, ..., 1].ravel()[first].tolist(), strict=True))
        row = [0] * len(class_names)
        for k in ids.tolist():
            c = class_of.get(k, 0)
            if 1 <= c <= len(class_names):
                row[c - 1] += 1
        rows.append(row)
    pd.DataFrame(rows, columns=list(class_names)).to_csv(folder / "counts.csv", index=False)
    return folder


# --------------------------------------------------------------------------- Lizard


def read_lizard(
    folder: str | Path,
    *,
    mpp: float = 0.5,
    tile_size: int | None = 256,
    stride: int | None = None,
    class_mapping: Mapping[int | str, int | str | None] | None = None,
    target_scheme: ClassScheme | None = None,
    target_mpp: float | None = None,
) -> LabelledSet:
    """The Lizard data set: ``<name>.png`` images and ``Labels/<name>.mat`` anywhere below.

    Each .mat holds ``inst_map`` and per-instance ``id`` and ``class`` (instance ``id[i]`` has
    class ``class[i]``, CoNIC ids). Lizard images differ in size, so they are cut into
    ``tile_size`` tiles by default. The centre is the name's prefix (``crag_12`` -> ``crag``).
    """
    folder = Path(folder)
    _require(folder, "Lizard folder")
    mats = sorted(p for p in folder.rglob("*.mat") if p.parent.name.lower() == "labels")
    if not mats:
        raise ConicQPError(f"no Labels/*.mat files under {folder}; is this the Lizard folder?")
    pngs = {p.stem: p for p in folder.rglob("*.png") if p.parent.name.lower() != "labels"}

    def items() -> Iterable[_Item]:
        for mat in mats:
            name = mat.stem
            if name not in pngs:
                raise ConicQPError(f"Lizard image {name}.png for {mat} not found under {folder}")
            image = read_image(pngs[name])
            m = _load_mat(mat)
            for key in ("inst_map", "id", "class"):
                if key not in m:
                    raise ConicQPError(f"{mat} lacks '{key}'; expected Lizard label fields")
            inst = np.asarray(m["inst_map"])
            if inst.shape != image.shape[:2]:
                raise ConicQPError(
                    f"{mat}: inst_map {inst.shape} does not match image {image.shape[:2]}"
                )
            inst = inst.astype(np.int32)
            cls = instance_class_map(inst, m["id"], m["class"], CONIC.n_classes, str(mat))
            yield _Item(name, name, "", name.split("_", 1)[0], image, inst, cls)

    return _finish(
        items(),
        scheme=CONIC,
        mpp=mpp,
        what=str(folder),
        class_mapping=class_mapping,
        target_scheme=target_scheme,
        target_mpp=target_mpp,
        tile_size=tile_size,
        stride=stride,
    )


# --------------------------------------------------------------------------- tile folders


def read_tile_folder(
    folder: str | Path,
    *,
    mpp: float | None = None,
    scheme: ClassScheme | None = None,
    split: str | None = None,
    centre: str | None = None,
    class_mapping: Mapping[int | str, int | str | None] | None = None,
    target_scheme: ClassScheme | None = None,
    target_mpp: float | None = None,
    tile_size: int | None = None,
    stride: int | None = None,
    image_dir: str = "images",
    inst_dir: str = "inst_png",
    type_dir: str = "type_mat",
    whole_images: bool = False,
) -> LabelledSet:
    """Tiles as files: ``images/[<split>/]<tile>.{png,jpg,tif}`` + ``inst_png/...png`` (+ classes).

    Per-instance classes come from ``type_mat/<same path>.mat`` (``inst_type`` N x 1: instance
    k has class ``inst_type[k-1]``); without a ``type_mat`` folder the set is unlabelled
    (``class_maps`` None). ``classes.json`` gives ``mpp`` and ``classes`` (id -> name);
    ``mpp``/``scheme`` arguments override it. ``patch_info.csv`` (``tile``, ``source_image``,
    ``split``) supplies sources and official splits; otherwise the split is the first sub-folder.

    Parameters
    ----------
    split : read only the tiles of this split (e.g. "train").
    centre : centre name recorded for every tile (for hold-out-a-centre splits).
    whole_images : reassemble the tiles of each source image into one image first (needs
        ``orig_instance_ids.json``: for every tile, the source image's nucleus id of each of its
        instance ids; see :func:`locate_tiles`). Nuclei cut by tile borders become whole again,
        and ``tile_size``/``stride`` can then cut the images anew.
    """
    folder = Path(folder)
    _require(folder, "tile folder")
    img_root = _require(folder / image_dir, f"image folder '{image_dir}'")
    inst_root = _require(folder / inst_dir, f"instance map folder '{inst_dir}'")
    type_root = folder / type_dir
    labelled = type_root.is_dir()
    declared: dict[str, Any] = {}
    if (folder / "classes.json").exists():
        declared = read_json(folder / "classes.json", "data set classes", "fix or delete it")
        if not isinstance(declared, dict):
            raise ConicQPError(f"{folder / 'classes.json'} must hold a JSON object; fix it")
    if mpp is None:
        if "mpp" not in declared:
            raise ConicQPError(
                f"{folder} declares no um/px (classes.json 'mpp'); pass mpp for these images"
            )
        mpp = float(declared["mpp"])
    if labelled and scheme is None:
        if "classes" not in declared:
            raise ConicQPError(
                f"{folder} has per-instance classes but no class list (classes.json 'classes'); "
                "pass the class scheme"
            )
        scheme = scheme_from_json(declared, name=folder.name)
    if not labelled:
        scheme = None

    files = sorted(
        p for p in img_root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )
    if not files:
        raise ConicQPError(f"no images (png/jpg/tif) under {img_root}")
    info = None
    if (folder / "patch_info.csv").exists():
        info = pd.read_csv(folder / "patch_info.csv").astype(str)
        if "tile" not in info.columns:
            raise ConicQPError(f"{folder / 'patch_info.csv'} needs a 'tile' column")
        info = info.set_index("tile")

    records = []
    for p in files:
        rel = p.relative_to(img_root).with_suffix("")
        name = rel.as_posix()
        tile_split = rel.parts[0] if len(rel.parts) > 1 else ""
        source = name
        if info is not None and name in info.index:
            row = info.loc[name]
            source = str(row.get("source_image", name))
            tile_split = str(row.get("split", tile_split))
        if split is not None and tile_split != split:
            continue
        records.append((p, rel, name, source, tile_split))
    if not records:
        raise ConicQPError(
            f"no tiles of split {split!r} under {img_root}; check the split name"
            if split is not None
            else f"no tiles under {img_root}"
        )

    def find_inst(rel: Path) -> Path:
        for suffix in (".png", ".tif", ".tiff", ".npy"):
            cand = inst_root / rel.with_suffix(suffix)
            if cand.exists():
                return cand
        raise ConicQPError(f"instance map for tile {rel.as_posix()} not found in {inst_root}")

    orig_ids: dict[str, list[int]] = {}
    if whole_images:
        ids_path = _require(folder / ORIG_IDS_FILE, f"{ORIG_IDS_FILE} (needed for whole images)")
        orig_ids = read_json(ids_path, ORIG_IDS_FILE, "restore it from the data set's release")

    def tiles() -> Iterable[_Item]:
        for p, rel, name, source, tile_split in records:
            image = read_image(p)
            inst = read_label_image(find_inst(rel))
            if inst.shape != image.shape[:2]:
                raise ConicQPError(
                    f"tile {name}: instance map {inst.shape} does not match image {image.shape[:2]}"
                )
            cls = None
            if scheme is not None:
                mat_path = type_root / rel.with_suffix(".mat")
                if not mat_path.exists():
                    raise ConicQPError(f"class file for tile {name} not found: {mat_path}")
                m = _load_mat(mat_path)
                if "inst_type" not in m:
                    raise ConicQPError(f"{mat_path} lacks 'inst_type' (per-instance classes)")
                types = np.asarray(m["inst_type"]).ravel()
                ids = np.arange(1, types.size + 1)
                cls = instance_class_map(inst, ids, types, scheme.n_classes, str(mat_path))
            yield _Item(name, source, tile_split, centre or "", image, inst, cls)

    def items() -> Iterable[_Item]:
        if not whole_images:
            yield from tiles()
            return
        by_source: dict[str, list[_Item]] = {}
        for it in tiles():
            by_source.setdefault(it.source, []).append(it)
        for source, group in by_source.items():
            image, inst, cls = _assemble(
                [(it.name, it.image, it.inst, it.cls) for it in group], orig_ids, source
            )
            yield _Item(source, source, group[0].split, centre or "", image, inst, cls)

    return _finish(
        items(),
        scheme=scheme,
        mpp=mpp,
        what=str(folder),
        class_mapping=class_mapping,
        target_scheme=target_scheme,
        target_mpp=target_mpp,
        tile_size=tile_size,
        stride=stride,
    )


# --------------------------------------------------------------------------- whole images

#: File of a tile folder mapping every tile's instance ids to its source image's nucleus ids.
ORIG_IDS_FILE = "orig_instance_ids.json"


def _seam_votes(a: np.ndarray, b: np.ndarray, along: int) -> Counter[tuple[int, int]]:
    """Votes for ``b`` touching ``a`` on the right (``along`` = 1) or below (0), aligned.

    Tiles cut on a grid that touch without overlapping share a row (or column) of tiles. A
    nucleus cut by their seam carries the same id in a's last and b's first pixel line at some
    common positions; each such nucleus is one vote.
    """
    if a.shape[1 - along] != b.shape[1 - along]:
        return Counter()
    ea = a[:, -1] if along == 1 else a[-1, :]
    eb = b[:, 0] if along == 1 else b[0, :]
    same = (ea > 0) & (ea == eb)
    n = int(np.unique(ea[same]).size)
    offset = (0, a.shape[1]) if along == 1 else (a.shape[0], 0)
    return Counter({offset: n}) if n else Counter()


def _overlap_votes(a: np.ndarray, b: np.ndarray) -> Counter[tuple[int, int]]:
    """Offsets of ``b`` relative to ``a`` where their overlap agrees pixel for pixel.

    Candidates come from the bounding boxes of nuclei seen in both tiles (one box side is uncut
    in at least one of them); a candidate counts only if no overlapping pixel disagrees, and is
    voted by the nuclei the overlap shows.
    """
    common = np.intersect1d(np.unique(a), np.unique(b))
    common = common[common > 0]
    cands: set[tuple[int, int]] = set()
    for k in common:
        ya, xa = np.nonzero(a == k)
        yb, xb = np.nonzero(b == k)
        for dy in {int(ya.min() - yb.min()), int(ya.max() - yb.max())}:
            for dx in {int(xa.min() - xb.min()), int(xa.max() - xb.max())}:
                cands.add((dy, dx))
    votes: Counter[tuple[int, int]] = Counter()
    for dy, dx in cands:
        y0, y1 = max(0, dy), min(a.shape[0], dy + b.shape[0])
        x0, x1 = max(0, dx), min(a.shape[1], dx + b.shape[1])
        if y1 <= y0 or x1 <= x0:
            continue
        oa, ob = a[y0:y1, x0:x1], b[y0 - dy : y1 - dy, x0 - dx : x1 - dx]
        if np.array_equal(oa, ob) and oa.any():
            votes[(dy, dx)] = int(np.unique(oa[oa > 0]).size)
    return votes


def _image_costs(a: np.ndarray, b: np.ndarray, along: int, max_overlap: int) -> tuple[float, int]:
    """How well image ``b`` continues ``a`` to the right (``along`` = 1) or below (0), aligned.

    Cost of the best overlap width ``w`` (0: the tiles touch): the mean absolute difference of
    the ``w`` shared pixel lines (w > 0) or of the two lines facing each other across the seam
    (w = 0), over the mean difference of neighbouring lines inside the tiles. Tiles cut from one
    image score below 1 when they overlap (the same pixels, up to JPEG noise) and about 1 when
    they touch; unrelated tiles score well above 1.
    """
    if along == 0:
        a, b = a.transpose(1, 0, 2), b.transpose(1, 0, 2)
    if a.shape[0] != b.shape[0]:
        return math.inf, 0
    a, b = a.astype(np.float32), b.astype(np.float32)
    inner = 0.5 * (
        float(np.abs(a[:, -1] - a[:, -2]).mean()) + float(np.abs(b[:, 1] - b[:, 0]).mean())
    )
    inner = max(inner, 1.0)
    best = (float(np.abs(a[:, -1] - b[:, 0]).mean()) / inner, 0)
    # w = 1 compares the same two lines as a seam; from 2 on an overlap means shared pixels
    for w in range(2, min(max_overlap, a.shape[1], b.shape[1]) + 1):
        cost = float(np.abs(a[:, -w:] - b[:, :w]).mean()) / inner
        best = min(best, (cost, w))
    return best


def _buddy_edges(
    images: Sequence[np.ndarray], max_overlap: int
) -> list[tuple[float, int, int, tuple[int, int]]]:
    """Image-based placements of tile pairs that choose each other ("best buddies").

    For every tile side the best-continuing other tile is found; a pair becomes an edge only when
    each is the other's best match on the facing sides (the jigsaw-solver criterion that keeps
    look-alike background tiles from being chained at random).
    """
    n = len(images)
    edges = []
    for along in (0, 1):
        cost = np.full((n, n), math.inf)
        width = np.zeros((n, n), dtype=np.int64)
        for i in range(n):
            for j in range(n):
                if i != j:
                    cost[i, j], width[i, j] = _image_costs(images[i], images[j], along, max_overlap)
        for i in range(n):
            j = int(np.argmin(cost[i]))
            if math.isfinite(cost[i, j]) and int(np.argmin(cost[:, j])) == i:
                size = images[i].shape[along]
                step = size - int(width[i, j])
                offset = (0, step) if along == 1 else (step, 0)
                # below any label evidence (>= 1 nucleus); better matches first
                edges.append((0.5 / (1.0 + float(cost[i, j])), i, j, offset))
    return edges


def locate_tiles(
    maps: Sequence[np.ndarray],
    images: Sequence[np.ndarray] | None = None,
    max_overlap: int = 64,
) -> np.ndarray:
    """Origins (y, x) of the tiles of one image, from instance maps with image-wide nucleus ids.

    Tiles that overlap must agree pixel for pixel there; tiles that only touch (a grid without
    overlap) are placed side by side, aligned, when their seam cuts nuclei (the same id on both
    sides of it). Tiles without such evidence (sparse tissue) are placed by their ``images``:
    pairs of tiles that continue each other best across a seam or an overlap of at most
    ``max_overlap`` px. The placement is a maximum spanning tree of these pairwise offsets
    (label evidence first, weighted by the nuclei supporting it), so tile order, size and stride
    need not be known.

    Returns
    -------
    (n, 2) int64 origins, the smallest being 0 on each axis.

    Raises
    ------
    ConicQPError : some tile cannot be related to the others.
    """
    n = len(maps)
    edges: list[tuple[float, int, int, tuple[int, int]]] = []
    for i in range(n):
        for j in range(i + 1, n):
            a, b = maps[i], maps[j]
            votes = _overlap_votes(a, b)
            for along in (0, 1):
                votes.update(_seam_votes(a, b, along))
                votes.update({(-dy, -dx): v for (dy, dx), v in _seam_votes(b, a, along).items()})
            if votes:
                offset, weight = votes.most_common(1)[0]
                edges.append((float(weight), i, j, offset))
    if images is not None:
        edges += _buddy_edges(images, max_overlap)
    origin: dict[int, tuple[int, int]] = {0: (0, 0)}
    edges.sort(key=lambda e: -e[0])
    while len(origin) < n:
        for _, i, j, (dy, dx) in edges:
            if (i in origin) != (j in origin):
                if i in origin:
                    origin[j] = (origin[i][0] + dy, origin[i][1] + dx)
                else:
                    origin[i] = (origin[j][0] - dy, origin[j][1] - dx)
                break
        else:
            raise ConicQPError(
                f"{n - len(origin)} of {n} tiles cannot be related to the others (no shared "
                "nucleus, no matching edge); they cannot be placed in one image"
            )
    out = np.array([origin[i] for i in range(n)], dtype=np.int64)
    out -= out.min(axis=0)
    return out


def paste_tiles(
    tiles: Sequence[np.ndarray], origins: np.ndarray, what: str, check: bool = False
) -> np.ndarray:
    """One image from tiles at ``origins``; with ``check``, overlaps must agree and cover all."""
    h = int(max(o[0] + t.shape[0] for o, t in zip(origins, tiles, strict=True)))
    w = int(max(o[1] + t.shape[1] for o, t in zip(origins, tiles, strict=True)))
    out = np.zeros((h, w, *tiles[0].shape[2:]), dtype=tiles[0].dtype)
    seen = np.zeros((h, w), dtype=bool)
    for (y, x), t in zip(origins, tiles, strict=True):
        sl = (slice(int(y), int(y) + t.shape[0]), slice(int(x), int(x) + t.shape[1]))
        if check and not np.array_equal(out[sl][seen[sl]], t[seen[sl]]):
            raise ConicQPError(f"{what}: overlapping tiles disagree; they cannot be reassembled")
        out[sl] = np.where(seen[sl].reshape(seen[sl].shape + (1,) * (t.ndim - 2)), out[sl], t)
        seen[sl] = True
    if check and not seen.all():
        raise ConicQPError(f"{what}: the tiles leave holes; they do not form one image")
    return out


def _assemble(
    records: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]],
    orig_ids: Mapping[str, Sequence[int]],
    source: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Image, image-wide instance map and class map of one source from its tiles."""
    glob = []
    for name, _, inst, _ in records:
        if name not in orig_ids:
            raise ConicQPError(f"tile {name} is not in {ORIG_IDS_FILE}; it cannot be reassembled")
        lut = np.asarray([0, *orig_ids[name]], dtype=np.int64)
        if int(inst.max(initial=0)) >= lut.size:
            raise ConicQPError(
                f"tile {name} has instance id {int(inst.max())} but {ORIG_IDS_FILE} lists "
                f"{lut.size - 1}; the id file does not belong to these labels"
            )
        glob.append(lut[inst].astype(np.int32))
    origins = locate_tiles(glob, [r[1] for r in records])
    inst_img = paste_tiles(glob, origins, source, check=True)
    image = paste_tiles([r[1] for r in records], origins, source)
    cls_img = None
    if records[0][3] is not None:
        cls_img = paste_tiles([r[3] for r in records], origins, source)  # type: ignore[misc]
    return image, inst_img, cls_img


# --------------------------------------------------------------------------- NuCLS


def read_nucls(
    folder: str | Path,
    *,
    splits: Sequence[str] = ("train", "test"),
    mpp: float = 0.2,
    class_mapping: Mapping[int | str, int | str | None] | None = None,
    target_scheme: ClassScheme | None = None,
    target_mpp: float | None = None,
    tile_size: int | None = None,
    stride: int | None = None,
) -> LabelledSet:
    """NuCLS segmentation sample: ``<split>/images/<n>.png`` + ``<split>/labels/<n>.npy``.

    Each label file is a pickled dict with ``inst_map`` and ``type_map`` (1 non-tumour,
    2 tumour); scheme :data:`NUCLS`, 0.2 um/px. The folder may also be the parent of
    ``Example-Segmentation-Non-Squared``. The pickles are read with
    :func:`conic_qp.inputs.load_pickled_arrays`, which can only rebuild numpy arrays: a crafted
    label file cannot run code.
    """
    folder = Path(folder)
    _require(folder, "NuCLS folder")
    if not any((folder / s).is_dir() for s in splits):
        nested = folder / "Example-Segmentation-Non-Squared"
        if nested.is_dir():
            folder = nested
    if not any((folder / s).is_dir() for s in splits):
        raise ConicQPError(f"no {'/'.join(splits)} folders in {folder}; is this the NuCLS folder?")

    def items() -> Iterable[_Item]:
        for s in splits:
            img_dir = folder / s / "images"
            if not (folder / s).is_dir():
                continue
            for p in sorted(_require(img_dir, f"NuCLS {s} images").glob("*.png")):
                label_path = _require(folder / s / "labels" / f"{p.stem}.npy", "NuCLS label")
                lab = load_pickled_arrays(label_path, "NuCLS label file")
                if not (isinstance(lab, Mapping) and {"inst_map", "type_map"} <= set(lab)):
                    raise ConicQPError(
                        f"NuCLS label file {label_path} is not a dict with inst_map and type_map"
                    )
                inst, cls = np.asarray(lab["inst_map"]), np.asarray(lab["type_map"])
                image = read_image(p)
                if inst.shape != image.shape[:2] or cls.shape != inst.shape:
                    raise ConicQPError(f"{label_path}: label maps do not match image {p}")
                _check_class_range(cls, NUCLS.n_classes, str(label_path))
                name = f"{s}/{p.stem}"
                yield _Item(
                    name, name, s, "nucls", image, inst.astype(np.int32), cls.astype(np.int32)
                )

    return _finish(
        items(),
        scheme=NUCLS,
        mpp=mpp,
        what=str(folder),
        class_mapping=class_mapping,
        target_scheme=target_scheme,
        target_mpp=target_mpp,
        tile_size=tile_size,
        stride=stride,
    )


# --------------------------------------------------------------------------- splits


class Split(NamedTuple):
    """Tile indices of the training and validation parts (sorted, disjoint)."""

    train: np.ndarray
    val: np.ndarray


def _split(n: int, val_mask: np.ndarray, how: str) -> Split:
    val = np.flatnonzero(val_mask)
    train = np.flatnonzero(~val_mask)
    if val.size == 0 or train.size == 0:
        part = "validation" if val.size == 0 else "training"
        raise ConicQPError(f"split {how} leaves the {part} part empty ({n} tiles); change it")
    return Split(train, val)


def split_random(n: int, n_val: int, seed: int = 0) -> Split:
    """Random tile-level split (the paper: 4481 training / 500 validation tiles)."""
    if not 0 < n_val < n:
        raise ConicQPError(f"n_val must be between 1 and {n - 1} for {n} tiles, got {n_val}")
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return _split(n, mask, "random")


def split_by_source(sources: Sequence[str], val_fraction: float = 0.1, seed: int = 0) -> Split:
    """Whole source images go to validation until it holds ``val_fraction`` of the tiles.

    Tiles of one image never end up on both sides, so validation measures generalisation to
    new images rather than to neighbouring tiles.
    """
    if not 0 < val_fraction < 1:
        raise ConicQPError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    src = np.asarray(sources, dtype=object)
    uniq = np.array(sorted(set(src.tolist())), dtype=object)
    order = np.random.default_rng(seed).permutation(len(uniq))
    mask = np.zeros(len(src), bool)
    for i in order:
        if mask.sum() >= val_fraction * len(src):
            break
        mask |= src == uniq[i]
    return _split(len(src), mask, "by source image")


def split_by_centre(centres: Sequence[str], val_centres: str | Sequence[str]) -> Split:
    """Hold out whole centres (paper table V: train on the rest, validate on ``glas``)."""
    held = [val_centres] if isinstance(val_centres, str) else list(val_centres)
    arr = np.asarray(centres, dtype=object)
    known = sorted({str(c) for c in arr.tolist()})
    unknown = [c for c in held if c not in known]
    if unknown:
        raise ConicQPError(f"centre(s) {unknown} not in the data; centres are {known}")
    return _split(len(arr), np.isin(arr, held), f"holding out {held}")


def split_from_file(names: Sequence[str], path: str | Path) -> Split:
    """Validation tiles listed in a text file, one tile name per line (``#`` starts a comment)."""
    path = _require(Path(path), "split file")
    wanted = {line.split("#", 1)[0].strip() for line in path.read_text().splitlines()} - {""}
    arr = np.asarray(names, dtype=object)
    missing = sorted(wanted - {str(n) for n in arr.tolist()})
    if missing:
        raise ConicQPError(
            f"{len(missing)} tile name(s) in {path} are not in the data (e.g. {missing[0]!r})"
        )
    return _split(len(arr), np.isin(arr, list(wanted)), f"from {path.name}")


def split_official(splits: Sequence[str], train: str = "train") -> Split:
    """The data set's own split column: ``train`` tiles vs all others (e.g. CoNSeP test)."""
    arr = np.asarray(splits, dtype=object)
    if not any(str(s) for s in arr.tolist()):
        raise ConicQPError("the data has no official split; choose random, source or centre")
    return _split(len(arr), arr != train, "official")


def make_split(data: LabelledSet, how: str, n_val: int = 500, seed: int = 0) -> Split:
    """Split from a CLI-style spec: ``random``, ``source``, ``centre:<name>[,<name>]``,
    ``file:<path>`` or ``official``."""
    kind, _, arg = how.partition(":")
    meta = data.meta
    if kind == "random":
        return split_random(len(data), min(n_val, len(data) - 1), seed)
    if kind == "source":
        fraction = min(max(n_val, 1), len(data) - 1) / len(data)
        return split_by_source(meta["source"].tolist(), fraction, seed)
    if kind in ("centre", "center"):
        if not arg:
            raise ConicQPError("centre split needs a centre name, e.g. 'centre:glas'")
        return split_by_centre(meta["centre"].tolist(), arg.split(","))
    if kind == "file":
        return split_from_file(meta["name"].tolist(), arg)
    if kind == "official":
        return split_official(meta["split"].tolist())
    raise ConicQPError(
        f"unknown split {how!r}; use random, source, centre:<name>, file:<path> or official"
    )
