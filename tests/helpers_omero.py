"""FAKE OMERO servants on 127.0.0.1, for the loopback tests (needs omero-py; import lazily).

These are fakes: they test the wire format and the object construction of conic-qp's OMERO code
(real Ice calls over TCP between two communicators, real omero-py proxies and model objects),
not an OMERO server's behaviour. What they implement:

* :class:`FakeRawPixelsStore` - a pyramid with OMERO's inverted level numbers, big-endian
  tile bytes, three channels or one interleaved plane; raises on ``setResolutionLevel`` when
  there is one level, like the real store for non-pyramid images;
* :class:`FakeUpdate` - IUpdate storing what it receives (ROI batches, annotations, links) in
  :class:`FakeDB` and giving ids;
* :class:`FakeShared` - SharedResources whose tables are omero-py's own server-side
  ``omero.tables.TableI`` on HDF5 (PyTables) files in a temp folder;
* :class:`FakeRawFileStore` - RawFileStore keeping the uploaded bytes;
* :class:`FakeQuery` / :class:`FakeRoiService` - the two queries conic-qp makes.

``deleteObjects`` is done in process by :class:`LoopbackConn` (the real one goes through the
command/callback machinery of a server). A servant told to ``drop`` closes the client's
connection forcibly, so the client sees a real ``Ice.ConnectionLostException``.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import Ice
import numpy as np
import omero
import omero.api
import omero.clients
import omero.columns
import omero.gateway
import omero.grid
import omero.hdfstorageV2
import omero.model
import omero.ObjectFactoryRegistrar as ofr
import omero.tables
import omero.util
import omero.util.concurrency
from omero.rtypes import rint, rlong, rstring, unwrap


def _communicator(server: bool) -> Any:
    props = Ice.createProperties()
    props.setProperty("Ice.Default.CollocationOptimized", "0")
    props.setProperty("Ice.RetryIntervals", "-1")  # a dropped call fails, as it would in a job
    props.setProperty("Ice.Warn.Connections", "0")
    props.setProperty("Ice.Warn.Dispatch", "0")  # the drop fake answers closed connections
    data = Ice.InitializationData()
    data.properties = props
    ic = Ice.initialize(data)
    ofr.registerObjectFactory(ic, None)  # omero.model classes arrive as their *I classes
    for of in omero.rtypes.ObjectFactories.values():
        of.register(ic)
    if server:  # what the OMERO.tables server registers: columns with PyTables conversions
        for of in omero.columns.ObjectFactories.values():
            of.register(ic)
    return ic


class Dropped(Exception):
    """Raised by a servant after it closed the caller's connection."""


def amd(cls: type) -> type:
    """OMERO's service operations are AMD (``op_async(_cb, ..., current)``): route each to the
    plain method of the fake and answer through the callback."""
    for name, fn in list(vars(cls).items()):
        if name.startswith("_") or not callable(fn) or not hasattr(cls, f"{name}_async"):
            continue

        def make(f: Callable[..., Any]) -> Callable[..., None]:
            def op_async(self: Any, _cb: Any, *args: Any) -> None:
                *params, current = args
                try:
                    result = f(self, *params, current)
                except Dropped:  # finish the dispatch; the reply has no connection to go to
                    _cb.ice_exception(Ice.ConnectionLostException())
                    return
                except Exception as exc:
                    _cb.ice_exception(exc)
                    return
                if result is None:
                    _cb.ice_response()
                else:
                    _cb.ice_response(result)

            return op_async

        setattr(cls, f"{name}_async", make(fn))
    # every other operation fails at once instead of leaving the caller waiting for a reply
    for base in cls.__mro__[1:]:
        for attr in vars(base):
            if attr.endswith("_async") and attr not in vars(cls):
                setattr(cls, attr, _not_implemented(attr[: -len("_async")]))
    return cls


