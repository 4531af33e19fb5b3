"""Per-nucleus tables as Parquet, with the run's provenance in the file's schema metadata.

The class list, the slide's um/px and the model travel inside the Parquet file (key
``conic_qp``), so a table stays interpretable after it is copied away from its run folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from conic_qp.classes import ClassScheme
from conic_qp.errors import ConicQPError
from conic_qp.inputs import describe_content
from conic_qp.sinks import atomic_path

log = logging.getLogger(__name__)

METADATA_KEY = b"conic_qp"


def write_table(
    table: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    classes: ClassScheme | None = None,
    mpp: float | None = None,
    model: str | Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    compression: str = "zstd",
) -> Path:
    """Write a nucleus table to Parquet atomically; provenance goes into the schema metadata.

    ``metadata`` adds JSON-serialisable entries (e.g. slide path, image id) beside ``classes``,
    ``mpp`` and ``model``.
    """
    path = Path(path)
    meta: dict[str, Any] = {"format": "conic-qp nucleus table", "version": 1}
    if classes is not None:
        meta["classes"] = classes.to_json()
    if mpp is not None:
        meta["mpp"] = float(mpp)
    if model is not None:
        meta["model"] = model if isinstance(model, str) else dict(model)
    if metadata:
        meta.update(dict(metadata))
    try:
        encoded = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except TypeError as exc:
        raise ConicQPError(f"table metadata is not JSON-serialisable ({exc})") from None
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), METADATA_KEY: encoded})
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp, compression=compression)
    log.info("wrote %d rows to %s", len(table), path)
    return path


def read_table_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The conic-qp metadata of a Parquet table (empty dict for foreign Parquet files)."""
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError:
        raise ConicQPError(f"table {path} does not exist; check the path") from None
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable_table(Path(path), exc) from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        out = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s: unreadable conic-qp metadata ignored", path)
        return {}
    return out if isinstance(out, dict) else {}


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a nucleus table; its conic-qp metadata is in ``df.attrs["conic_qp"]``.

    ``df.attrs["classes"]`` holds the :class:`ClassScheme` when the file records one.
    """
    meta = read_table_metadata(path)
    try:
        df = pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable_table(Path(path), exc) from None
    df.attrs["conic_qp"] = meta
    if "classes" in meta:
        df.attrs["classes"] = ClassScheme.from_json(meta["classes"])
    return df


_PARQUET_MAGIC = b"PAR1"
_REDO = "re-run `conic-qp predict` for that slide (or copy the file again)"


def _unreadable_table(path: Path, exc: BaseException) -> ConicQPError:
    """Why a Parquet table cannot be read, in the user's terms, and what to do."""
    if path.is_dir():
        return ConicQPError(f"table {path} is a folder; pass the .parquet file itself")
    content = describe_content(path)
    if content is not None:
        kind = content if content.startswith("an empty") else f"{content}, not a Parquet table"
        return ConicQPError(f"table {path} is {kind}; {_REDO}")
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(4)
            fh.seek(max(0, size - 4))
            tail = fh.read(4)
    except OSError as err:
        return ConicQPError(f"cannot read table {path}: {err.strerror or err}")
    if head == _PARQUET_MAGIC and tail != _PARQUET_MAGIC:
        return ConicQPError(
            f"table {path} is incomplete ({size:,} bytes, its Parquet footer is missing): the run "
            f"that wrote it was interrupted or the copy is incomplete; {_REDO}"
        )
    if head != _PARQUET_MAGIC:
        return ConicQPError(f"table {path} is not a Parquet file; pass a .nuclei.parquet table")
    reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return ConicQPError(f"table {path} is damaged ({reason}); {_REDO}")
