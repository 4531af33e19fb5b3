"""The project class list ``classifiers/classes.json``: read, merge model classes, write safely.

QuPath's format: ``{"pathClasses": [{"name": str, "color": int}]}`` where the colour is a packed
ARGB integer stored as a signed 32-bit number (e.g. -3670016 = 0xFFC80000 = RGB 200, 0, 0).
Merging adds the model's missing classes and never removes, renames, reorders or recolours a
class the user already has; the previous file is backed up first and the new one written
atomically.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conic_qp.classes import RGB, ClassScheme
from conic_qp.errors import ConicQPError
from conic_qp.qupath.project import backup_file
from conic_qp.sinks import write_json_atomic

log = logging.getLogger(__name__)

CLASSES_FILE = Path("classifiers") / "classes.json"

#: QuPath's default class list (as written by QuPath 0.4-0.7 in a new project). Seeded when a
#: project has no classes.json yet, so that adding model classes does not hide the defaults.
QUPATH_DEFAULT_CLASSES: tuple[dict[str, Any], ...] = (
    {"name": "Tumor", "color": -3670016},
    {"name": "Stroma", "color": -6895466},
    {"name": "Immune cells", "color": -6268256},
    {"name": "Necrosis", "color": -13487566},
    {"name": "Other", "color": -14336},
    {"name": "Region*", "color": -16777036},
    {"name": "Ignore*", "color": -4934476},
    {"name": "Positive", "color": -377282},
    {"name": "Negative", "color": -9408287},
)


def rgb_to_argb(rgb: Sequence[int]) -> int:
    """RGB triple -> QuPath's packed opaque ARGB as a signed 32-bit integer."""
    r, g, b = (int(v) & 0xFF for v in rgb)
    packed = (0xFF << 24) | (r << 16) | (g << 8) | b
    return packed - (1 << 32) if packed >= 1 << 31 else packed


def argb_to_rgb(value: int) -> RGB:
    """QuPath's packed (signed or unsigned) ARGB integer -> RGB triple (alpha dropped)."""
    v = int(value) & 0xFFFFFFFF
    return ((v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF)


def classes_path(project_dir: str | os.PathLike[str]) -> Path:
    return Path(project_dir) / CLASSES_FILE


def read_path_classes(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Entries of a ``classes.json`` (``[]`` when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConicQPError(
            f"cannot read QuPath class list {path} ({exc}); fix or delete it and retry"
        ) from None
    entries = data.get("pathClasses") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries
    ):
        raise ConicQPError(
            f"{path} is not a QuPath class list (expected {{'pathClasses': [{{'name', 'color'}}]}})"
        )
    return [dict(e) for e in entries]


def merge_classes(
    existing: Sequence[dict[str, Any]], scheme: ClassScheme
) -> tuple[list[dict[str, Any]], list[str]]:
    """User classes unchanged, then the scheme's missing classes; returns (merged, added names)."""
    merged = [dict(e) for e in existing]
    have = {e["name"] for e in merged}
    lower = {n.lower(): n for n in have}
    added: list[str] = []
    for c in scheme:
        if c.name in have:
            continue
        if c.name.lower() in lower:
            log.info(
                "project has class %r; adding the model's %r as well (QuPath names are "
                "case-sensitive)",
                lower[c.name.lower()],
                c.name,
            )
        merged.append({"name": c.name, "color": rgb_to_argb(c.color)})
        added.append(c.name)
    return merged, added


def update_project_classes(project_dir: str | os.PathLike[str], scheme: ClassScheme) -> list[str]:
    """Add the model's classes to a project's ``classes.json``; returns the names added.

    Nothing is written when every class is already there. Otherwise the existing file is backed
    up (``classes.json.bak``) and replaced atomically; a project without the file gets QuPath's
    default classes plus the model's.
    """
    path = classes_path(project_dir)
    existed = path.exists()
    existing = read_path_classes(path) if existed else [dict(c) for c in QUPATH_DEFAULT_CLASSES]
    merged, added = merge_classes(existing, scheme)
    if not added and existed:
        return []
    if existed:
        backup_file(path)
    write_json_atomic(path, {"pathClasses": merged})
    log.info("added classes %s to %s", added, path)
    return added