def _not_implemented(op: str) -> Callable[..., None]:
    def op_async(self: Any, _cb: Any, *args: Any) -> None:
        _cb.ice_exception(omero.ApiUsageException(None, None, f"the fake does not implement {op}"))

    return op_async


@dataclass
class FakeDB:
    """What the fake server holds."""

    next_id: int = 1000
    rois: dict[int, Any] = field(default_factory=dict)
    annotations: dict[int, Any] = field(default_factory=dict)
    links: dict[int, set[int]] = field(default_factory=dict)  # image id -> annotation ids
    files: dict[int, Any] = field(default_factory=dict)
    file_bytes: dict[int, bytes] = field(default_factory=dict)
    tables: dict[int, str] = field(default_factory=dict)  # file id -> HDF5 path
    roi_batches: list[int] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    drop: dict[str, int] = field(default_factory=dict)  # operation -> calls before one drop
    drop_always: set[str] = field(default_factory=set)  # operations that always drop
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new_id(self) -> int:
        with self.lock:
            self.next_id += 1
            return self.next_id

    def maybe_drop(self, op: str, current: Any) -> None:
        """Close the caller's connection when ``op`` reached its drop count (or always)."""
        self.calls.append(op)
        left = self.drop.get(op)
        if op not in self.drop_always:
            if left is None:
                return
            if left > 0:
                self.drop[op] = left - 1
                return
            del self.drop[op]
        current.con.close(True)
        raise Dropped(op)


@amd
class FakeRawPixelsStore(omero.api.RawPixelsStore):
    """A pyramid: ``levels[0]`` full size; OMERO numbers it ``len(levels) - 1``."""

    def __init__(self, db: FakeDB, levels: list[np.ndarray], tile: tuple[int, int],
                 interleaved: bool = False, pixel_type: str = "uint8") -> None:  # fmt: skip
        self.db = db
        self.levels = levels
        self.tile = tile
        self.interleaved = interleaved
        self.dtype = np.dtype({"uint8": ">u1", "uint16": ">u2"}[pixel_type])
        self.level = len(levels) - 1
        self.tiles_read: list[tuple[int, int, int, int, int, int]] = []
        self.pixels_id: int | None = None

    def setPixelsId(self, pixelsId: int, bypass: bool, current: Any = None) -> None:
        self.pixels_id = int(pixelsId)
        self.level = len(self.levels) - 1

    def getResolutionLevels(self, current: Any = None) -> int:
        return len(self.levels)

    def getResolutionDescriptions(self, current: Any = None) -> list[Any]:
        return [omero.api.ResolutionDescription(a.shape[1], a.shape[0]) for a in self.levels]

    def setResolutionLevel(self, level: int, current: Any = None) -> None:
        if len(self.levels) == 1:
            raise omero.ApiUsageException(None, None, "not a pyramid")
        if not 0 <= level < len(self.levels):
            raise omero.ApiUsageException(None, None, f"no level {level}")
        self.level = int(level)

    def getTileSize(self, current: Any = None) -> list[int]:
        return list(self.tile)

    def getTile(self, z: int, c: int, t: int, x: int, y: int, w: int, h: int,
                current: Any = None) -> bytes:  # fmt: skip
        self.db.maybe_drop("getTile", current)
        arr = self.levels[len(self.levels) - 1 - self.level]
        self.tiles_read.append((self.level, c, x, y, w, h))
        if x < 0 or y < 0 or x + w > arr.shape[1] or y + h > arr.shape[0]:
            raise omero.ApiUsageException(None, None, "tile out of bounds")
        crop = arr[y : y + h, x : x + w]
        if self.interleaved:
            return np.ascontiguousarray(crop[..., :3]).astype(self.dtype).tobytes()
        plane = crop[..., c] if crop.ndim == 3 else crop
        return np.ascontiguousarray(plane).astype(self.dtype).tobytes()

    def close(self, current: Any = None) -> None:
        self.db.calls.append("rps.close")


