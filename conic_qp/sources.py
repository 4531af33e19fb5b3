"""Slides by reference: what to open (a :class:`SlideRef`) apart from how to open it.

A batch names its slides in many ways: files, folders, globs, ``.txt`` lists, QuPath project
entries, OMERO images (``omero://host/image/ID``, or the OMERO.web links QuPath projects store).
:func:`expand_refs` turns all of them into :class:`SlideRef` values, small frozen records that
serialise to JSON (a cohort ships them to other processes and machines and records them in its
manifest), and :func:`open_ref` opens one as a :class:`~conic_qp.slides.SlideSource` through the
opener registered for its scheme.

Schemes are registered with :func:`register_scheme`. ``file`` is built in. ``omero`` is
registered lazily: its opener (:func:`conic_qp.omero.source.open_ref`, on this process's
connection: the one a command registered, or a login from the environment / ``omero login``
session, e.g. on a Dask worker) and expander (:func:`conic_qp.omero.jobs.expand_ref`) are named
as ``"module:function"`` strings and only imported when an OMERO reference appears, so the OMERO
extra is needed only by users of OMERO.
The contract for a scheme's functions:

* ``parse(text) -> SlideRef | None``: recognise a reference written as text (``None``: not
  this scheme's);
* ``open(ref, mpp=None) -> SlideSource``: open it, ``mpp`` overriding the slide's metadata;
* ``expand(ref) -> list[SlideRef]`` (optional): the images of a container reference (an OMERO
  dataset), called by :func:`expand_refs`.

Calibration: a reference may carry the pixel size of the place that referenced it (a QuPath
project's ``pixelCalibration``). It is used only when the slide's own metadata has none that is
plausible, never over it, and never over an explicit ``mpp``.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlparse

from conic_qp.errors import ConicQPError, MppError
from conic_qp.slides import DICOM_SUFFIXES, SLIDE_SUFFIXES, is_dicom_folder

if TYPE_CHECKING:
    from conic_qp.qupath.project import ProjectImage, QuPathProject
    from conic_qp.slides import SlideSource

log = logging.getLogger(__name__)

__all__ = [
    "DICOM_SUFFIXES",
    "SLIDE_SUFFIXES",
    "Scheme",
    "SlideRef",
    "expand_refs",
    "is_dicom_folder",
    "open_ref",
    "parse_ref",
    "project_refs",
    "register_scheme",
    "registered_schemes",
]

FILE = "file"
OMERO = "omero"

_REF_VERSION = 1


@dataclass(frozen=True)
class SlideRef:
    """A slide named by a scheme and a location, plus where the name came from.

    Attributes
    ----------
    scheme : ``"file"``, ``"omero"`` or any registered scheme.
    location : for files the path as given (a folder for a multi-file DICOM slide); for other
        schemes the canonical URI (``omero://host:port/image/ID``).
    name : display name (file name, QuPath image name).
    mpp : calibration from the referencing project, used only when the slide's own metadata
        has no plausible um/px (see the module docstring).
    project : the QuPath project file the reference comes from, if any.
    entry_id : its entry id in that project.
    problem : why this reference cannot be opened (an image file the project points to that
        was not found); :func:`open_ref` raises it, so a batch records it as that slide's
        failure instead of dropping the slide.
    """

    scheme: str
    location: str
    name: str = ""
    mpp: float | None = None
    project: str | None = None
    entry_id: str | None = None
    problem: str | None = None

    def __post_init__(self) -> None:
        if not self.scheme or not isinstance(self.location, str):
            raise ValueError(f"a SlideRef needs a scheme and a location, got {self!r}")
        if not self.name:
            object.__setattr__(self, "name", _default_name(self.scheme, self.location))

    @classmethod
    def file(cls, path: str | os.PathLike[str], **kw: Any) -> SlideRef:
        """A reference to a slide file (or DICOM folder)."""
        return cls(FILE, os.fspath(path), **kw)

    @property
    def is_file(self) -> bool:
        return self.scheme == FILE

    @property
    def path(self) -> Path:
        """The file of a ``file`` reference (ValueError for other schemes)."""
        if not self.is_file:
            raise ValueError(f"{self.uri} is not a file reference")
        return Path(self.location)

    @property
    def uri(self) -> str:
        """``file:///abs/path`` for files (percent-encoded), the location for other schemes."""
        if not self.is_file:
            return self.location
        posix = Path(self.location).expanduser().absolute().as_posix()
        return "file://" + quote(posix if posix.startswith("/") else "/" + posix)

    @property
    def label(self) -> str:
        """How the user named it: the path as given for files, else the URI (failure keys)."""
        return self.location

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        data["version"] = _REF_VERSION
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlideRef:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields - {"version"}
        if unknown:
            raise ValueError(f"unknown SlideRef fields {sorted(unknown)}")
        kw = {k: v for k, v in data.items() if k in fields}
        if kw.get("mpp") is not None:
            kw["mpp"] = float(kw["mpp"])
        return cls(**kw)

    def __str__(self) -> str:
        return self.label


def _default_name(scheme: str, location: str) -> str:
    if scheme == FILE:
        return Path(location).name or location
    parsed = urlparse(location)
    tail = parsed.path.rstrip("/").rsplit("/", 2)[-2:]
    return " ".join(tail) if tail and tail[0] else location


# ------------------------------------------------------------------------------ the registry

Opener = Callable[..., "SlideSource"]
Parser = Callable[[str], "SlideRef | None"]
Expander = Callable[[SlideRef], "list[SlideRef]"]


@dataclass(frozen=True)
class Scheme:
    """How references of one scheme are recognised, opened and expanded.

    Each function may be given as ``"module:function"``, imported on first use (so optional
    dependencies load only when a reference of that scheme appears). ``requires`` names the
    modules that must exist for the scheme to work and ``install`` says how to get them, for
    the one-line error otherwise.
    """

    name: str
    open: Opener | str
    parse: Parser | str | None = None
    expand: Expander | str | None = None
    requires: tuple[str, ...] = ()
    install: str = ""


_SCHEMES: dict[str, Scheme] = {}


def register_scheme(
    name: str,
    open: Opener | str,
    *,
    parse: Parser | str | None = None,
    expand: Expander | str | None = None,
    requires: Sequence[str] = (),
    install: str = "",
) -> Scheme:
    """Register (or replace) how references of scheme ``name`` are parsed, opened, expanded.

    This is the hook for new sources: an OMERO (or DICOMweb, or cloud) module registers its
    opener here, or is named lazily as ``"module:function"``.
    """
    scheme = Scheme(name, open, parse, expand, tuple(requires), install)
    _SCHEMES[name] = scheme
    return scheme


def registered_schemes() -> dict[str, Scheme]:
    return dict(_SCHEMES)


def _scheme(name: str) -> Scheme:
    try:
        return _SCHEMES[name]
    except KeyError:
        known = ", ".join(sorted(_SCHEMES))
        raise ConicQPError(f"unknown slide reference scheme {name!r} (known: {known})") from None


def _available(scheme: Scheme) -> bool:
    for mod in scheme.requires:
        try:
            if importlib.util.find_spec(mod) is None:
                return False
        except (ImportError, ValueError):  # a parent package is missing
            return False
    return True


def _resolve(func: Callable[..., Any] | str, scheme: Scheme) -> Callable[..., Any]:
    if callable(func):
        return func
    module, _, attr = func.partition(":")
    if not _available(scheme):
        raise ConicQPError(
            f"{scheme.name} references need {', '.join(scheme.requires)}, which this "
            f"installation lacks{'; ' + scheme.install if scheme.install else ''}"
        )
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConicQPError(
            f"{scheme.name} references cannot be opened by this installation ({func}: {exc})"
            f"{'; ' + scheme.install if scheme.install else ''}"
        ) from None
    if not callable(target):
        raise TypeError(f"{func} is not callable")
    return target


def parse_ref(text: str) -> SlideRef | None:
    """A non-file reference written as text (``omero://...``, an OMERO.web link), else None."""
    text = str(text).strip()
    for scheme in _SCHEMES.values():
        if scheme.name == FILE or scheme.parse is None:
            continue
        parse = scheme.parse if callable(scheme.parse) else _resolve(scheme.parse, scheme)
        ref = parse(text)
        if ref is not None:
            return ref
    return None


def open_ref(ref: SlideRef, mpp: float | None = None, **options: Any) -> SlideSource:
    """Open ``ref`` as a SlideSource (``mpp``: level-0 um/px overriding the metadata).

    Raises
    ------
    ConicQPError
        The reference's ``problem``, or anything its opener raises for bad input.
    """
    if ref.problem:
        raise ConicQPError(ref.problem)
    scheme = _scheme(ref.scheme)
    opener = _resolve(scheme.open, scheme)
    if mpp is not None or ref.mpp is None:
        return opener(ref, mpp=mpp, **options)
    try:
        return opener(ref, mpp=None, **options)
    except MppError:
        from conic_qp.slides import MPP_RANGE

        lo, hi = MPP_RANGE
        if not lo <= ref.mpp <= hi:
            raise
        log.warning(
            "%s: no usable um/px in the image; using the project's pixel size %.4g um/px",
            ref.name,
            ref.mpp,
        )
        return opener(ref, mpp=ref.mpp, **options)


# -------------------------------------------------------------------------------- files


def _open_file(ref: SlideRef, mpp: float | None = None, **options: Any) -> SlideSource:
    from conic_qp.slides import open_slide

    return open_slide(ref.path, mpp=mpp, **options)


def _is_slide_name(p: Path) -> bool:
    return not p.name.startswith(".") and p.suffix.lower() in SLIDE_SUFFIXES


def _folder_slides(folder: Path) -> list[Path]:
    """Slides in a folder: its slide files, and its sub-folders that are DICOM slides."""
    if is_dicom_folder(folder):
        return [folder]
    files = sorted(q for q in folder.iterdir() if q.is_file() and _is_slide_name(q))
    dicom_dirs = sorted(
        q
        for q in folder.iterdir()
        if q.is_dir() and not q.name.startswith(".") and is_dicom_folder(q)
    )
    return files + dicom_dirs


def _file_uri_path(text: str) -> str | None:
    if not text.lower().startswith("file:"):
        return None
    from conic_qp.qupath.project import uri_to_path_string

    return uri_to_path_string(text)


def expand_refs(
    items: Iterable[str | os.PathLike[str] | SlideRef],
    *,
    remap: Mapping[str, str] | Iterable[str] | None = None,
) -> tuple[list[SlideRef], dict[str, str]]:
    """References from files, folders, globs, ``.txt`` lists, QuPath projects and URIs.

    * a folder: its slide files (:data:`SLIDE_SUFFIXES`), or the folder itself when it is a
      DICOM slide (:func:`is_dicom_folder`);
    * a ``.txt`` file: one reference per line (paths relative to the list; ``#`` comments);
    * a ``.qpproj`` file: every image of the QuPath project (:func:`project_refs`; ``remap``
      applies), including OMERO images and, as references with a ``problem``, images whose
      file is missing;
    * a glob (``slides/**/*.svs``), a ``file:`` URI, a registered scheme's reference
      (``omero://host/image/ID``), or a plain path.

    Returns the unique references in order and, for inputs that matched nothing, a message
    each, so a batch can report them as failures instead of stopping.
    """
    refs: list[SlideRef] = []
    seen: set[tuple[str, str, str | None, str | None]] = set()
    missing: dict[str, str] = {}

    def add(ref: SlideRef) -> None:
        key = (ref.scheme, ref.location, ref.project, ref.entry_id)
        if key not in seen:
            seen.add(key)
            refs.append(ref)

    def add_one(
        item: str | os.PathLike[str] | SlideRef, base: Path | None, listed_in: Path | None
    ) -> None:
        if isinstance(item, SlideRef):
            for ref in _expand_scheme(item):
                add(ref)
            return
        text = os.fspath(item)
        parsed = parse_ref(text) if "://" in text or text.lower().startswith("http") else None
        if parsed is not None:
            for ref in _expand_scheme(parsed):
                add(ref)
            return
        from_uri = _file_uri_path(text)
        p = Path(from_uri if from_uri is not None else text).expanduser()
        if base is not None and not p.is_absolute():
            p = base / p
        if p.is_dir():
            found = _folder_slides(p)
            if not found:
                missing[text] = f"folder {p} holds no slide files ({', '.join(SLIDE_SUFFIXES)})"
            for q in found:
                add(SlideRef.file(q))
        elif p.suffix.lower() == ".txt" and p.is_file():
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    add_one(line, p.parent, p)
        elif p.suffix.lower() == ".qpproj" and p.is_file():
            _, project = project_refs(p, remap=remap)
            for ref in project:
                add(ref)
        elif p.exists():
            add(SlideRef.file(p))
        elif glob.has_magic(text) and listed_in is None:
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
            matches = [m for m in matches if m.is_file() or is_dicom_folder(m)]
            if not matches:
                missing[text] = f"no file matches {text}"
            for m in matches:
                add(SlideRef.file(m))
        elif listed_in is not None:
            missing[text] = f"{p} (listed in {listed_in}) does not exist"
        else:
            missing[text] = f"slide file {p} does not exist; check the path"

    for item in items:
        add_one(item, None, None)
    return refs, missing


def _expand_scheme(ref: SlideRef) -> list[SlideRef]:
    scheme = _SCHEMES.get(ref.scheme)
    if scheme is None or scheme.expand is None or not _available(scheme):
        return [ref]
    return list(_resolve(scheme.expand, scheme)(ref))


# ------------------------------------------------------------------------------- QuPath


def image_ref(project: QuPathProject, image: ProjectImage) -> SlideRef:
    """The reference of one QuPath project entry.

    A local file that was found becomes a ``file`` reference; an image served by OMERO (the
    ``omero:`` or OMERO.web URI QuPath's OMERO extensions store) becomes an OMERO reference; an
    image that cannot be processed keeps its problem, to be reported as that image's failure.
    """
    common: dict[str, Any] = {
        "name": image.name,
        "mpp": image.mpp,
        "project": str(project.path),
        "entry_id": image.entry_id,
    }
    if image.ok and image.path is not None:
        return SlideRef.file(image.path, **common)
    if image.uri and image.builder_type in ("uri", "pyramidize"):
        parsed = parse_ref(image.uri)
        if parsed is not None:
            return dataclasses.replace(parsed, **common)
    location = str(image.path) if image.path is not None else (image.uri or image.name)
    problem = image.problem_template or image.problem or f"image {image.name} cannot be opened"
    return SlideRef(FILE, location, problem=problem, **common)


def project_refs(
    project: str | os.PathLike[str] | QuPathProject,
    *,
    remap: Mapping[str, str] | Iterable[str] | None = None,
    images: Iterable[str] | None = None,
) -> tuple[QuPathProject, list[SlideRef]]:
    """A QuPath project and the references of its images (``images``: entry ids or names)."""
    from conic_qp.qupath.project import QuPathProject, read_project

    qp = project if isinstance(project, QuPathProject) else read_project(project, remap=remap)
    selected = qp.select(list(images) if images is not None else None)
    return qp, [image_ref(qp, im) for im in selected]


# --------------------------------------------------------------------------- built-ins


def _omero_parse(text: str) -> SlideRef | None:
    """OMERO references, parsed by :func:`conic_qp.omero.refs.parse_ref` (pure Python).

    Containers (datasets, projects, plates) become references that the OMERO module's expander
    lists. Without that module only the ``omero://`` form is recognised (opening it then says
    what to install), so an OMERO reference is never mistaken for a missing file.
    """
    try:
        found = importlib.util.find_spec("conic_qp.omero.refs") is not None
    except ImportError:
        found = False
    if not found:
        lowered = text.lower()
        return SlideRef(OMERO, text) if lowered.startswith(("omero://", "omero-ice://")) else None
    refs = importlib.import_module("conic_qp.omero.refs")
    try:
        parsed = refs.parse_ref(text)
    except ConicQPError:
        return None
    return SlideRef(OMERO, str(parsed.uri))


register_scheme(FILE, _open_file)
register_scheme(
    OMERO,
    "conic_qp.omero.source:open_ref",
    parse=_omero_parse,
    expand="conic_qp.omero.jobs:expand_ref",
    requires=("omero", "conic_qp.omero.source"),
    install="install the omero extra: pip install 'conic-qp[omero]'",
)
