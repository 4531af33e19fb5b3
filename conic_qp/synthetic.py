"""Synthetic H&E-like images with exactly known nuclei, for tests and examples.

The images are not meant to fool a pathologist; they give every stage (targets, training, post-
processing, tiling, tissue detection) inputs whose ground truth is exact: nuclei never overlap
(touching is allowed and frequent), each instance has one class, and the classes differ in size,
shape and darkness the way the CoNIC classes do, so a network can learn them.

Rendering follows the Beer-Lambert stain model of :func:`skimage.color.hed2rgb`: hematoxylin and
eosin concentration maps are painted, blurred slightly, converted to RGB and given sensor noise.
Everything is drawn from one :class:`numpy.random.Generator`, so a seed fixes the output.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed2rgb

from conic_qp.errors import ConicQPError

logger = logging.getLogger(__name__)

SeedLike = int | np.random.SeedSequence | np.random.Generator | None

#: Edge of a CoNIC tile in micrometres (256 px at 0.5 um/px); densities are given per such area.
_TILE_UM = 128.0


@dataclass(frozen=True)
class NucleusArchetype:
    """Morphology and staining of one synthetic nucleus class (sizes in micrometres).

    ``lobes`` > 1 draws the nucleus as overlapping discs of radius ``major_um`` around its centre
    (segmented nuclei of granulocytes); otherwise it is an ellipse with semi-axes ``major_um`` and
    ``major_um * aspect``. ``hematoxylin`` is the stain concentration inside the nucleus (darkness),
    ``vesicular`` > 0 makes the centre paler than the rim (open chromatin).
    """

    name: str
    major_um: float
    aspect: float
    hematoxylin: float
    vesicular: float = 0.0
    lobes: int = 1
    halo_eosin: float = 0.0


#: One archetype per CoNIC class, in CoNIC id order (class ``c`` uses ``ARCHETYPES[(c - 1) % 6]``).
ARCHETYPES: tuple[NucleusArchetype, ...] = (
    NucleusArchetype("neutrophil", 1.5, 1.0, 0.11, lobes=3, halo_eosin=0.01),
    NucleusArchetype("epithelial", 5.5, 0.72, 0.05, vesicular=0.45),
    NucleusArchetype("lymphocyte", 2.8, 0.92, 0.14),
    NucleusArchetype("plasma", 3.2, 0.78, 0.10, vesicular=0.2, halo_eosin=0.008),
    NucleusArchetype("eosinophil", 1.9, 1.0, 0.09, lobes=2, halo_eosin=0.035),
    NucleusArchetype("connective", 7.0, 0.27, 0.09),
)

#: Default class frequencies for 6 classes: imbalanced like CoNIC, but every class occurs.
DEFAULT_CLASS_PROBS: tuple[float, ...] = (0.06, 0.34, 0.25, 0.1, 0.05, 0.2)


@dataclass(frozen=True)
class SyntheticTile:
    """A synthetic image and its exact labels.

    Attributes
    ----------
    image : (H, W, 3) uint8 RGB.
    inst_map : (H, W) int32, 0 background, instances 1..K (every id present).
    class_map : (H, W) int32, class id (1..C) of each nucleus pixel, 0 background.
    inst_classes : (K,) int32, class of instance ``k + 1``.
    tissue_mask : (H, W) bool, where tissue was painted (all True for tiles).
    mpp : um/px the nuclei sizes were drawn at.
    """

    image: np.ndarray
    inst_map: np.ndarray
    class_map: np.ndarray
    inst_classes: np.ndarray
    tissue_mask: np.ndarray
    mpp: float


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]
) -> np.ndarray:
    """Zero-mean, unit-std gaussian-filtered noise; coarse fields are drawn small and upsampled."""
    sig = np.broadcast_to(np.asarray(sigma, dtype=float), (2,))
    step = max(1, int(min(sig) // 3))
    small = (max(2, -(-shape[0] // step) + 1), max(2, -(-shape[1] // step) + 1))
    field = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32), sig / step)
    if step > 1:
        field = ndi.zoom(field, step, order=1)
    field = field[: shape[0], : shape[1]]
    return (field - field.mean()) / (field.std() + 1e-8)


def _nucleus_template(
    arch: NucleusArchetype, mpp: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean mask and normalised radius (0 centre .. 1 rim) of one nucleus, centred in its box."""
    scale = rng.uniform(0.85, 1.15) / mpp
    theta = rng.uniform(0, np.pi)
    if arch.lobes > 1:
        r = arch.major_um * scale
        offset = 1.05 * r
        phase = rng.uniform(0, 2 * np.pi)
        centres = [
            (
                offset
                * np.sin(phase + 2 * np.pi * k / arch.lobes)
                * (0.6 if arch.lobes == 2 else 1),
                offset * np.cos(phase + 2 * np.pi * k / arch.lobes),
            )
            for k in range(arch.lobes)
        ]
        half = int(np.ceil(offset + r * 1.2)) + 1
        yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
        rho = np.full(yy.shape, np.inf, dtype=np.float32)
        for cy, cx in centres:
            wobble = rng.uniform(0.9, 1.1)
            rho = np.minimum(rho, np.hypot(yy - cy, xx - cx) / (r * wobble))
        return rho <= 1.0, np.clip(rho, 0, 1)
    a = arch.major_um * scale
    b = max(a * arch.aspect * rng.uniform(0.9, 1.1), 1.2)
    half = int(np.ceil(a * 1.25)) + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    phi = np.arctan2(v / b, u / a)
    rho = np.hypot(u / a, v / b)
    # Low-order harmonics make outlines irregular without creating holes or separate pieces.
    edge = np.ones_like(rho)
    for k in (2, 3, 5):
        edge += rng.uniform(0, 0.06) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    rho = rho / edge
    return rho <= 1.0, np.clip(rho, 0, 1)


