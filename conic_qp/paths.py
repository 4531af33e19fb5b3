"""Where outputs may go: safe file names from input data, containment, unique stems, writability.

Names that become paths come from data conic-qp does not control: QuPath entry ids and image
names, slide file names, GeoJSON feature names, OMERO image names. Three rules keep outputs
where they belong:

* :func:`safe_name` maps any such text to one harmless path component. A name that is already
  safe is kept as it is (so ``3``, ``slide A.svs`` or ``Gewebe_α`` stay readable); any other is
  cleaned and gets ``~`` plus 8 hex digits of a hash of the original text, so two different
  originals never share a result name and a run names a given input the same way every time.
* :func:`ensure_inside` proves that a path about to be written or deleted lies inside its output
  folder, after resolving ``..`` and symbolic links; the write and delete helpers of
  :mod:`conic_qp.sinks` call it when given their ``root``.
* :func:`unique_stems` gives every input of a batch its own output stem (two ``same.tif`` from
  different folders, names differing only in case on a case-insensitive disk, a stem already
  used in the output folder by another input).

:func:`check_writable` honours permission bits for every user, root included, and
:func:`temp_path` is the one naming rule for temporary files (pid and host inside, so
:func:`conic_qp.locks.clean_stale_temps` can tell a dead run's leftovers from a live run's).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
import unicodedata
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from conic_qp.errors import OutputError, UnsafePathError

__all__ = [
    "MAX_NAME_BYTES",
    "TempName",
    "check_output_dir",
    "check_writable",
    "ensure_inside",
    "file_identity",
    "file_stem",
    "host_tag",
    "parse_temp_name",
    "safe_name",
    "temp_path",
    "temp_prefix",
    "unique_stems",
]

#: Longest safe name in UTF-8 bytes: room for suffixes (``.nuclei.parquet``) and the temporary
#: name (:func:`temp_path`) within the 255 bytes most file systems allow per component.
MAX_NAME_BYTES = 120
_DIGEST = 8
_MAPPED = re.compile(rf"~[0-9a-f]{{{_DIGEST}}}$")
#: Characters that separate paths or that Windows forbids in names.
_FORBIDDEN = frozenset('/\\<>:"|?*')
_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{dev}{n}" for dev in ("COM", "LPT") for n in [*"123456789", "¹", "²", "³"]]
)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST]


def _is_unsafe_char(ch: str) -> bool:
    # C*: control, format (e.g. right-to-left override), surrogate, private, unassigned;
    # Zl/Zp: line and paragraph separators.
    return ch in _FORBIDDEN or unicodedata.category(ch)[0] == "C" or ch in "\u2028\u2029"


def _truncate(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", "ignore")


def _reserved(name: str) -> bool:
    return name.split(".", 1)[0].rstrip(" ").upper() in _RESERVED


def safe_name(text: object, *, max_bytes: int = MAX_NAME_BYTES) -> str:
    """Map ``text`` (an entry id, image, slide or feature name) to one safe path component.

    The result has no path separator (``/``, ``\\``), no character Windows forbids, no control or
    invisible formatting character, does not start or end with a dot or space (so never ``.``,
    ``..`` or a hidden file), is not a Windows device name (``CON``, ``nul.txt``), is not empty
    and fits in ``max_bytes`` UTF-8 bytes. Letters of any script are kept. A name that needs no
    change is returned unchanged; otherwise the cleaned name gets ``~`` and a hash of the
    original, so distinct originals give distinct results, deterministically.
    """
    if isinstance(text, bytes):
        raw = os.fsdecode(text)
    else:
        raw = text if isinstance(text, str) else str(text)
    if max_bytes < 2 * (_DIGEST + 2):
        raise ValueError(f"max_bytes must be at least {2 * (_DIGEST + 2)}, got {max_bytes}")
    clean = "".join("_" if _is_unsafe_char(ch) else ch for ch in unicodedata.normalize("NFC", raw))
    clean = clean.strip(" .")
    keep = (
        clean == raw
        and clean != ""
        and not _reserved(clean)
        and not _MAPPED.search(clean)
        and len(clean.encode("utf-8")) <= max_bytes
    )
    if keep:
        return clean
    base = _truncate(clean, max_bytes - _DIGEST - 1).rstrip(" ") or "_"
    if _reserved(base):
        base = "_" + base
    return f"{base}~{_digest(raw)}"


def file_stem(path: str | os.PathLike[str]) -> str:
    """A file's name without its extension (``.ome.tif``/``.ome.tiff`` count as one)."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if Path(name).suffix else name


