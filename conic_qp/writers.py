"""Slide outputs behind one protocol: every :class:`SlideWriter` consumes the engine's blocks.

A writer builds its output under a temporary name while blocks arrive (:meth:`SlideWriter.write`),
finishes it (:meth:`~SlideWriter.close`) and moves it into place only when every writer of the
slide has finished (:meth:`~SlideWriter.commit`), so a failed or interrupted slide leaves its
previous outputs untouched and no half-written file (:meth:`~SlideWriter.abort` removes the
temporary ones).

* :class:`TableWriter`: the nucleus table, appended to a Parquet file row group by row group;
* :class:`GeoJSONWriter`: the QuPath FeatureCollection, streamed from that Parquet file when it
  is complete (:func:`conic_qp.sinks.geojson.write_geojson`);
* :class:`LabelMapWriter`: the slide-wide instance label map in zarr, pasted block by block.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conic_qp.classes import ClassScheme
from conic_qp.errors import ConicQPError, OutputError
from conic_qp.objects import table_schema
from conic_qp.sinks import replace_dir
from conic_qp.stitch import BlockOutput
from conic_qp.tiling import Box

log = logging.getLogger(__name__)

__all__ = ["GeoJSONWriter", "LabelMapWriter", "SlideWriter", "TableWriter", "arrow_schema"]


@runtime_checkable
class SlideWriter(Protocol):
    """One output of a slide run, fed with the engine's blocks in order."""

    path: Path

    def write(self, block: BlockOutput) -> None:
        """Add one block's nuclei (with ``block.label_offset`` as its slide-wide id offset)."""

    def close(self) -> None:
        """Finish the temporary output (all blocks written)."""

    def commit(self) -> Path:
        """Move the finished output to :attr:`path`; returns it."""

    def abort(self) -> None:
        """Remove the temporary output (the run failed); never raises."""


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A writer's own file-system errors (disk full, read-only, permission denied) as one
    :class:`~conic_qp.errors.OutputError` naming its output, not its temporary name."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError.from_os_error(exc, path) from exc


def _tmp_name(path: Path) -> Path:
    """A temporary name beside ``path`` that records this run (pid, host), so a killed run's
    leftovers are found by :func:`conic_qp.locks.clean_stale_temps`."""
    from conic_qp.paths import temp_path

    return temp_path(path)


def arrow_schema(classes: ClassScheme, with_label: bool) -> pa.Schema:
    """Arrow schema of a nucleus table (:func:`conic_qp.objects.table_schema`)."""
    types = {
        "str": pa.string(),
        "float64": pa.float64(),
        "float32": pa.float32(),
        "int64": pa.int64(),
        "object": pa.binary(),
    }
    fields = [pa.field(col, types[dtype]) for col, dtype in table_schema(classes).items()]
    if with_label:
        fields.append(pa.field("label", pa.int64()))
    return pa.schema(fields)


class TableWriter:
    """The nucleus table as Parquet, one row group per ``row_group_rows`` nuclei.

    With ``with_label`` a ``label`` column holds each nucleus' id in the label map.
    ``metadata`` (JSON-serialisable) goes into the schema metadata (see
    :mod:`conic_qp.sinks.tables`).
    """

    def __init__(
        self,
        path: Path,
        classes: ClassScheme,
        metadata: dict[str, Any],
        *,
        with_label: bool = False,
        row_group_rows: int = 20_000,
    ) -> None:
        from conic_qp.sinks.tables import METADATA_KEY

        self.path = Path(path)
        with _writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _tmp_name(self.path)
        self.with_label = with_label
        self.row_group_rows = row_group_rows
        self.counts: dict[str, int] = dict.fromkeys(classes.names, 0)
        self.n = 0
        meta = {METADATA_KEY: json.dumps(metadata, ensure_ascii=False).encode("utf-8")}
        self.schema = arrow_schema(classes, with_label).with_metadata(meta)
        with _writing(self.path):
            self._writer: pq.ParquetWriter | None = pq.ParquetWriter(str(self.tmp), self.schema)
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def write(self, block: BlockOutput) -> None:
        table = block.table
        if not len(table):
            return
        if self.with_label:
            first = block.label_offset + 1
            table = table.assign(label=np.arange(first, first + len(table), dtype=np.int64))
        self._buffer.append(pa.Table.from_pandas(table, schema=self.schema, preserve_index=False))
        self._buffered += len(table)
        self.n += len(table)
        for name, c in table["class_name"].value_counts().items():
            self.counts[str(name)] += int(c)
        if self._buffered >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._buffer and self._writer is not None:
            with _writing(self.path):
                self._writer.write_table(pa.concat_tables(self._buffer))
        self._buffer, self._buffered = [], 0

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            with _writing(self.path):
                self._writer.close()
            self._writer = None

    def commit(self) -> Path:
        with _writing(self.path):
            os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        with contextlib.suppress(OSError):
            self.tmp.unlink()


