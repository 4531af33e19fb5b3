"""An OMERO image as a :class:`~conic_qp.slides.SlideSource`: pyramid tiles through RawPixelsStore.

Level choice and resampling are :class:`~conic_qp.slides.PyramidSource`'s, exactly as for files;
this module only lists the levels and reads level pixels. Facts of omero-py 5.23.0 it relies on:

* ``PixelsWrapper.getTiles`` reads full resolution only and unpacks with ``struct``; the
  RawPixelsStore (``conn.createRawPixelsStore()``, ``setPixelsId(id, True)``) reads any level.
* Resolution levels are inverted: ``getResolutionDescriptions()[0]`` is the full size and is
  selected with ``setResolutionLevel(levels - 1)``; images without a pyramid have one level
  and raise on ``setResolutionLevel``, so it is only called when there are several.
* Tile bytes are big-endian (``np.frombuffer(raw, '>u1' / '>u2')``); an RGB image is three
  channels (``SizeC == 3``, one ``getTile`` per channel) or, for some imports, one interleaved
  plane (``SizeC == 1`` and three bytes per pixel).
* ``image.getPixelSizeX(units="MICROMETER")`` converts the stored unit (without ``units`` it
  returns the stored value, e.g. in nanometres).

Tissue detection reads the thumbnail through the same path, so it uses a coarse level.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from conic_qp.errors import ConicQPError
from conic_qp.omero.connection import omero_errors
from conic_qp.pyramid import PyramidSource, not_rgb_error, pair_mpp, resolve_mpp

log = logging.getLogger(__name__)

__all__ = [
    "PIXEL_DTYPES",
    "OmeroSource",
    "decode_tile",
    "image_mpp",
    "level_order",
    "open_ref",
    "register_connection",
    "server_level",
    "tile_grid",
    "unregister_connection",
]

#: OMERO pixel types -> big-endian numpy dtypes of RawPixelsStore bytes.
PIXEL_DTYPES: dict[str, str] = {
    "int8": ">i1",
    "uint8": ">u1",
    "int16": ">i2",
    "uint16": ">u2",
    "int32": ">i4",
    "uint32": ">u4",
    "float": ">f4",
    "double": ">f8",
    "bit": ">u1",
}
#: Server tiles kept decoded (adjacent model tiles overlap by their halo).
TILE_CACHE = 64


# ------------------------------------------------------------------------- pure helpers


def level_order(descriptions: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of ``descriptions`` (``(sizeX, sizeY)``), largest first.

    OMERO lists full size first; sorting guards against a server that does not, so our level 0
    is always the full-resolution image.
    """
    return sorted(range(len(descriptions)), key=lambda i: -descriptions[i][0] * descriptions[i][1])


def server_level(description_index: int, n_levels: int) -> int:
    """The ``setResolutionLevel`` argument of ``getResolutionDescriptions()[index]``: OMERO
    numbers levels from the smallest (0) to the full size (``n_levels - 1``)."""
    if not 0 <= description_index < n_levels:
        raise ValueError(f"level {description_index} of {n_levels}")
    return n_levels - 1 - description_index