@amd
class FakeUpdate(omero.api.IUpdate):
    def __init__(self, db: FakeDB) -> None:
        self.db = db

    def _save(self, obj: Any) -> Any:
        oid = self.db.new_id()
        obj.setId(rlong(oid))
        if isinstance(obj, omero.model.RoiI):
            for sh in obj.copyShapes():
                sh.setId(rlong(self.db.new_id()))
            self.db.rois[oid] = obj
        elif isinstance(obj, omero.model.OriginalFileI):
            self.db.files[oid] = obj
        elif isinstance(obj, omero.model.Annotation):
            self.db.annotations[oid] = obj
        return obj

    def saveAndReturnArray(self, graph: list[Any], current: Any = None) -> list[Any]:
        self.db.maybe_drop("saveAndReturnArray", current)
        if graph and isinstance(graph[0], omero.model.RoiI):
            self.db.roi_batches.append(len(graph))
        return [self._save(o) for o in graph]

    def saveAndReturnObject(self, obj: Any, current: Any = None) -> Any:
        self.db.maybe_drop("saveAndReturnObject", current)
        return self._save(obj)

    def saveArray(self, graph: list[Any], current: Any = None) -> None:
        self.db.maybe_drop("saveArray", current)
        with self.db.lock:
            for link in graph:
                image_id = unwrap(link.getParent().getId())
                ann_id = unwrap(link.getChild().getId())
                if ann_id not in self.db.annotations:
                    raise omero.ValidationException(None, None, f"no annotation {ann_id}")
                self.db.links.setdefault(image_id, set()).add(ann_id)


@amd
class FakeRawFileStore(omero.api.RawFileStore):
    def __init__(self, db: FakeDB) -> None:
        self.db = db
        self.file_id: int | None = None

    def setFileId(self, fileId: int, current: Any = None) -> None:
        self.file_id = int(fileId)
        self.db.file_bytes.setdefault(self.file_id, b"")

    def write(self, buf: bytes, position: int, length: int, current: Any = None) -> None:
        assert self.file_id is not None
        data = bytearray(self.db.file_bytes[self.file_id])
        data[position : position + length] = buf[:length]
        self.db.file_bytes[self.file_id] = bytes(data)

    def save(self, current: Any = None) -> Any:
        return self.db.files[self.file_id]

    def close(self, current: Any = None) -> None:
        self.file_id = None


class _TableFactory:
    """What ``omero.tables.TableI`` asks its session factory for."""

    def getAdminService(self) -> Any:
        class _Admin:
            def canUpdate(self, file_obj: Any, ctx: Any = None) -> bool:
                return True

        return _Admin()

    def ice_getIdentity(self) -> Any:
        return Ice.Identity("fake", "session-" + "0" * 36)

    def createRawFileStore(self, ctx: Any = None) -> Any:
        raise RuntimeError("the fake does not resize table files")


class FakeShared(omero.grid.SharedResources):
    """SharedResources whose tables are omero-py's server-side TableI (HDF5 via PyTables)."""

    def __init__(self, db: FakeDB, server_ic: Any, folder: str) -> None:
        self.db = db
        self.folder = folder
        self.ctx = omero.util.ServerContext(
            "fake", server_ic, omero.util.concurrency.get_event("t")
        )
        self.hdf = omero.hdfstorageV2.HdfList()
        self.servants: list[Any] = []

    def repositories(self, current: Any = None) -> Any:
        r = omero.grid.RepositoryMap()
        r.descriptions = [omero.model.OriginalFileI(1, False)]
        r.proxies = [None]
        return r

    def _table(self, fid: int, current: Any) -> Any:
        f = self.db.files[fid]
        t = omero.tables.TableI(self.ctx, f, self.db.tables[fid], _TableFactory(), self.hdf,
                                uuid=Ice.generateUUID(), adapter=current.adapter)  # fmt: skip
        self.servants.append(t)
        return omero.grid.TablePrx.uncheckedCast(current.adapter.add(t, t.id))

    def newTable(self, repo: int, name: str, current: Any = None) -> Any:
        self.db.maybe_drop("newTable", current)
        fid = self.db.new_id()
        f = omero.model.OriginalFileI(fid, True)
        f.setName(rstring(name))
        f.details.group = omero.model.ExperimenterGroupI(3, False)
        self.db.files[fid] = f
        self.db.tables[fid] = os.path.join(self.folder, f"table-{fid}.h5")
        return self._table(fid, current)

    def openTable(self, file: Any, current: Any = None) -> Any:
        return self._table(int(unwrap(file.getId())), current)


