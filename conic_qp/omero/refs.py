"""OMERO object references: ``omero://host[:port]/image/ID`` and the URLs QuPath projects hold.

One typed :class:`OmeroRef` for every way an OMERO image (or a container of images) is named:

* conic-qp's own form ``omero://host[:port]/<image|dataset|project|plate>/ID`` (``omero-ice://``
  is accepted as a synonym);
* the web URLs the QuPath OMERO extensions store as an image's ``serverBuilder.uri`` in
  ``project.qpproj``, which are also what users copy from a browser: ``/webclient/?show=image-ID``
  (often URL-encoded as ``show%3Dimage-ID``), ``/webclient/img_detail/ID``,
  ``/webgateway/img_detail/ID``, ``/iviewer/?images=ID`` and the tile URLs
  ``/webgateway/render_image_region/ID/Z/T/`` (and ``render_image``); ``show=dataset-ID`` and
  ``show=project-ID`` name containers (patterns of qupath-extension-omero ``WebUtilities`` and
  the BIOP extension's ``OmeroRawImageServerBuilder``).

A web URL names the OMERO.web host; the Ice (Blitz) server is normally the same host on port
4064, which is what :attr:`OmeroRef.port` defaults to (``None``: use the default or
``--port``). Pure Python: no omero-py needed.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from conic_qp.errors import ConicQPError, option

__all__ = [
    "KINDS",
    "OmeroRef",
    "collect_refs",
    "is_omero_ref",
    "parse_ref",
    "refs_in_qupath_project",
]

Kind = Literal["image", "dataset", "project", "plate"]
KINDS: tuple[str, ...] = ("image", "dataset", "project", "plate")
SCHEMES: tuple[str, ...] = ("omero", "omero-ice")

_WEB_IMAGE = (
    re.compile(r"/webclient/\?(?:.*&)?show=image-(\d+)"),
    re.compile(r"/webclient/img_detail/(\d+)"),
    re.compile(r"/webgateway/img_detail/(\d+)"),
    re.compile(r"/iviewer/\?(?:.*&)?images=(\d+)"),
    re.compile(r"/(?:webgateway|webclient)/render_image(?:_region)?/(\d+)"),
)
_WEB_CONTAINER = re.compile(r"/webclient/\?(?:.*&)?show=(dataset|project|plate)-(\d+)")


@dataclass(frozen=True)
class OmeroRef:
    """An OMERO image or container of images, by id, optionally on a given server."""

    kind: Kind
    id: int
    host: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown OMERO object kind {self.kind!r}")
        if self.id < 1:
            raise ValueError(f"OMERO ids are positive, got {self.id}")

    @property
    def uri(self) -> str:
        """Canonical ``omero://host[:port]/kind/ID`` (``omero:///kind/ID`` without a host)."""
        netloc = self.host or ""
        if self.host and self.port is not None:
            netloc = f"{_bracket(self.host)}:{self.port}"
        elif self.host:
            netloc = _bracket(self.host)
        return f"omero://{netloc}/{self.kind}/{self.id}"

    def on(self, host: str | None, port: int | None) -> OmeroRef:
        """The same object, with the server filled in where this reference has none."""
        return OmeroRef(self.kind, self.id, self.host or host, self.port or port)

    def __str__(self) -> str:
        return self.uri


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def is_omero_ref(text: str) -> bool:
    """True when ``text`` looks like an OMERO reference (``omero://`` or an OMERO.web URL)."""
    try:
        parse_ref(text)
    except ConicQPError:
        return False
    return True