class GeoJSONWriter:
    """QuPath GeoJSON (gzip when the name ends in .gz), streamed from the finished table."""

    def __init__(
        self, path: Path, table: TableWriter, classes: ClassScheme, object_type: str
    ) -> None:
        self.path = Path(path)
        self.tmp = _tmp_name(self.path)
        self.table = table
        self.classes = classes
        self.object_type = object_type

    def write(self, block: BlockOutput) -> None:
        """Nothing to do per block: the features come from the table when it is complete."""

    def close(self) -> None:
        from conic_qp.sinks.geojson import write_geojson

        self.table.close()
        batches = pq.ParquetFile(self.table.tmp).iter_batches(batch_size=5000)
        with _writing(self.path):
            write_geojson(
                (b.to_pandas() for b in batches),
                self.tmp,
                self.classes,
                object_type=self.object_type,  # type: ignore[arg-type]
                gzip=self.path.name.lower().endswith(".gz"),
            )

    def commit(self) -> Path:
        with _writing(self.path):
            os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.tmp.unlink()


class LabelMapWriter:
    """Slide-wide instance label map at the model's um/px, written to a zarr folder.

    Labels are pasted block by block (read-modify-write of the block's context, only where the
    block owns a nucleus), so nothing slide-sized is ever in memory. The zarr is built under a
    temporary name and moved into place by :meth:`commit`. Attributes record the resolution:
    ``mpp`` (um/px of the map), ``origin_level0`` and ``scale_level0`` (level-0 px per map px),
    so map pixel ``(r, c)`` covers level-0 ``origin + scale * (c, r)``.
    """

    def __init__(
        self,
        path: Path,
        shape: tuple[int, int],
        chunk: int,
        attrs: dict[str, Any],
    ) -> None:
        import zarr

        self.path = Path(path)
        with _writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _tmp_name(self.path)
        try:
            self._array = zarr.open_array(
                str(self.tmp),
                mode="w",
                shape=shape,
                chunks=(min(chunk, shape[0]), min(chunk, shape[1])),
                dtype="int32",
                fill_value=0,
            )
            self._array.attrs.update(attrs)
        except OSError as exc:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise OutputError.from_os_error(exc, self.path) from exc
        except Exception as exc:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise ConicQPError(f"cannot create the label map {self.path} ({exc})") from exc

    def paste(self, box: Box, labels: np.ndarray, offset: int) -> None:
        """Write owned labels (1..k) of ``box`` as slide-wide ids ``offset + 1 .. offset + k``."""
        if not labels.any():
            return
        sl = box.slices
        current = np.asarray(self._array[sl])
        mask = labels > 0
        current[mask] = labels[mask] + offset
        with _writing(self.path):
            self._array[sl] = current

    def write(self, block: BlockOutput) -> None:
        if block.labels is None:
            raise ValueError("the engine ran without label maps (want_labels=False)")
        self.paste(block.block.context, block.labels, block.label_offset)

    def close(self) -> None:
        """Nothing to finish: zarr chunks are complete files."""

    def commit(self) -> Path:
        replace_dir(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