@amd
class FakeQuery(omero.api.IQuery):
    """Answers the two HQL queries made: conic-qp's ids of an image's ROIs with a given name,
    and omero-py's ``ImageWrapper._loadAnnotationLinks`` (links with annotations and files)."""

    def __init__(self, db: FakeDB) -> None:
        self.db = db

    def findAllByQuery(self, query: str, params: Any, current: Any = None) -> list[Any]:
        m = re.search(r"from ImageAnnotationLink as l .* where l.parent.id=(\d+)", query)
        assert m is not None and "left outer join fetch a.file" in query, query
        iid = int(m.group(1))
        links = []
        for aid in sorted(self.db.links.get(iid, set())):
            ann = self.db.annotations[aid]
            if isinstance(ann, omero.model.FileAnnotationI) and ann.getFile() is not None:
                ann.setFile(self.db.files.get(unwrap(ann.getFile().getId()), ann.getFile()))
            link = omero.model.ImageAnnotationLinkI(self.db.new_id(), True)
            link.setParent(omero.model.ImageI(iid, False))
            link.setChild(ann)
            links.append(link)
        return links

    def projection(self, query: str, params: Any, current: Any = None) -> list[Any]:
        assert "from Roi r where r.image.id = :iid and r.name = :name" in query, query
        iid, name = unwrap(params.map["iid"]), unwrap(params.map["name"])
        return [
            [rlong(rid)]
            for rid, roi in self.db.rois.items()
            if unwrap(roi.getImage().getId()) == iid and unwrap(roi.getName()) == name
        ]


@amd
class FakeRoiService(omero.api.IRoi):
    def __init__(self, db: FakeDB, extra: dict[int, list[Any]] | None = None) -> None:
        self.db = db
        self.extra = extra or {}

    def findByImage(self, imageId: int, opts: Any, current: Any = None) -> Any:
        res = omero.api.RoiResult()
        res.rois = list(self.extra.get(int(imageId), [])) + [
            r for r in self.db.rois.values() if unwrap(r.getImage().getId()) == int(imageId)
        ]
        return res


class LoopbackServer:
    """Two communicators on 127.0.0.1 and the fake servants; ``proxy(name, cls)`` for clients."""

    def __init__(self, folder: str | None = None) -> None:
        self.db = FakeDB()
        self.server = _communicator(server=True)
        self.adapter = self.server.createObjectAdapterWithEndpoints("fake", "tcp -h 127.0.0.1 -p 0")
        self.adapter.activate()
        self.port = self.adapter.getEndpoints()[0].getInfo().port
        self._tmp = tempfile.TemporaryDirectory(prefix="conic-qp-fake-omero-")
        self.folder = folder or self._tmp.name
        self.clients: list[Any] = []
        self.update = FakeUpdate(self.db)
        self.shared = FakeShared(self.db, self.server, self.folder)
        self.add("update", self.update)
        self.add("shared", self.shared)
        self.add("query", FakeQuery(self.db))
        self.roi_service = FakeRoiService(self.db)
        self.add("roi", self.roi_service)
        self.add("rawfile", FakeRawFileStore(self.db))

    def add(self, name: str, servant: Any) -> None:
        self.adapter.add(servant, Ice.stringToIdentity(name))

    def client(self) -> Any:
        ic = _communicator(server=False)
        self.clients.append(ic)
        return ic

    def proxy(self, ic: Any, name: str, cls: Any) -> Any:
        return cls.checkedCast(ic.stringToProxy(f"{name}:tcp -h 127.0.0.1 -p {self.port}"))

    def close(self) -> None:
        for ic in self.clients:
            ic.destroy()
        for t in self.shared.servants:
            if t.storage is not None:
                t.cleanup()
        self.server.destroy()
        self._tmp.cleanup()

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_table(self, fid: int) -> dict[str, list[Any]]:
        """Columns of a stored table, read back through a new TableI over the wire."""
        ic = self.client()
        shared = self.proxy(ic, "shared", omero.grid.SharedResourcesPrx)
        t = shared.openTable(omero.model.OriginalFileI(fid, False))
        try:
            heads = t.getHeaders()
            data = t.read(list(range(len(heads))), 0, t.getNumberOfRows())
            return {h.name: list(c.values) for h, c in zip(heads, data.columns, strict=True)}
        finally:
            t.close()