def tile_grid(
    x0: int, y0: int, x1: int, y1: int, tile: tuple[int, int], size: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Server tiles ``(x, y, w, h)`` of a level of ``size`` covering ``[x0, x1) x [y0, y1)``,
    aligned to the server's tile size (so repeated reads hit the same tiles)."""
    tw, th = tile
    width, height = size
    out = []
    for ty in range((y0 // th) * th, y1, th):
        for tx in range((x0 // tw) * tw, x1, tw):
            out.append((tx, ty, min(tw, width - tx), min(th, height - ty)))
    return out


def decode_tile(raw: bytes, pixel_type: str, w: int, h: int, samples: int = 1) -> np.ndarray:
    """RawPixelsStore bytes -> (h, w) or (h, w, samples) array in native byte order.

    Raises ValueError when the byte count does not match (a server/protocol problem).
    """
    dtype = np.dtype(PIXEL_DTYPES[pixel_type])
    expected = w * h * samples * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"tile of {w}x{h}x{samples} {pixel_type}: {len(raw)} bytes, not {expected}"
        )
    arr = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
    return arr.reshape((h, w, samples) if samples > 1 else (h, w))


def image_mpp(image: Any) -> float | None:
    """Level-0 um/px of an ImageWrapper (``None`` when unset or not a length)."""
    values = []
    for getter in (image.getPixelSizeX, image.getPixelSizeY):
        try:
            length = getter(units="MICROMETER")
        except Exception as exc:  # a unit without conversion to micrometres (e.g. PIXEL)
            log.warning("%s: pixel size is not a length (%s)", image.getName(), type(exc).__name__)
            length = None
        values.append(None if length is None else float(length.getValue()))
    return pair_mpp(*values)


# ------------------------------------------------------------------------------ the source


class OmeroSource(PyramidSource):
    """A SlideSource reading an OMERO image through its RawPixelsStore.

    Parameters
    ----------
    conn : a connected BlitzGateway (or anything with ``createRawPixelsStore`` and
        ``SERVICE_OPTS``).
    image : the ``ImageWrapper`` (``conn.getObject("Image", id)``).
    mpp : level-0 um/px overriding OMERO's pixel size (``--mpp``); required when it has none.
    force_mpp : accept an ``mpp`` outside the usual 0.1-2 um/px (``--force-mpp``).
    server : ``host:port`` for messages.
    name : display name (default ``"<image name> [image ID]"``).

    Raises
    ------
    ConicQPError
        Not 8-bit RGB, no pixel size without ``mpp``, or the server refused the pixels.
    """

    def __init__(
        self,
        conn: Any,
        image: Any,
        *,
        mpp: float | None = None,
        force_mpp: bool = False,
        server: str = "the server",
        name: str | None = None,
    ) -> None:
        self._conn = conn
        self.image_id = int(image.getId())
        self._name = name or f"{image.getName()} [image {self.image_id}]"
        self._server = server
        self._lock = threading.RLock()
        self._store: Any = None
        self._current_level: int | None = None
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._pixel_type = str(image.getPixelsType())
        self._size_c = int(image.getSizeC())
        if self._pixel_type != "uint8":
            raise not_rgb_error(self._name, f"{self._size_c}-channel {self._pixel_type} (OMERO)")
        if self._size_c not in (1, 3):
            raise not_rgb_error(self._name, f"{self._size_c}-channel {self._pixel_type} (OMERO)")
        if int(image.getSizeZ()) > 1 or int(image.getSizeT()) > 1:
            log.warning("%s has several Z/T planes; reading Z=0, T=0", self._name)
        self._mpp = resolve_mpp(self._name, image_mpp(image), mpp, force=force_mpp)
        pixels_id = int(image.getPixelsId())
        size = (int(image.getSizeX()), int(image.getSizeY()))
        with self._calls(f"opening the pixels of image {self.image_id}"):
            store = conn.createRawPixelsStore()
            store.setPixelsId(pixels_id, True, conn.SERVICE_OPTS)
            self._store = store
            n = int(store.getResolutionLevels())
            if n > 1:
                descs = [(int(d.sizeX), int(d.sizeY)) for d in store.getResolutionDescriptions()]
                order = level_order(descs)
                self._level_dims = [descs[i] for i in order]
                self._server_levels = [server_level(i, n) for i in order]
            else:
                self._level_dims = [size]
                self._server_levels = [0]
            tw, th = (int(v) for v in store.getTileSize())
        self._tile = (max(1, tw), max(1, th))
        self._n_levels = n
        if self._level_dims[0] != size:
            log.warning(
                "%s: pixels are %s but level 0 is %s", self._name, size, self._level_dims[0]
            )
        self._interleaved = False
        if self._size_c == 1:
            self._interleaved = self._probe_interleaved()
        try:
            self._read_level(len(self._level_dims) - 1, 0, 0, 1, 1)  # fail at open time
        except BaseException:
            self.close()
            raise
        log.debug(
            "opened OMERO image %d: levels %s, tile %s, %.4g um/px",
            self.image_id,
            self._level_dims,
            self._tile,
            self._mpp,
        )

    def _calls(self, what: str) -> Any:
        return omero_errors(what, self._server)

    def _probe_interleaved(self) -> bool:
        """A one-channel RGB import returns three bytes per pixel; a grey image one."""
        level = len(self._level_dims) - 1
        w, h = (min(a, b) for a, b in zip(self._tile, self._level_dims[level], strict=True))
        raw = self._get_tile(level, 0, 0, 0, w, h)
        if len(raw) == 3 * w * h:
            return True
        raise not_rgb_error(self._name, "1-channel uint8 (grey, OMERO)")

    def _get_tile(self, level: int, c: int, x: int, y: int, w: int, h: int) -> bytes:
        with self._lock, self._calls(f"reading pixels of image {self.image_id}"):
            if self._store is None:
                raise ConicQPError(f"{self._name} was closed; open it again to read")
            if self._n_levels > 1 and self._current_level != level:
                self._store.setResolutionLevel(self._server_levels[level], self._conn.SERVICE_OPTS)
                self._current_level = level
            return bytes(self._store.getTile(0, c, 0, x, y, w, h, self._conn.SERVICE_OPTS))

    def _tile_rgb(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        key = (level, x, y)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        try:
            if self._interleaved:
                rgb = decode_tile(self._get_tile(level, 0, x, y, w, h), "uint8", w, h, 3)
            else:
                planes = [
                    decode_tile(self._get_tile(level, c, x, y, w, h), "uint8", w, h)
                    for c in range(3)
                ]
                rgb = np.stack(planes, axis=-1)
        except ValueError as exc:  # wrong byte count: the server sent something else
            raise ConicQPError(f"OMERO at {self._server} sent a malformed tile ({exc})") from None
        with self._lock:
            self._cache[key] = rgb
            while len(self._cache) > TILE_CACHE:
                self._cache.popitem(last=False)
        return rgb

    def _read_level(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for tx, ty, tw, th in tile_grid(x0, y0, x1, y1, self._tile, self._level_dims[level]):
            rgb = self._tile_rgb(level, tx, ty, tw, th)
            ax0, ay0 = max(x0, tx), max(y0, ty)
            ax1, ay1 = min(x1, tx + tw), min(y1, ty + th)
            out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = rgb[
                ay0 - ty : ay1 - ty, ax0 - tx : ax1 - tx
            ]
        return out

    @property
    def tile_size(self) -> tuple[int, int]:
        """The server's tile size ``(w, h)``."""
        return self._tile

    def close(self) -> None:
        store, self._store = getattr(self, "_store", None), None
        if hasattr(self, "_cache"):
            self._cache.clear()
        if store is not None:
            try:
                store.close()
            except Exception as exc:  # the connection may be gone; nothing to release then
                log.debug("closing the RawPixelsStore failed: %s", type(exc).__name__)


# ------------------------------------------------------------- references (the cohort hook)

#: Open connections of this process by server; the commands register theirs, a Dask worker
#: logs in once per server (credentials from its environment or its ``omero login`` session).
_CONNECTIONS: dict[tuple[str, int | None], Any] = {}
_CONNECTIONS_LOCK = threading.Lock()


def register_connection(connection: Any) -> None:
    """Make ``connection`` (an open :class:`~conic_qp.omero.connection.OmeroConnection`) the one
    :func:`open_ref` uses for its server in this process."""
    c = connection.credentials
    with _CONNECTIONS_LOCK:
        _CONNECTIONS[(c.host.lower(), c.port)] = connection
        _CONNECTIONS[(c.host.lower(), None)] = connection


def unregister_connection(connection: Any) -> None:
    with _CONNECTIONS_LOCK:
        for key in [k for k, v in _CONNECTIONS.items() if v is connection]:
            del _CONNECTIONS[key]


def _connection_for(host: str | None, port: int | None) -> Any:
    """This process's connection to ``host``: a registered one, else a new login (once)."""
    from conic_qp.omero.connection import OmeroConnection, resolve_credentials

    with _CONNECTIONS_LOCK:
        if host is not None:
            for key in ((host.lower(), port), (host.lower(), None)):
                if key in _CONNECTIONS:
                    return _CONNECTIONS[key]
        elif len({id(v) for v in _CONNECTIONS.values()}) == 1:
            return next(iter(_CONNECTIONS.values()))
        conn = OmeroConnection(resolve_credentials(ref_host=host, ref_port=port))
        conn.connect()
        c = conn.credentials
        _CONNECTIONS[(c.host.lower(), c.port)] = conn
        _CONNECTIONS[(c.host.lower(), None)] = conn
        return conn


def open_ref(ref: Any, mpp: float | None = None, force_mpp: bool = False) -> OmeroSource:
    """Open an ``omero://host[:port]/image/ID`` :class:`~conic_qp.sources.SlideRef` (the
    ``omero`` scheme's opener, see :mod:`conic_qp.sources`)."""
    from conic_qp.omero.refs import parse_ref

    parsed = parse_ref(ref.location)
    if parsed.kind != "image":
        raise ConicQPError(
            f"{ref.location} is an OMERO {parsed.kind}, not an image; list its images first"
        )
    conn = _connection_for(parsed.host, parsed.port)
    gw = conn.gateway
    if conn.group_id is None:
        gw.SERVICE_OPTS.setOmeroGroup(-1)  # find the image in any of the user's groups
    with conn.call(f"looking up image {parsed.id}"):
        image = gw.getObject("Image", parsed.id)
    if image is None:
        raise ConicQPError(
            f"OMERO image {parsed.id} was not found on {conn.server}, or you have no permission "
            "to see it; check the id"
        )
    name = ref.name if ref.name and not ref.name.startswith("image ") else None
    return OmeroSource(gw, image, mpp=mpp, force_mpp=force_mpp, server=conn.server, name=name)