@dataclass
class _Canvas:
    inst: np.ndarray
    hema: np.ndarray
    eosin: np.ndarray
    grain: np.ndarray
    allowed: np.ndarray | None  # where nucleus centres may lie


def _place_nuclei(
    canvas: _Canvas,
    n_nuclei: int,
    class_probs: np.ndarray,
    mpp: float,
    rng: np.random.Generator,
    cluster_prob: float = 0.35,
    max_tries: int = 25,
) -> list[int]:
    """Paint up to ``n_nuclei`` non-overlapping nuclei into the canvas; return their classes."""
    h, w = canvas.inst.shape
    classes: list[int] = []
    centres: list[tuple[float, float, float]] = []  # y, x, radius in px
    min_area = max(6, round(3.0 / mpp**2))
    for _ in range(n_nuclei):
        cls = int(rng.choice(len(class_probs), p=class_probs)) + 1
        arch = ARCHETYPES[(cls - 1) % len(ARCHETYPES)]
        mask, rho = _nucleus_template(arch, mpp, rng)
        half = mask.shape[0] // 2
        radius = float(np.sqrt(mask.sum() / np.pi))
        for _try in range(max_tries):
            if centres and rng.random() < cluster_prob:
                py, px, pr = centres[int(rng.integers(len(centres)))]
                ang = rng.uniform(0, 2 * np.pi)
                d = (pr + radius) * rng.uniform(0.85, 1.05)
                cy, cx = round(py + d * np.sin(ang)), round(px + d * np.cos(ang))
            else:
                cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            if not (0 <= cy < h and 0 <= cx < w):
                continue
            if canvas.allowed is not None and not canvas.allowed[cy, cx]:
                continue
            y0, x0 = cy - half, cx - half
            ys, xs = max(0, y0), max(0, x0)
            ye, xe = min(h, y0 + mask.shape[0]), min(w, x0 + mask.shape[1])
            local = mask[ys - y0 : ye - y0, xs - x0 : xe - x0]
            box = canvas.inst[ys:ye, xs:xe]
            taken = local & (box > 0)
            if taken.sum() > 0.15 * local.sum():
                continue
            local = local & ~taken
            # Trimming against a neighbour can leave slivers: keep the main piece only.
            lab, n = ndi.label(local)
            if n > 1:
                sizes = np.bincount(lab.ravel())[1:]
                local = lab == (int(np.argmax(sizes)) + 1)
            if local.sum() < min_area:
                continue
            k = len(classes) + 1
            box[local] = k
            r = rho[ys - y0 : ye - y0, xs - x0 : xe - x0][local]
            grain = canvas.grain[ys:ye, xs:xe][local]
            level = arch.hematoxylin * rng.uniform(0.85, 1.15)
            conc = level * (1 - arch.vesicular * (1 - r**2)) * (1 + 0.25 * grain)
            canvas.hema[ys:ye, xs:xe][local] = conc
            canvas.eosin[ys:ye, xs:xe][local] *= 0.4
            if arch.halo_eosin > 0:
                ring = ndi.binary_dilation(local, iterations=max(1, round(1.5 / mpp)))
                ring &= ~local & (box == 0)
                canvas.eosin[ys:ye, xs:xe][ring] += arch.halo_eosin
            classes.append(cls)
            centres.append((cy, cx, radius))
            break
    return classes