def make_image(
    image_id: int,
    size: tuple[int, int],
    *,
    size_c: int = 3,
    pixel_type: str = "uint8",
    mpp: float | None = 0.5,
    unit: str = "MICROMETER",
    name: str = "slide.svs",
    group_id: int = 3,
) -> Any:
    """A hand-built, loaded ``omero.model.ImageI`` with its primary pixels."""
    from omero.model.enums import UnitsLength

    img = omero.model.ImageI(image_id, True)
    img.setName(rstring(name))
    img.details.group = omero.model.ExperimenterGroupI(group_id, True)
    px = omero.model.PixelsI(image_id + 10_000, True)
    px.setSizeX(rint(size[0]))
    px.setSizeY(rint(size[1]))
    px.setSizeC(rint(size_c))
    px.setSizeZ(rint(1))
    px.setSizeT(rint(1))
    pt = omero.model.PixelsTypeI()
    pt.setValue(rstring(pixel_type))
    px.setPixelsType(pt)
    if mpp is not None:
        px.setPhysicalSizeX(omero.model.LengthI(mpp, getattr(UnitsLength, unit)))
        px.setPhysicalSizeY(omero.model.LengthI(mpp, getattr(UnitsLength, unit)))
    img.addPixels(px)
    return img


class FakeImageWrapper(omero.gateway.ImageWrapper):
    """omero-py's ImageWrapper; only the permission check is the fake's (no server to ask)."""

    def canAnnotate(self) -> bool:
        return True


