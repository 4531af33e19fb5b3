"""Read and write QuPath projects (``project.qpproj``) without Java, QuPath 0.2 to 0.7.

A project is a JSON file: ``version``, ``createTimestamp``, ``modifyTimestamp``, ``uri`` (where
the project file was when last saved), ``lastID`` and ``images``. Each image entry has
``entryID`` (its data live in ``data/<entryID>/``), ``imageName``, ``randomizedName``,
``description``, ``metadata`` and a ``serverBuilder``: ``{"builderType": "uri", "uri", "args",
"providerClassName", "metadata"}``, or a wrapper (``rotated``, ``pyramidize``, ``cropped``,
``affine``, ``channels``, ``sparse``) whose ``builder`` holds the ``uri`` builder.

Moved projects: QuPath keeps absolute URIs, so a copied project points at the old machine. Image
files are found (1) at the stored path, (2) through explicit ``remap`` prefixes
(``--remap OLD=NEW``), (3) at the same location relative to the project as when it was saved
(the stored ``uri``), (4) under the project's folder (and its parent) by progressively shorter
path suffixes, like QuPath's "search relative" in *Check project URIs*. An image that is still
missing gets a ``problem`` string; it never fails the whole project.

Locking (researched from QuPath's DefaultProject): QuPath has no lock file. It saves by writing
``project.qpproj.tmp``, renaming the old file to ``project.qpproj.backup`` and renaming the temp
file into place. A leftover ``project.qpproj.tmp`` therefore means QuPath is saving right now or
crashed while saving; a ``.backup`` without the project file means a save was interrupted.
:func:`ensure_project_writable` refuses both (and read-only projects), and :func:`project_lock`
adds conic-qp's own lock file so two conic-qp runs never write one project at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import unicodedata
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any
from urllib.parse import unquote, urlparse

from conic_qp.errors import ConicQPError, option, render
from conic_qp.inputs import read_json
from conic_qp.locks import clean_stale_temps, hold_lock
from conic_qp.outputs import ANNOTATE_DIR, GROOVY_DIR
from conic_qp.outputs import DETECTIONS_DIR as DETECTIONS_DIR
from conic_qp.outputs import REGIONS_DIR as REGIONS_DIR
from conic_qp.outputs import detections_dir as detections_dir
from conic_qp.outputs import legacy_detections_file as legacy_detections_file
from conic_qp.outputs import regions_path as regions_path
from conic_qp.paths import check_writable
from conic_qp.sinks import write_json_atomic

log = logging.getLogger(__name__)

PROJECT_FILE = "project.qpproj"
LOCK_FILE = ".conic-qp.lock"
_WINDOWS_DRIVE = re.compile(r"^/?([A-Za-z]):[/\\]?")

#: serverBuilder providers: Bio-Formats ships with every QuPath 0.2-0.7 and reads SVS, OME-TIFF,
#: generic TIFF; OpenSlide moved to an extension in 0.6, so it is not the default.
BIOFORMATS_PROVIDER = "qupath.lib.images.servers.bioformats.BioFormatsServerBuilder"
OPENSLIDE_PROVIDER = "qupath.lib.images.servers.openslide.OpenslideServerBuilder"


@dataclass(frozen=True)
class ProjectImage:
    """One image entry of a QuPath project, with its file resolved on this machine."""

    entry_id: str
    name: str
    uri: str | None
    path: Path | None
    data_dir: Path
    problem: str | None = None
    builder_type: str = "uri"
    provider: str | None = None
    args: tuple[str, ...] = ()
    mpp: float | None = None
    width: int | None = None
    height: int | None = None
    description: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: the file was found somewhere else than its URI says (moved project, ``--remap``)
    moved: bool = False
    #: ``problem`` with its settings marked (:func:`conic_qp.errors.option`), for the CLI
    problem_template: str | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        """True when the image file exists and can be processed."""
        return self.problem is None and self.path is not None

    @property
    def series(self) -> int | None:
        """Bio-Formats series index (``--series N`` in the builder args), if any."""
        args = list(self.args)
        for i, a in enumerate(args[:-1]):
            if a == "--series":
                with contextlib.suppress(ValueError):
                    return int(args[i + 1])
        return None


@dataclass(frozen=True)
class QuPathProject:
    """A parsed ``project.qpproj``."""

    path: Path
    version: str | None
    images: tuple[ProjectImage, ...]
    previous_uri: str | None = None
    create_timestamp: int | None = None

    @property
    def dir(self) -> Path:
        return self.path.parent

    def image(self, entry_id: str | int) -> ProjectImage:
        """Image with ``entry_id``."""
        for im in self.images:
            if im.entry_id == str(entry_id):
                return im
        ids = ", ".join(im.entry_id for im in self.images[:10])
        raise ConicQPError(f"project {self.path} has no image with id {entry_id} (ids: {ids}...)")

    def select(self, names_or_ids: Iterable[str] | None) -> list[ProjectImage]:
        """Images whose entry id or name is in ``names_or_ids`` (all when None)."""
        if names_or_ids is None:
            return list(self.images)
        wanted = [str(x) for x in names_or_ids]
        out = [im for im in self.images if im.entry_id in wanted or im.name in wanted]
        found = {im.entry_id for im in out} | {im.name for im in out}
        unknown = [w for w in wanted if w not in found]
        if unknown:
            raise ConicQPError(
                f"images {unknown} are not in project {self.path}; use entry ids or image names "
                f"(list them with {option('QuPathProject.images', '`conic-qp annotate --list`')})"
            )
        return out


def find_project_file(path: str | os.PathLike[str]) -> Path:
    """``project.qpproj`` of a project folder, or the given ``.qpproj`` file."""
    p = Path(path).expanduser()
    if p.is_dir():
        candidates = sorted(p.glob("*.qpproj"))
        if (p / PROJECT_FILE).is_file():
            return p / PROJECT_FILE
        if len(candidates) == 1:
            return candidates[0]
        if (p / (PROJECT_FILE + ".backup")).is_file():
            raise ConicQPError(
                f"{p} has project.qpproj.backup but no project.qpproj: a QuPath save was "
                "interrupted; copy the .backup to project.qpproj after checking it"
            )
        raise ConicQPError(f"{p} is not a QuPath project folder (no project.qpproj)")
    if not p.exists():
        raise ConicQPError(f"QuPath project {p} does not exist; check the path")
    if p.suffix != ".qpproj":
        raise ConicQPError(f"{p} is not a QuPath project; pass project.qpproj or its folder")
    return p


def uri_to_path_string(uri: str) -> str | None:
    """Decoded file-system path of a ``file:`` URI as a string (POSIX or Windows style).

    ``file:/C:/x%20y.svs`` -> ``C:/x y.svs``; ``file://server/share/a`` -> ``//server/share/a``;
    non-file URIs (http, omero, ...) -> None.
    """
    parsed = urlparse(uri)
    if parsed.scheme.lower() != "file":
        if parsed.scheme == "" and uri:  # a bare path (very old projects)
            return uri
        return None
    path = unquote(parsed.path)
    if parsed.netloc and parsed.netloc.lower() != "localhost":
        return f"//{parsed.netloc}{path}"
    m = _WINDOWS_DRIVE.match(path)
    if m:
        return f"{m.group(1)}:/{path[m.end() :]}"
    return path


def _is_windows_path(s: str) -> bool:
    return bool(_WINDOWS_DRIVE.match(s)) or s.startswith("//") or "\\" in s


def _parts(s: str) -> tuple[str, ...]:
    """Path components without the anchor (drive / root)."""
    pure = PureWindowsPath(s) if _is_windows_path(s) else PurePosixPath(s)
    return pure.parts[1:] if pure.anchor else pure.parts


def _local(s: str) -> Path | None:
    """``s`` as a path on this machine, or None when it is another OS's absolute path."""
    if os.name != "nt" and _is_windows_path(s):
        return None
    p = Path(s)
    return p if p.is_absolute() else None


