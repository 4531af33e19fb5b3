"""Where an image's detections go: one protocol for every destination.

``conic-qp annotate`` (and OMERO jobs) compute an image's nuclei into a table first, then hand
them to a :class:`DetectionSink`: a QuPath project through GeoJSON files and the Groovy import
script (:class:`conic_qp.qupath.sinks.GeoJSONProjectSink`), a QuPath project through paquo
(:class:`conic_qp.qupath.sinks.PaquoSink`), or an OMERO server
(:class:`conic_qp.omero.sinks.OmeroSink`). The caller does not know which:
it opens the sink once, writes image after image (sequentially, in one process: a paquo project
is written through one JVM, a QuPath project under one lock), and closes it.

Every sink replaces the detections conic-qp wrote there before (never the user's) and writes
atomically; the QuPath sinks place each detection below the region QuPath would make its parent
(:func:`conic_qp.regions.parent_regions`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from conic_qp.classes import ClassScheme
    from conic_qp.regions import Region

__all__ = ["Delivery", "DetectionSink", "Detections"]


@dataclass(frozen=True)
class Detections:
    """One image's detections, ready to be delivered.

    Attributes
    ----------
    key : the image in the destination (QuPath entry id, OMERO image id).
    name : display name of the image.
    table : the image's nucleus table (Parquet, level-0 pixels).
    classes : the model's class scheme (names and colours).
    regions : the image's annotations; detections go below the one holding them.
    add_regions : the destination lacks these regions (they came from files): add them too.
    object_type : ``"detection"`` or ``"cell"``.
    outputs : the image's other prediction outputs by kind (``run``, ``geojson``: what
        :func:`conic_qp.predict.output_paths` names), for sinks that upload more than the table.
    """

    key: str
    name: str
    table: Path
    classes: ClassScheme
    regions: tuple[Region, ...] = ()
    add_regions: bool = False
    object_type: str = "detection"
    outputs: Mapping[str, Path] = field(default_factory=dict, compare=False)


@dataclass
class Delivery:
    """What a sink wrote for one image: files, and detections per parent region id (None:
    outside every region, at the root), how many earlier conic-qp detections it replaced, and
    what the destination reports (``record``: e.g. the OMERO ids written; JSON-serialisable)."""

    outputs: dict[str, Path] = field(default_factory=dict)
    counts_by_parent: dict[str | None, int] = field(default_factory=dict)
    removed: int = 0
    record: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class DetectionSink(Protocol):
    """A destination for detections (a QuPath project, an OMERO server).

    ``open`` once before the first image (class lists, scripts; returns the class names added),
    ``write`` per image, ``close`` at the end (``complete=False`` after an interruption: save
    nothing more). ``command`` is what the user must run afterwards, if anything (the QuPath
    import command of the GeoJSON sink).
    """

    name: str

    @property
    def command(self) -> str | None: ...

    def open(self, classes: ClassScheme) -> list[str]: ...

    def existing_regions(self, key: str) -> list[Region] | None:
        """The image's regions as the destination holds them (None: it cannot tell)."""
        ...

    def write(self, detections: Detections) -> Delivery: ...

    def close(self, complete: bool) -> None: ...
