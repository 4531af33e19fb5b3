"""An OMERO server as a :class:`~conic_qp.sinks.detections.DetectionSink`.

:class:`OmeroSink` writes one finished image at a time (the caller hands it an image only once
its prediction is complete): the OMERO.table, the GeoJSON attachment, the key-value pairs of
the composition and the capped polygon ROIs (:func:`conic_qp.omero.results.write_image_results`:
everything is created, then linked to the image in one transaction, and only then are the
earlier conic-qp results of the image deleted; ``replace=False`` keeps them).

Nothing half-written stays behind when the connection drops mid-upload. The upload rolls back
what it created; when the connection is gone the rollback cannot reach the server, so what it
created is also kept in a local journal, ``<stem>.omero-pending.json`` beside the image's table,
rewritten atomically after every object the server creates. The next upload of the image (the
retry after logging in again, or a later run) deletes the journal's objects first. Until then
they are not linked to the image (annotations, tables: OMERO.web shows them nowhere); only ROIs
of a broken upload show in OMERO.iviewer, as ROIs point at their image themselves.

A dropped connection is retried ``retries`` times after logging in again; the upload starts
from the beginning each time (OMERO has no transaction spanning the table, files and links).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from conic_qp.errors import ConicQPError
from conic_qp.omero.connection import OmeroConnection, OmeroConnectionLost
from conic_qp.omero.refs import OmeroRef
from conic_qp.omero.results import WriteOptions, WrittenResults, remove_objects
from conic_qp.run_record import read_record
from conic_qp.sinks.detections import Delivery, Detections

if TYPE_CHECKING:
    from conic_qp.classes import ClassScheme
    from conic_qp.regions import Region

log = logging.getLogger(__name__)

__all__ = ["PENDING_SUFFIX", "OmeroSink", "composition_summary", "pending_path", "provenance"]

#: The local journal of an upload in progress (objects created on the server, not yet linked).
PENDING_SUFFIX = ".omero-pending.json"
PENDING_FORMAT = "conic-qp omero pending upload"


def pending_path(table: str | os.PathLike[str]) -> Path:
    """The journal of the upload of the image whose nucleus table is ``table``."""
    path = Path(table)
    stem = path.name.split(".nuclei.")[0] if ".nuclei." in path.name else path.stem
    return path.with_name(stem + PENDING_SUFFIX)


def composition_summary(
    table: pd.DataFrame, regions: Sequence[Any], run: Mapping[str, Any], name: str
) -> pd.DataFrame:
    """Summary rows (``conic_qp.composition.summary_table``): the whole run area, then each
    region (centroid rule)."""
    from conic_qp.composition import composition_table, summary_table, whole_region

    classes = table.attrs["classes"]
    mpp = float((table.attrs.get("conic_qp") or {}).get("mpp") or run["slide"]["mpp"])
    area = run.get("roi_area_px") or run.get("tissue_area_px")
    regs = [whole_region(float(area) if area else None), *regions]
    tidy = composition_table(table, regs, classes.names, slide=name, mpp=mpp)
    return summary_table(tidy, classes.names)


def provenance(run: Mapping[str, Any], ref: str) -> dict[str, Any]:
    """What the table's metadata and the key-value pairs say about the run (no credentials:
    ``ref`` is ``omero://host:port/image/ID``)."""
    from conic_qp import __version__

    slide = run.get("slide") or {}
    models = run.get("models") or []
    model = models[0].get("path") if len(models) == 1 and isinstance(models[0], dict) else None
    return {
        "format": "conic-qp nucleus table",
        "version": 1,
        "image": ref,
        "mpp": slide.get("mpp"),
        "dimensions": slide.get("dimensions"),
        "tissue_area_px": run.get("tissue_area_px"),
        "roi_area_px": run.get("roi_area_px"),
        "model": str(model) if model else f"{len(models)}-model ensemble",
        "fingerprint": run.get("fingerprint"),
        "conic_qp_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class OmeroSink:
    """Detections (and the composition, GeoJSON and capped ROIs) onto OMERO images.

    Parameters
    ----------
    connection : this process's connection (reconnected after a dropped connection).
    write : what to write and whether to replace earlier results (``--write``, ``--keep``).
    retries : new logins and attempts of an upload after a dropped connection.

    ``Detections.key`` is the OMERO image id; ``Detections.outputs`` must name the image's
    ``run`` record (and ``geojson`` when attachments are written); ``Detections.regions`` are
    the regions composed in the key-value pairs (the image's ROIs, read by
    :meth:`existing_regions`).
    """

    name = "omero"
    command = None

    def __init__(
        self, connection: OmeroConnection, write: WriteOptions, *, retries: int = 1
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.connection = connection
        self.options = write
        self.retries = retries

    def open(self, classes: ClassScheme) -> list[str]:
        return []  # OMERO keeps no class list

    def _gateway(self) -> Any:
        gw = self.connection.gateway
        if self.connection.group_id is None:
            gw.SERVICE_OPTS.setOmeroGroup(-1)  # the image may be in any of the user's groups
        return gw

    def existing_regions(self, key: str) -> list[Region] | None:
        from conic_qp.omero.regions import read_image_regions

        return read_image_regions(self._gateway(), int(key), self.connection.server)

    def write(self, detections: Detections) -> Delivery:
        """Upload one complete image; raises :class:`ConicQPError` when it could not be
        written (the image then holds its earlier results, and nothing of this upload is
        linked to it)."""
        from conic_qp.sinks.tables import read_table

        image_id = int(detections.key)
        run_path = detections.outputs.get("run")
        run = read_record(Path(run_path)) if run_path is not None else {}
        if not run.get("complete"):
            raise ValueError(f"image {image_id}: no complete run record; predict it first")
        table = read_table(detections.table)
        c = self.connection.credentials
        ref = OmeroRef("image", image_id, c.host, c.port).uri
        opts = self.options
        summary = (
            composition_summary(table, detections.regions, run, detections.name)
            if opts.map
            else None
        )
        geojson = detections.outputs.get("geojson") if opts.attachment else None
        if opts.attachment and (geojson is None or not Path(geojson).is_file()):
            raise ConicQPError(f"image {image_id}: the GeoJSON to attach is missing; run again")
        meta = provenance(run, ref)
        written = self._upload(image_id, table, geojson, summary, meta, detections.table)
        return Delivery(
            {},
            {None: len(table)},
            sum(written.replaced.values()),
            written.to_json(),
        )

    def _upload(
        self,
        image_id: int,
        table: pd.DataFrame,
        geojson: str | os.PathLike[str] | None,
        summary: pd.DataFrame | None,
        meta: Mapping[str, Any],
        table_path: str | os.PathLike[str],
    ) -> WrittenResults:
        from conic_qp.omero.results import write_image_results
        from conic_qp.sinks import remove_inside, write_json_atomic

        journal_file = pending_path(table_path)

        def journal(objects: Mapping[str, list[int]]) -> None:
            if objects:
                record = {"format": PENDING_FORMAT, "image": image_id, "objects": dict(objects)}
                write_json_atomic(journal_file, record)
            else:
                remove_inside(journal_file.parent, journal_file)

        attempt = 0
        while True:
            attempt += 1
            try:
                gw = self._gateway()
                self._clear_pending(gw, journal_file)
                written = write_image_results(
                    gw,
                    image_id,
                    table,
                    geojson,
                    summary,
                    self.options,
                    metadata=meta,
                    server=self.connection.server,
                    journal=journal,
                )
                journal({})  # linked: nothing of this upload is pending any more
                return written
            except OmeroConnectionLost as exc:
                if attempt > self.retries:
                    raise
                log.warning(
                    "image %d: %s; logging in again (upload attempt %d)", image_id, exc, attempt + 1
                )
                self.connection.reconnect()

    def _clear_pending(self, gw: Any, journal_file: Path) -> None:
        """Delete what an interrupted upload of this image left on the server."""
        from conic_qp.sinks import remove_inside, write_json_atomic

        data = read_record(journal_file)
        objects = data.get("objects") if data.get("format") == PENDING_FORMAT else None
        if not isinstance(objects, dict) or not objects:
            return
        log.info("image %s: removing what an interrupted upload left on the server", data["image"])
        left = remove_objects(gw, objects)
        if left:
            write_json_atomic(journal_file, {**data, "objects": left})
            raise OmeroConnectionLost(
                f"cannot remove the leftovers of an interrupted upload of image {data['image']}"
            )
        remove_inside(journal_file.parent, journal_file)

    def close(self, complete: bool) -> None:
        return None