def parse_ref(text: str, default_kind: Kind | None = None) -> OmeroRef:
    """Parse an OMERO reference into an :class:`OmeroRef`.

    Parameters
    ----------
    text : ``omero://host[:port]/image/ID`` (or dataset/project/plate), an OMERO.web or
        QuPath-project URL (see the module docstring), or a bare id when ``default_kind`` is
        given (``--image 123``).
    default_kind : kind of a bare number.

    Raises
    ------
    ConicQPError
        Text that names no OMERO object.
    """
    raw = str(text).strip()
    if default_kind is not None and raw.isdigit():
        return OmeroRef(default_kind, int(raw))
    # QuPath projects store URIs URL-encoded ("show%3Dimage-12"); decode once before matching
    decoded = urllib.parse.unquote(raw)
    parts = urllib.parse.urlsplit(decoded)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        raise ConicQPError(
            f"{raw!r}: the port is not a number; use omero://host:4064/image/ID"
        ) from None
    host = parts.hostname or None
    if scheme in SCHEMES:
        m = re.fullmatch(r"/+(image|dataset|project|plate)s?/+(\d+)/*", parts.path or "")
        if m is None:
            raise ConicQPError(
                f"{raw!r} is not an OMERO reference; write omero://host[:port]/image/ID "
                "(or dataset/ID, project/ID, plate/ID)"
            )
        return OmeroRef(m.group(1), int(m.group(2)), host, port)  # type: ignore[arg-type]
    if scheme in ("http", "https"):
        where = parts.path + ("?" + parts.query if parts.query else "")
        for pattern in _WEB_IMAGE:
            hit = pattern.search(where)
            if hit:
                # the URL names OMERO.web; the Blitz port is not part of it
                return OmeroRef("image", int(hit.group(1)), host, None)
        hit = _WEB_CONTAINER.search(where)
        if hit:
            return OmeroRef(hit.group(1), int(hit.group(2)), host, None)  # type: ignore[arg-type]
    hint = (
        f"a bare id with {option('image')}/{option('dataset')}/..., "
        if default_kind is None
        else ""
    )
    raise ConicQPError(
        f"{raw!r} names no OMERO image; give {hint}omero://host/image/ID or an OMERO.web link "
        "such as https://host/webclient/?show=image-ID"
    )


def refs_in_qupath_project(path: str | Path) -> list[tuple[str, OmeroRef]]:
    """OMERO images of a QuPath project: ``(entry name, reference)`` for each OMERO entry.

    Reads ``project.qpproj`` as JSON (no QuPath needed); entries whose server builder URI is a
    file or an unrecognised URL are left out.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "project.qpproj"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConicQPError(f"QuPath project {p} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConicQPError(f"cannot read QuPath project {p} ({exc})") from None
    out: list[tuple[str, OmeroRef]] = []
    for entry in data.get("images", []) if isinstance(data, dict) else []:
        for uri in _builder_uris(entry.get("serverBuilder") if isinstance(entry, dict) else None):
            try:
                ref = parse_ref(uri)
            except ConicQPError:
                continue
            if ref.kind == "image":
                out.append((str(entry.get("imageName") or ref.uri), ref))
                break
    return out


def _builder_uris(builder: object) -> Iterable[str]:
    """URIs of a serverBuilder, including those of wrapped builders (rotated, pyramidalized)."""
    if not isinstance(builder, dict):
        return []
    uris: list[str] = []
    if isinstance(builder.get("uri"), str):
        uris.append(builder["uri"])
    for key in ("builder", "serverBuilder"):
        uris.extend(_builder_uris(builder.get(key)))
    return uris


def collect_refs(
    texts: Iterable[str] = (),
    *,
    images: Iterable[str | int] = (),
    datasets: Iterable[str | int] = (),
    projects: Iterable[str | int] = (),
    plates: Iterable[str | int] = (),
    qupath_project: str | Path | None = None,
) -> list[OmeroRef]:
    """All references given on a command line, in order, each once.

    ``texts`` are references in any form :func:`parse_ref` reads; ``images`` ... ``plates``
    are ids (or references of that kind); ``qupath_project`` adds the OMERO images of a QuPath
    project.

    Raises
    ------
    ConicQPError
        A malformed reference, one of the wrong kind, or no reference at all.
    """
    out: list[OmeroRef] = [parse_ref(t) for t in texts]
    for kind, values in (("image", images), ("dataset", datasets), ("project", projects),
                         ("plate", plates)):  # fmt: skip
        for v in values:
            ref = parse_ref(str(v), default_kind=kind)  # type: ignore[arg-type]
            if ref.kind != kind:
                raise ConicQPError(f"--{kind} {v}: that names a {ref.kind}, not a {kind}")
            out.append(ref)
    if qupath_project is not None:
        found = refs_in_qupath_project(qupath_project)
        if not found:
            raise ConicQPError(f"QuPath project {qupath_project} has no OMERO images")
        out.extend(r for _, r in found)
    if not out:
        raise ConicQPError(
            f"no OMERO image given: pass {option('image')} ID, {option('dataset')} ID, "
            f"{option('project')} ID, {option('plate')} ID or "
            "an omero://host/image/ID reference"
        )
    hosts = {r.host.lower() for r in out if r.host}
    if len(hosts) > 1:
        raise ConicQPError(
            f"the references name several servers ({', '.join(sorted(hosts))}); run one server "
            "at a time"
        )
    return list(dict.fromkeys(out))