def file_identity(path: str | os.PathLike[str]) -> str:
    """One spelling per file: symbolic links resolved, case folded where the OS folds it (two
    inputs with the same identity are the same file)."""
    return os.path.normcase(os.path.realpath(os.fspath(path)))


_identity = file_identity


def unique_stems(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    stem: Callable[[Path], str] = file_stem,
    taken: Mapping[str, str | os.PathLike[str]] | None = None,
) -> list[str]:
    """Output stems for ``inputs`` (same order), distinct for distinct files, stable across runs.

    Each stem is :func:`safe_name` of ``stem(path)``. Stems shared by different files (compared
    case-insensitively, as on macOS and Windows disks) all get ``~`` and a hash of the file's
    resolved path, independent of the order of the inputs. ``taken`` maps stems already used in
    the output folder to the input they belong to (e.g. from earlier runs' records); an input
    whose stem is taken by another file is disambiguated the same way, so a run never replaces
    another input's results, and an input recorded there already keeps its recorded stem (so
    ``--resume`` finds it whatever else the batch holds). The same file given twice gets the
    same stem both times (callers should drop the duplicate, :func:`file_identity`).
    """
    ids = [_identity(p) for p in inputs]
    recorded = {_identity(v): k for k, v in (taken or {}).items()}
    base = [safe_name(stem(Path(p))) for p in inputs]
    owners: dict[str, set[str]] = {}
    for b, ident in zip(base, ids, strict=True):
        owners.setdefault(b.casefold(), set()).add(ident)
    earlier = {k.casefold(): _identity(v) for k, v in (taken or {}).items()}
    out = []
    for b, ident in zip(base, ids, strict=True):
        if ident in recorded:
            out.append(recorded[ident])
            continue
        key = b.casefold()
        clash = len(owners[key]) > 1 or earlier.get(key, ident) != ident
        out.append(f"{b}~{_digest(ident)}" if clash else b)
    return out


def ensure_inside(
    root: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    allow_root: bool = False,
    link_ok: bool = False,
) -> Path:
    """``path`` made absolute, after proving it lies inside ``root``; else :class:`UnsafePathError`.

    ``..`` and symbolic links in the folders of ``path`` are resolved; the last component must be
    a plain name (not ``.`` or ``..``) and, if it is a symbolic link, must point inside ``root``
    too, unless ``link_ok`` (for callers that remove the link itself and never open through
    it). ``root`` itself counts only with ``allow_root`` (a delete helper must never remove its
    whole folder because a name was empty). The returned path keeps a final link unresolved.
    """
    text = os.fspath(path)
    if "\x00" in text or "\x00" in os.fspath(root):
        raise UnsafePathError(
            f"refusing to use the path {text!r}: it contains a NUL byte (a name in the input "
            "data is corrupt)"
        )
    base = Path(os.path.realpath(os.fspath(root)))
    p = Path(text)
    if not p.is_absolute():  # not os.path.abspath: '..' must be resolved after the links
        p = Path.cwd() / p
    if p.name in ("", ".", ".."):
        final = Path(os.path.realpath(p))
        points_to = final
    else:
        final = Path(os.path.realpath(p.parent)) / p.name  # a final link is kept, not followed
        points_to = Path(os.path.realpath(final)) if final.is_symlink() and not link_ok else final
    inside = all((q == base and allow_root) or base in q.parents for q in (final, points_to))
    if not inside:
        raise UnsafePathError(
            f"refusing to write or delete {text}: it lies outside {base} (a name taken from the "
            "input data contains '..' or an absolute path, or a symbolic link points elsewhere); "
            "rename the entry or remove the link"
        )
    return final