def _render(canvas: _Canvas, rng: np.random.Generator, blur: float, noise: float) -> np.ndarray:
    hed = np.stack(
        [
            ndi.gaussian_filter(canvas.hema, blur),
            ndi.gaussian_filter(canvas.eosin, blur),
            np.zeros_like(canvas.hema),
        ],
        axis=-1,
    )
    rgb = hed2rgb(hed) * 255.0
    rgb += rng.normal(0.0, noise, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _class_probs(n_classes: int, class_probs: Sequence[float] | None) -> np.ndarray:
    if n_classes < 1:
        raise ConicQPError(f"n_classes must be >= 1, got {n_classes}")
    if class_probs is None:
        probs = np.asarray(DEFAULT_CLASS_PROBS if n_classes == 6 else [1.0] * n_classes, float)
    else:
        probs = np.asarray(class_probs, dtype=float)
    if probs.shape != (n_classes,) or (probs < 0).any() or probs.sum() <= 0:
        raise ConicQPError(
            f"class_probs must be {n_classes} non-negative numbers with a positive sum; "
            f"got {list(probs)}"
        )
    return probs / probs.sum()


def _labels(inst: np.ndarray, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    inst_classes = np.asarray(classes, dtype=np.int32)
    lut = np.concatenate([[0], inst_classes]).astype(np.int32)
    return inst_classes, lut[inst]


def _tissue_background(
    rng: np.random.Generator, shape: tuple[int, int], mpp: float
) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin of stroma/cytoplasm: pink with patchy tone and fibre streaks."""
    patchy = _smooth_noise(rng, shape, 12.0 / mpp)
    fibres = _smooth_noise(rng, shape, (0.6 / mpp, 4.0 / mpp))
    eosin = 0.017 + 0.004 * patchy + 0.003 * fibres
    hema = 0.006 + 0.002 * _smooth_noise(rng, shape, 3.0 / mpp)
    return np.clip(hema, 0, None).astype(np.float32), np.clip(eosin, 0.003, None).astype(np.float32)


def synthetic_tile(
    size: int | tuple[int, int] = 256,
    n_nuclei: int | None = None,
    n_classes: int = 6,
    seed: SeedLike = 0,
    mpp: float = 0.5,
    class_probs: Sequence[float] | None = None,
    blur: float = 0.7,
    noise: float = 2.5,
) -> SyntheticTile:
    """One H&E-like tile full of tissue, with exact instance and class maps.

    Parameters
    ----------
    size : edge (or (height, width)) in pixels.
    n_nuclei : nuclei to attempt; by default about 45 per 128 x 128 um (a CoNIC tile), scaled to
        the tile's area at ``mpp``. Fewer are placed when the tile is crowded.
    n_classes : classes 1..C; class ``c`` looks like CoNIC class ``(c - 1) % 6 + 1`` (neutrophil,
        epithelial, lymphocyte, plasma, eosinophil, connective).
    seed : anything :func:`numpy.random.default_rng` accepts; equal seeds give equal tiles.
    mpp : um/px; nucleus sizes are in micrometres, so a 0.25 um/px tile has nuclei twice as wide.
    class_probs : per-class frequencies (default imbalanced like CoNIC for 6 classes, else uniform).
    blur, noise : gaussian blur of the stain maps (px) and RGB noise std (intensity levels).
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 8 or width < 8 or mpp <= 0:
        raise ConicQPError(f"synthetic tile needs size >= 8 px and mpp > 0; got {size}, {mpp}")
    probs = _class_probs(n_classes, class_probs)
    rng = np.random.default_rng(seed)
    shape = (height, width)
    if n_nuclei is None:
        n_nuclei = round(45 * height * width * mpp**2 / _TILE_UM**2)
    hema, eosin = _tissue_background(rng, shape, mpp)
    canvas = _Canvas(
        inst=np.zeros(shape, np.int32),
        hema=hema,
        eosin=eosin,
        grain=_smooth_noise(rng, shape, 0.4 / mpp),
        allowed=None,
    )
    classes = _place_nuclei(canvas, n_nuclei, probs, mpp, rng)
    image = _render(canvas, rng, blur, noise)
    inst_classes, class_map = _labels(canvas.inst, classes)
    return SyntheticTile(image, canvas.inst, class_map, inst_classes, np.ones(shape, bool), mpp)


def synthetic_dataset(
    n: int,
    size: int = 256,
    seed: int = 0,
    n_classes: int = 6,
    mpp: float = 0.5,
    n_nuclei: int | None = None,
    class_probs: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic tiles in the CoNIC patch layout.

    Returns
    -------
    images : (N, H, W, 3) uint8.
    labels : (N, H, W, 2) int32; channel 0 instance ids, channel 1 class ids (0 background).
    """
    if n < 1:
        raise ConicQPError(f"synthetic_dataset needs n >= 1, got {n}")
    children = np.random.SeedSequence(seed).spawn(n)
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, size, size, 2), np.int32)
    for i, child in enumerate(children):
        tile = synthetic_tile(size, n_nuclei, n_classes, child, mpp, class_probs)
        images[i] = tile.image
        labels[i, ..., 0] = tile.inst_map
        labels[i, ..., 1] = tile.class_map
    return images, labels


def synthetic_slide_image(
    height: int = 2000,
    width: int = 3000,
    seed: SeedLike = 0,
    mpp: float = 0.5,
    tissue_fraction: float = 0.45,
    density: float = 45.0,
    n_classes: int = 6,
    class_probs: Sequence[float] | None = None,
    blur: float = 0.7,
    noise: float = 2.5,
) -> SyntheticTile:
    """A slide-like image: a few tissue pieces on white glass, nuclei only inside tissue.

    Nuclei are painted in their own small boxes, so the cost grows with the number of nuclei, not
    with image area times nuclei (a 2000 x 3000 image takes a few seconds).

    Parameters
    ----------
    tissue_fraction : approximate fraction of the image covered by tissue (0 < f < 1).
    density : nuclei per 128 x 128 um of tissue (a CoNIC tile holds about 45).
    """
    if height < 64 or width < 64 or mpp <= 0:
        raise ConicQPError(f"synthetic slide needs >= 64 x 64 px and mpp > 0; got {height}x{width}")
    if not 0 < tissue_fraction < 1:
        raise ConicQPError(f"tissue_fraction must be between 0 and 1, got {tissue_fraction}")
    probs = _class_probs(n_classes, class_probs)
    rng = np.random.default_rng(seed)
    shape = (height, width)
    # Smooth blobs, pushed down near the border so tissue rarely touches the image edge.
    field = _smooth_noise(rng, shape, max(height, width) / 12)
    yy = np.minimum(np.arange(height), np.arange(height)[::-1])[:, None] / height
    xx = np.minimum(np.arange(width), np.arange(width)[::-1])[None, :] / width
    field = field - 3.0 * np.clip(0.08 - np.minimum(yy, xx), 0, None) / 0.08
    tissue = field > np.quantile(field, 1 - tissue_fraction)
    hema, eosin = _tissue_background(rng, shape, mpp)
    soft = ndi.gaussian_filter(tissue.astype(np.float32), 1.5)
    canvas = _Canvas(
        inst=np.zeros(shape, np.int32),
        hema=hema * soft,
        eosin=eosin * soft + 0.001,
        grain=_smooth_noise(rng, shape, 0.4 / mpp),
        allowed=tissue,
    )
    n_nuclei = round(density * tissue.sum() * mpp**2 / _TILE_UM**2)
    classes = _place_nuclei(canvas, n_nuclei, probs, mpp, rng)
    image = _render(canvas, rng, blur, noise)
    inst_classes, class_map = _labels(canvas.inst, classes)
    logger.debug("synthetic slide %dx%d: %d nuclei", height, width, len(classes))
    return SyntheticTile(image, canvas.inst, class_map, inst_classes, tissue, mpp)