class LoopbackConn:
    """Just enough of a BlitzGateway over the fakes; file uploads run omero-py's own
    ``BlitzGateway.createFileAnnfromLocalFile`` code against :class:`FakeRawFileStore`."""

    createFileAnnfromLocalFile = omero.gateway._BlitzGateway.createFileAnnfromLocalFile
    createOriginalFileFromLocalFile = omero.gateway._BlitzGateway.createOriginalFileFromLocalFile
    createOriginalFileFromFileObj = omero.gateway._BlitzGateway.createOriginalFileFromFileObj

    def __init__(self, server: LoopbackServer, images: dict[int, Any] | None = None,
                 pixels: dict[int, FakeRawPixelsStore] | None = None) -> None:  # fmt: skip
        self.server = server
        self.ic = server.client()
        self.SERVICE_OPTS = omero.gateway.ServiceOptsDict()
        self.images = images or {}
        self.pixels = pixels or {}
        self._update = server.proxy(self.ic, "update", omero.api.IUpdatePrx)
        self._shared = server.proxy(self.ic, "shared", omero.grid.SharedResourcesPrx)
        self._query = server.proxy(self.ic, "query", omero.api.IQueryPrx)
        self._roi = server.proxy(self.ic, "roi", omero.api.IRoiPrx)
        self.deleted: list[tuple[str, list[int]]] = []

    def getObject(self, kind: str, oid: int) -> Any:
        assert kind == "Image"
        obj = self.images.get(int(oid))
        if obj is None:
            return None
        obj.unloadAnnotationLinks()  # a server sends a fresh object each time
        return FakeImageWrapper(self, obj)

    def createRawPixelsStore(self) -> Any:
        # the servant of the image whose pixels are asked for is registered under its pixels id
        return _PixelsDispatch(self)

    def getUpdateService(self) -> Any:
        return self._update

    def getSharedResources(self) -> Any:
        return self._shared

    def getQueryService(self) -> Any:
        return self._query

    def getRoiService(self) -> Any:
        return self._roi

    def createRawFileStore(self) -> Any:
        return self.server.proxy(self.ic, "rawfile", omero.api.RawFileStorePrx)

    def deleteObjects(self, kind: str, ids: list[int], wait: bool = False) -> None:
        db = self.server.db
        self.deleted.append((kind, list(ids)))
        for i in ids:
            if kind == "Roi":
                db.rois.pop(i, None)
            elif kind == "Annotation":
                ann = db.annotations.pop(i, None)
                for links in db.links.values():
                    links.discard(i)
                if isinstance(ann, omero.model.FileAnnotationI) and ann.getFile() is not None:
                    db.files.pop(unwrap(ann.getFile().getId()), None)
            elif kind == "OriginalFile":
                db.files.pop(i, None)


class _PixelsDispatch:
    """Routes a RawPixelsStore proxy to the fake store of the pixels set with setPixelsId."""

    def __init__(self, conn: LoopbackConn) -> None:
        self.conn = conn
        self.prx: Any = None

    def setPixelsId(self, pid: int, bypass: bool, ctx: Any = None) -> None:
        name = f"pixels-{int(pid)}"
        self.prx = self.conn.server.proxy(self.conn.ic, name, omero.api.RawPixelsStorePrx)
        self.prx.setPixelsId(pid, bypass, ctx)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return getattr(self.prx, name)


def add_pixels(server: LoopbackServer, image: Any, store: FakeRawPixelsStore) -> None:
    """Serve ``store`` as the RawPixelsStore of ``image``'s pixels."""
    pid = unwrap(image.getPrimaryPixels().getId())
    server.add(f"pixels-{pid}", store)


# ---------------------------------------------------------------- Dask workers (other processes)


class RemoteServer:
    """The client side of a :class:`LoopbackServer` running in another process (a Dask worker
    reaches the test's fake servants over TCP); no database: workers only read pixels."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.db: Any = None

    def client(self) -> Any:
        return _communicator(server=False)

    def proxy(self, ic: Any, name: str, cls: Any) -> Any:
        return cls.checkedCast(ic.stringToProxy(f"{name}:tcp -h 127.0.0.1 -p {self.port}"))


#: logins made in this (worker) process by the fake: (credential source, user, host)
WORKER_LOGINS: list[tuple[str, str | None, str]] = []


def install_fake_login(port: int, images: dict[int, tuple[tuple[int, int], str]]) -> int:
    """In a Dask worker (``client.run``): every OMERO login of this process - made from the
    worker's own environment by ``resolve_credentials`` - gets a LoopbackConn to the test's
    fake servants instead of a Glacier2 session. ``images``: id -> ((width, height), name)."""
    from conic_qp.omero.connection import OmeroConnection

    def connect(self: Any) -> Any:
        c = self.credentials
        WORKER_LOGINS.append((c.source, c.user, c.server))
        built = {iid: make_image(iid, size, name=name) for iid, (size, name) in images.items()}
        self._gateway = LoopbackConn(RemoteServer(port), built)  # type: ignore[arg-type]
        self._owned = True
        return self._gateway

    OmeroConnection.connect = connect  # type: ignore[method-assign]
    return os.getpid()


def worker_logins() -> list[tuple[str, str | None, str]]:
    return list(WORKER_LOGINS)