def _may_write(p: Path, st: os.stat_result) -> bool:
    """Permission bits as a user sees them; root honours them too (any write bit set)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return bool(st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(
            p, os.W_OK
        )
    return os.access(p, os.W_OK)


def check_writable(path: str | os.PathLike[str], *, what: str = "") -> Path:
    """Refuse (:class:`~conic_qp.errors.OutputError`) to write ``path`` if it is read-only.

    ``path`` is a folder to write into, or a file to replace (then its folder must be writable
    too, since files are replaced by renaming). The permission bits count for every user: root,
    who may write anything, is refused where nobody has a write bit, so ``chmod -R a-w`` protects
    a project from root as well. A probe file is then created and removed in the folder, which
    catches read-only mounts, ACLs and full quotas the bits do not show.
    """
    p = Path(path)
    label = f"{what} " if what else ""
    folder = p if p.is_dir() else p.parent
    checks = [folder] if folder == p else [p, folder]
    for q in checks:
        try:
            st = q.stat()
        except FileNotFoundError:
            if q is p:
                continue  # a new file: only its folder matters
            raise OutputError(
                f"cannot write {label}{p}: the folder {q} does not exist; create it first or "
                "choose another path",
                q,
            ) from None
        if not _may_write(q, st):
            raise OutputError(
                f"{label}{q} is read-only (no write permission); make it writable "
                "(chmod u+w) or write to a copy",
                q,
            )
    probe = temp_path(folder / ".conic-qp-probe")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError.from_os_error(exc, folder, what=what) from None
    return p


def check_output_dir(path: str | os.PathLike[str], *, what: str = "output folder") -> Path:
    """:func:`check_writable` for a folder that a run creates if needed: the folder itself when
    it exists, else the nearest existing folder above it (where it will be created), so a
    read-only place is refused before the first write, for root as for anyone."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(
            f"cannot use {p} as the {what}: it is a file, not a folder; choose another path", p
        )
    q = p.absolute()
    while not q.exists() and q != q.parent:
        q = q.parent
    check_writable(q, what=what)
    return p


# ---------------------------------------------------------------------------- temporary names


@dataclass(frozen=True)
class TempName:
    """A parsed temporary name: the file it stands in for and the run that made it."""

    target: str
    pid: int
    host: str
    kind: str


_TEMP = re.compile(
    r"^\.(?P<target>.+)\.cqp-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-z_]+\.(?P<kind>tmp|old)$"
)


def host_tag() -> str:
    """8 hex digits naming this machine in temporary names (the host name may not be safe)."""
    return _digest(socket.gethostname())


def temp_prefix(target: str | os.PathLike[str]) -> str:
    """``.<name>.cqp-<pid>-<host>-`` for :func:`tempfile.mkstemp` (suffix ``.tmp``)."""
    return f".{Path(target).name}.cqp-{os.getpid()}-{host_tag()}-"


def temp_path(target: str | os.PathLike[str], kind: str = "tmp") -> Path:
    """A fresh temporary path beside ``target``: ``.<name>.cqp-<pid>-<host>-<random>.<kind>``.

    ``kind`` is ``"tmp"`` (a file or folder being written) or ``"old"`` (a previous version
    moved aside while its replacement is put in place).
    """
    if kind not in ("tmp", "old"):
        raise ValueError(f"kind must be 'tmp' or 'old', got {kind!r}")
    t = Path(target)
    return t.parent / f"{temp_prefix(t)}{uuid.uuid4().hex[:8]}.{kind}"


def parse_temp_name(name: str) -> TempName | None:
    """The parts of a name made by :func:`temp_path`/:func:`temp_prefix`, else None."""
    m = _TEMP.match(name)
    if m is None:
        return None
    return TempName(m["target"], int(m["pid"]), m["host"], m["kind"])