def _norm_prefix(s: str) -> str:
    s = s.replace("\\", "/")
    if _WINDOWS_DRIVE.match(s):
        s = s.lstrip("/")
        s = s[0].upper() + s[1:]
    return s.rstrip("/")


def parse_remap(items: Iterable[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``["OLD=NEW", ...]`` (the CLI's ``--remap``) -> ``{OLD: NEW}``."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return {str(k): str(v) for k, v in items.items()}
    out: dict[str, str] = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ConicQPError(f"{option('remap')} {item!r} must look like OLD_PREFIX=NEW_PREFIX")
        out[old.strip()] = new.strip()
    return out


def _apply_remap(path_str: str, remap: Mapping[str, str]) -> list[Path]:
    """Candidates from prefix remapping, longest prefix first (case-insensitive on drives)."""
    norm = _norm_prefix(path_str)
    out: list[Path] = []
    for old, new in sorted(remap.items(), key=lambda kv: -len(kv[0])):
        o = _norm_prefix(old)
        if _is_windows_path(o):
            hit = norm.lower() == o.lower() or norm.lower().startswith(o.lower() + "/")
        else:
            hit = norm == o or norm.startswith(o + "/")
        if hit:
            rest = norm[len(o) :].lstrip("/")
            out.append(Path(new).expanduser() / rest if rest else Path(new).expanduser())
    return out


def _relative_candidates(
    path_str: str, previous_project_dir: str | None, project_dir: Path
) -> list[Path]:
    """Where the image would be if it moved together with the project (QuPath's "relative")."""
    out: list[Path] = []
    parts = _parts(path_str)
    if previous_project_dir:
        old = _parts(previous_project_dir)
        same_os = _is_windows_path(previous_project_dir) == _is_windows_path(path_str)
        if same_os:
            common = 0
            for a, b in zip(old, parts, strict=False):
                if (a.lower() == b.lower()) if _is_windows_path(path_str) else (a == b):
                    common += 1
                else:
                    break
            if common:
                ups = len(old) - common
                base = project_dir
                for _ in range(ups):
                    base = base.parent
                out.append(base.joinpath(*parts[common:]))
    # Progressively shorter suffixes under the project folder and its parent.
    for base in (project_dir, project_dir.parent):
        for start in range(len(parts)):  # longest (most specific) suffix first
            out.append(base.joinpath(*parts[start:]))
    seen: set[Path] = set()
    uniq = []
    for p in out:
        if p not in seen:
            seen.add(p)
            uniq.append(p)
    return uniq


def _primary_uri(builder: Any) -> tuple[str | None, str, Mapping[str, Any], int]:
    """(uri, outer builder type, innermost ``uri`` builder, number of distinct URIs)."""
    outer = str(builder.get("builderType", "uri")) if isinstance(builder, Mapping) else "uri"
    uris: list[str] = []
    inner: Mapping[str, Any] = {}

    def walk(node: Any) -> None:
        nonlocal inner
        if isinstance(node, Mapping):
            u = node.get("uri")
            if isinstance(u, str):
                if not uris:
                    inner = node
                if u not in uris:
                    uris.append(u)
            for key, value in node.items():
                if key != "metadata":
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(builder)
    return (uris[0] if uris else None), outer, inner, len(uris)


def _mpp_from_metadata(meta: Any) -> float | None:
    try:
        pw = meta["pixelCalibration"]["pixelWidth"]
        unit = str(pw.get("unit", ""))
        if unit in ("µm", "μm", "um", "microns", "micron"):
            value = float(pw["value"])
            return value if value > 0 else None
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    return None


def _resolve(
    uri: str | None,
    *,
    remap: Mapping[str, str],
    previous_project_dir: str | None,
    project_dir: Path,
    search: bool,
) -> tuple[Path | None, str | None, bool]:
    """(file, problem, moved): ``moved`` when the file is not where the URI says."""
    if uri is None:
        return None, "the image entry has no URI (unsupported server type)", False
    path_str = uri_to_path_string(uri)
    if path_str is None:
        scheme = urlparse(uri).scheme
        return (
            None,
            f"image is not a local file ({scheme}: URI {uri}); conic-qp reads local files",
            False,
        )
    tried: list[Path] = []
    direct = _local(path_str)
    if direct is not None:
        tried.append(direct)
    tried += _apply_remap(path_str, remap)
    if search:
        tried += _relative_candidates(path_str, previous_project_dir, project_dir)
    for cand in tried:
        if cand.is_file():
            if cand != direct:
                log.info("image %s found at %s", path_str, cand)
            return cand, None, cand != direct
    hint = (
        f"pass {option('remap')} OLD_PREFIX=NEW_PREFIX"
        if not remap
        else f"check the {option('remap')} prefixes"
    )
    n_moved = len(tried) - (1 if direct is not None else 0)
    return (
        None,
        f"image file {path_str} not found (also tried {n_moved} moved locations); {hint}",
        False,
    )


def read_project(
    path: str | os.PathLike[str],
    *,
    remap: Mapping[str, str] | Iterable[str] | None = None,
    search_relative: bool = True,
) -> QuPathProject:
    """Parse a QuPath project (file or folder) and resolve its image files on this machine.

    Raises ConicQPError for a missing, malformed or non-QuPath file; images that cannot be found
    are returned with ``problem`` set instead.
    """
    file = find_project_file(path).resolve()
    restore = f"restore {file.name}.backup if it exists, or re-save the project in QuPath"
    data = read_json(file, "QuPath project", restore, allow_nan=True)
    if not isinstance(data, dict) or "images" not in data:
        raise ConicQPError(f"{file} is not a QuPath project (no 'images' list)")
    images_json = data["images"]
    if not isinstance(images_json, list):
        raise ConicQPError(f"{file} is not a QuPath project ('images' is not a list)")
    remap_map = parse_remap(remap)
    prev_uri = data.get("uri") if isinstance(data.get("uri"), str) else None
    prev_dir: str | None = None
    if prev_uri:
        prev_file = uri_to_path_string(prev_uri)
        if prev_file:
            prev_dir = prev_file.rsplit("/", 1)[0] if "/" in prev_file else None

    images: list[ProjectImage] = []
    seen_ids: set[str] = set()
    edited = (
        f"the file was edited by hand or damaged: {restore}, or fix that entry in "
        f"{file.name} (a JSON file) with a text editor"
    )
    for i, entry in enumerate(images_json):
        if not isinstance(entry, dict):
            kind = "null" if entry is None else type(entry).__name__
            raise ConicQPError(
                f"{file}: image entry {i + 1} of {len(images_json)} is a {kind}, not an object "
                f"with the image's entryID and server; {edited}"
            )
        raw_id = entry.get("entryID", entry.get("uniqueName"))
        if raw_id is None:
            raise ConicQPError(f"{file}: image entry {i + 1} has no entryID; {edited}")
        entry_id = str(raw_id)
        if entry_id in seen_ids:
            first = next(k for k, e in enumerate(images_json) if _raw_id(e) == entry_id)
            raise ConicQPError(
                f"{file}: image entries {first + 1} and {i + 1} share entryID {entry_id}, so "
                f"their data folders would clash; {edited} (give one of them an unused id "
                "above lastID)"
            )
        seen_ids.add(entry_id)
        builder = entry.get("serverBuilder")
        if builder is None and isinstance(entry.get("serverPath"), str):
            builder = {"builderType": "uri", "uri": entry["serverPath"]}
        uri, outer, inner, n_uris = _primary_uri(builder)
        meta = (builder or {}).get("metadata") if isinstance(builder, Mapping) else None
        if not isinstance(meta, Mapping):
            meta = inner.get("metadata") if isinstance(inner.get("metadata"), Mapping) else {}
        moved = False
        if n_uris > 1:
            resolved = None
            problem: str | None = (
                f"image is assembled from {n_uris} files ({outer} server); conic-qp needs one file"
            )
        else:
            resolved, problem, moved = _resolve(
                uri,
                remap=remap_map,
                previous_project_dir=prev_dir,
                project_dir=file.parent,
                search=search_relative,
            )
        if outer not in ("uri", "pyramidize") and problem is None:
            problem = (
                f"image uses a '{outer}' server (transformed in QuPath); its coordinates differ "
                "from the file's, so conic-qp skips it; add the plain image to the project"
            )
        name = entry.get("imageName") or (meta.get("name") if meta else None) or f"Image {entry_id}"
        raw_args = inner.get("args")
        args: list[Any] = raw_args if isinstance(raw_args, list) else []
        raw_meta = entry.get("metadata")
        user_meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        images.append(
            ProjectImage(
                entry_id=entry_id,
                name=str(name),
                uri=uri,
                path=resolved,
                data_dir=file.parent / "data" / entry_id,
                problem=render(problem) if problem else None,
                builder_type=outer,
                provider=inner.get("providerClassName"),
                args=tuple(str(a) for a in args),
                mpp=_mpp_from_metadata(meta),
                width=meta.get("width") if meta else None,
                height=meta.get("height") if meta else None,
                description=entry.get("description"),
                metadata={str(k): str(v) for k, v in user_meta.items()},
                moved=moved,
                problem_template=problem,
            )
        )
        if problem:
            log.debug("project image %s (%s): %s", entry_id, name, render(problem))
    bad = [im for im in images if im.problem]
    if bad:
        log.warning(
            "%d of %d images of %s cannot be processed; first: %s",
            len(bad),
            len(images),
            file,
            bad[0].problem,
        )
    ts = data.get("createTimestamp")
    return QuPathProject(
        path=file,
        version=str(data["version"]) if data.get("version") is not None else None,
        images=tuple(images),
        previous_uri=prev_uri,
        create_timestamp=int(ts) if isinstance(ts, int | float) else None,
    )


def _raw_id(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return None
    raw = entry.get("entryID", entry.get("uniqueName"))
    return None if raw is None else str(raw)


# ------------------------------------------------------------------------------ safety, writing


#: The project's folders conic-qp writes into (checked writable, cleaned of dead runs' temps).
_CONIC_QP_FOLDERS = (ANNOTATE_DIR, DETECTIONS_DIR, GROOVY_DIR, "classifiers")


def ensure_project_writable(path: str | os.PathLike[str]) -> Path:
    """Refuse to write a project that QuPath is saving, that a crash left half-saved, or that is
    read-only. Returns the project file.

    Read-only follows the permission bits for every user, root included
    (:func:`conic_qp.paths.check_writable`): a project made read-only with ``chmod -R a-w`` is
    never written, whoever runs conic-qp.
    """
    file = find_project_file(path)
    tmp = file.with_name(file.name + ".tmp")
    if tmp.exists():
        raise ConicQPError(
            f"{tmp} exists: QuPath is saving this project or crashed while saving; close QuPath "
            "(or delete the .tmp file if QuPath is not running) and retry"
        )
    check_writable(file, what="QuPath project")
    for sub in _CONIC_QP_FOLDERS:  # folders conic-qp writes into, when they exist already
        if (file.parent / sub).is_dir():
            check_writable(file.parent / sub, what="QuPath project folder")
    return file


@contextlib.contextmanager
def project_lock(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold conic-qp's lock on a project while writing it (one conic-qp writer per project).

    The lock records pid, host and start time (:func:`conic_qp.locks.hold_lock`): a lock left by
    a run that was killed on this machine is taken over with a warning, and the temporary files
    such runs left in the project folder are removed.
    """
    file = ensure_project_writable(path)
    with hold_lock(file.parent / LOCK_FILE, what=str(file.parent)):
        for folder in (file.parent, *(file.parent / sub for sub in _CONIC_QP_FOLDERS)):
            clean_stale_temps(folder)
        yield file


def backup_file(path: str | os.PathLike[str]) -> Path | None:
    """Copy ``path`` to ``<name>.bak`` (or ``<name>.<timestamp>.bak`` if that exists).

    Earlier backups are never overwritten: the first ``.bak`` is the user's original. Returns the
    backup path, or None when ``path`` does not exist.
    """
    src = Path(path)
    if not src.exists():
        return None
    dst = src.with_name(src.name + ".bak")
    if dst.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dst = src.with_name(f"{src.name}.{stamp}.bak")
        n = 1
        while dst.exists():
            dst = src.with_name(f"{src.name}.{stamp}-{n}.bak")
            n += 1
    shutil.copy2(src, dst)
    return dst


#: ASCII characters Java's ``java.net.URI`` leaves unquoted in a path (unreserved, punct, "/@").
_URI_PATH_SAFE = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-!.~'()*,;:$&+=/@"
)


def _quote_java(path: str, *, ascii_only: bool) -> str:
    """Quote a path as ``java.net.URI`` does: ``toASCIIString()`` (``ascii_only``) or
    ``toString()``; ``%`` and every other illegal ASCII character become ``%XX`` (upper case)."""
    if ascii_only:
        path = unicodedata.normalize("NFC", path)
    out: list[str] = []
    for ch in path:
        if ch in _URI_PATH_SAFE:
            out.append(ch)
        elif ord(ch) < 0x80 or ascii_only or _java_space_or_control(ch):
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")))
        else:
            out.append(ch)  # toString() keeps other non-ASCII characters as they are
    return "".join(out)


def _java_space_or_control(ch: str) -> bool:
    """Java's ``Character.isSpaceChar(c) || Character.isISOControl(c)``."""
    return unicodedata.category(ch) in ("Zs", "Zl", "Zp") or 0x7F <= ord(ch) <= 0x9F


def qupath_file_uri(path: str | os.PathLike[str], *, ascii_only: bool = True) -> str:
    """The ``file:`` URI QuPath writes for ``path`` (Java's ``File.toURI()``).

    Image URIs in ``project.qpproj`` are ``toASCIIString()`` (``file:/data/x%20y.svs``,
    ``file:/C:/slides/a.svs``, non-ASCII as UTF-8 ``%XX``, as in the QuPath 0.3-0.7 projects of
    ``shared/data/qupath/projects``); the project's own ``uri`` is ``toString()``
    (``ascii_only=False``: non-ASCII letters kept). UNC paths get QuPath's ``file:////host/``.
    """
    posix = Path(os.path.abspath(path)).as_posix()
    if posix.startswith("//"):  # Windows UNC share: Java doubles the authority slashes
        posix = "//" + posix
    elif not posix.startswith("/"):  # C:/...
        posix = "/" + posix
    return "file:" + _quote_java(posix, ascii_only=ascii_only)


@dataclass(frozen=True)
class UriFix:
    """One image URI that :func:`fix_image_uris` rewrote in ``project.qpproj``."""

    entry_id: str
    name: str
    old: str
    new: str


def _replace_uris(node: Any, old: str, new: str) -> int:
    """Replace every ``"uri": old`` below ``node`` (QuPath's own ``updateURIs`` does the same)."""
    n = 0
    if isinstance(node, dict):
        if node.get("uri") == old:
            node["uri"] = new
            n += 1
        for key, value in node.items():
            if key != "metadata":
                n += _replace_uris(value, old, new)
    elif isinstance(node, list):
        for value in node:
            n += _replace_uris(value, old, new)
    return n


def fix_image_uris(project: QuPathProject) -> tuple[list[UriFix], Path | None]:
    """Point the URIs of images found elsewhere (moved project, ``--remap``) at their files.

    Headless QuPath (``QuPath script -p ...``) opens images only at their stored URIs, so a
    project that moved must say where the files are now. The entry's ``serverBuilder`` URIs are
    rewritten in the form QuPath writes (:func:`qupath_file_uri`); once every local image is
    found at its URI, the project's own ``uri`` is set to where the project is, as a QuPath save
    would (while some image is still missing it keeps the old one, which QuPath's *search
    relative* needs). ``project.qpproj`` is backed up first and replaced atomically; nothing is
    written when no image moved. Returns the fixes and the backup.
    """
    fixes = [
        UriFix(im.entry_id, im.name, im.uri, qupath_file_uri(im.path))
        for im in project.images
        if im.moved and im.path is not None and im.uri is not None
    ]
    fixes = [f for f in fixes if f.old != f.new]
    if not fixes:
        return [], None
    data = read_json(project.path, "QuPath project", "close QuPath and retry", allow_nan=True)
    by_id = {str(e.get("entryID", e.get("uniqueName"))): e for e in data.get("images", [])}
    for fix in fixes:
        entry = by_id.get(fix.entry_id)
        if entry is None or not _replace_uris(entry.get("serverBuilder"), fix.old, fix.new):
            raise ConicQPError(
                f"{project.path} changed while conic-qp was reading it (image {fix.entry_id}); "
                "close QuPath and retry"
            )
    fixed = {f.entry_id for f in fixes}
    missing = [
        im
        for im in project.images
        if im.uri is not None
        and uri_to_path_string(im.uri) is not None
        and not im.ok
        and im.entry_id not in fixed
    ]
    if not missing:
        data["uri"] = qupath_file_uri(project.path, ascii_only=False)
    backup = backup_file(project.path)
    write_json_atomic(project.path, data)
    for fix in fixes:
        log.info("image %s (%s): URI %s -> %s", fix.entry_id, fix.name, fix.old, fix.new)
    return fixes, backup


def write_project(
    project_dir: str | os.PathLike[str],
    image_paths: Sequence[str | os.PathLike[str]],
    *,
    names: Sequence[str] | None = None,
    version: str = "0.5.1",
    provider: str = BIOFORMATS_PROVIDER,
    overwrite: bool = False,
    as_if_at: str | None = None,
) -> Path:
    """Create a minimal QuPath project listing ``image_paths`` (for examples and tests).

    Writes only ``project.qpproj`` with what QuPath's loader requires (``version``,
    ``createTimestamp``, ``modifyTimestamp``, ``uri``, ``lastID``, ``images`` with a ``uri``
    serverBuilder); QuPath reads the image metadata and creates ``data/<id>/`` on first save.

    ``as_if_at`` (an absolute POSIX path) writes every URI as if the project folder were there,
    for a project shipped in a repository: no path of the machine that wrote it is stored, and
    because the images keep their place relative to the project's ``uri``, QuPath's *search
    relative* and :func:`read_project` find them wherever the folder is cloned (``conic-qp
    annotate`` then writes the real paths with :func:`fix_image_uris`). The images must lie
    inside ``project_dir`` for that.
    """
    project_dir = Path(project_dir)
    if as_if_at is not None and not PurePosixPath(as_if_at).is_absolute():
        raise ValueError(f"as_if_at must be an absolute POSIX path, got {as_if_at!r}")

    def uri_of(path: Path, ascii_only: bool = True) -> str:
        if as_if_at is None:
            return qupath_file_uri(path.resolve(), ascii_only=ascii_only)
        try:
            rel = path.resolve().relative_to(project_dir.resolve())
        except ValueError:
            raise ValueError(f"with as_if_at, {path} must lie inside {project_dir}") from None
        return "file:" + _quote_java(
            str(PurePosixPath(as_if_at) / rel.as_posix()), ascii_only=ascii_only
        )

    file = project_dir / PROJECT_FILE
    if file.exists() and not overwrite:
        raise ConicQPError(f"{file} already exists; pass overwrite=True or use another folder")
    if names is not None and len(names) != len(image_paths):
        raise ConicQPError("write_project: names and image_paths must have the same length")
    project_dir.mkdir(parents=True, exist_ok=True)
    now = int(time.time() * 1000)
    images = []
    for i, p in enumerate(image_paths, start=1):
        img = Path(p)
        if not img.is_file():
            raise ConicQPError(f"image {img} does not exist; cannot add it to a project")
        args = ["--series", "0"] if provider == BIOFORMATS_PROVIDER else []
        images.append(
            {
                "serverBuilder": {
                    "builderType": "uri",
                    "providerClassName": provider,
                    "uri": uri_of(img),
                    "args": args,
                },
                "entryID": i,
                "randomizedName": str(uuid.uuid4()),
                "imageName": names[i - 1] if names is not None else img.name,
                "metadata": {},
            }
        )
    data = {
        "version": version,
        "createTimestamp": now,
        "modifyTimestamp": now,
        "uri": uri_of(file, ascii_only=False),
        "lastID": len(images),
        "images": images,
    }
    if file.exists():
        backup_file(file)
    write_json_atomic(file, data)
    return file
