"""Class 1, 2 and 4 of the data-safety issue: names from input data, containment, unique output
stems, read-only folders (also for root)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conic_qp.errors import ConicQPError, OutputError, UnsafePathError
from conic_qp.paths import (
    MAX_NAME_BYTES,
    check_writable,
    ensure_inside,
    parse_temp_name,
    safe_name,
    temp_path,
    unique_stems,
)
from conic_qp.sinks import atomic_path, remove_inside, replace_dir, write_json_atomic

HOSTILE = [
    "../../../x",
    "..",
    ".",
    "",
    "/etc/passwd",
    "C:\\Windows\\system32",
    "..\\..\\x",
    "a/b",
    "a\\b",
    "a\x00b",
    "\x00",
    "CON",
    "nul.txt",
    "com1",
    "LPT9.geojson",
    " lead and trail. ",
    ".hidden",
    "tab\there",
    "line\nbreak",
    "rtl\u202eexe.txt",
    "x" * 400,
    "é" * 200,
    'a:b*c?d|e<f>g"h',
    "\udcff-surrogate",
    "3~0123abcd",  # looks like a name safe_name itself produced
]


def _is_safe_component(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and not any(ch in name for ch in '/\\<>:"|?*\x00')
        and not name.startswith((".", " "))
        and not name.endswith((".", " "))
        and name.split(".")[0].upper() not in {"CON", "PRN", "AUX", "NUL", "COM1", "LPT9"}
        and len(name.encode("utf-8")) <= MAX_NAME_BYTES
        and all(ch.isprintable() for ch in name)
    )


@pytest.mark.parametrize("text", HOSTILE)
def test_safe_name_is_one_harmless_component(tmp_path: Path, text: str) -> None:
    name = safe_name(text)
    assert _is_safe_component(name), repr(name)
    assert Path(name).name == name and len(Path(name).parts) == 1
    target = tmp_path / name
    assert ensure_inside(tmp_path, target) == target  # proves it stays in the folder
    write_json_atomic(target, {"ok": 1}, root=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert safe_name(text) == name  # deterministic


def test_safe_name_keeps_safe_names_and_unicode() -> None:
    for text in ["3", "slide A.svs", "Gewebe_α", "組織-1", "CMU-1-Small-Region", "a.b.c", "x~y"]:
        assert safe_name(text) == text
    assert safe_name(17) == "17"
    # changed names keep their readable part and get a hash of the original
    assert safe_name("../../../x").startswith("_.._.._x~")
    assert safe_name("a/b").startswith("a_b~")


def test_safe_name_never_merges_different_originals() -> None:
    texts = [*HOSTILE, "a_b", "a/b", "a\\b", "a:b", "_", "CON~"]
    names = [safe_name(t) for t in texts]
    assert len(set(names)) == len(set(texts))
    # NFD and NFC spellings of the same word are different originals: different names
    assert safe_name("e\u0301") != safe_name("\u00e9") == "\u00e9"


def test_ensure_inside_refuses_escapes(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    outside = tmp_path / "user-file.txt"
    outside.write_text("precious")
    for bad in [
        root / "../../../x",
        root / ".." / "user-file.txt",
        Path("/etc/passwd"),
        root / "a" / ".." / ".." / "user-file.txt",
        str(root) + "/\x00x",
    ]:
        with pytest.raises(UnsafePathError):
            ensure_inside(root, bad)
    # the root itself counts only when allowed (a delete must never take the whole folder)
    with pytest.raises(UnsafePathError):
        ensure_inside(root, root)
    assert ensure_inside(root, root, allow_root=True) == root.resolve()
    # a link inside the folder that points outside, as a folder or as the last component
    (root / "sub").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(UnsafePathError):
        ensure_inside(root, root / "sub" / "user-file.txt")
    (root / "link.txt").symlink_to(outside)
    with pytest.raises(UnsafePathError):
        ensure_inside(root, root / "link.txt")
    # '..' is resolved after the link, as the OS does: sub/.. is tmp_path, outside root
    with pytest.raises(UnsafePathError):
        ensure_inside(root, root / "sub" / ".." / "x")
    inner = root / "inner"
    inner.mkdir()
    (root / "ok-link").symlink_to(inner, target_is_directory=True)
    assert ensure_inside(root, root / "ok-link" / "f") == root.resolve() / "inner" / "f"
    assert outside.read_text() == "precious"


def test_write_and_delete_helpers_stay_inside(tmp_path: Path) -> None:
    root = tmp_path / "project" / "conic-qp"
    root.mkdir(parents=True)
    victim = tmp_path / "x"
    victim.write_text("user data")
    evil = root / "../../../x"  # the entry id of the issue, relative to conic-qp/
    with pytest.raises(UnsafePathError):
        write_json_atomic(root / ".." / ".." / "x", {"a": 1}, root=root)
    with pytest.raises(UnsafePathError):
        with atomic_path(evil, root=root):
            pass
    with pytest.raises(UnsafePathError):
        remove_inside(root, root / ".." / ".." / "x")
    with pytest.raises(UnsafePathError):
        remove_inside(root, root)
    tmp_dir = root / "new"
    tmp_dir.mkdir()
    with pytest.raises(UnsafePathError):
        replace_dir(tmp_dir, root / ".." / "elsewhere", root=root)
    assert victim.read_text() == "user data"
    assert not (tmp_path / "elsewhere").exists()
    # inside, they work, and a link is removed, not followed
    f = write_json_atomic(root / "a.json", {"a": 1}, root=root)
    (root / "to-a").symlink_to(root / "a.json")
    assert remove_inside(root, root / "to-a") and f.exists()
    (root / "to-victim").symlink_to(victim)  # removing a link to outside removes only the link
    with pytest.raises(UnsafePathError):
        write_json_atomic(root / "to-victim", {"a": 1}, root=root)
    assert remove_inside(root, root / "to-victim") and victim.read_text() == "user data"
    assert remove_inside(root, f) and not f.exists()
    assert not remove_inside(root, f)


def test_unique_stems_separate_same_names_deterministically(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = tmp_path / "a" / "same.tif", tmp_path / "b" / "same.tif"
    c = tmp_path / "b" / "other.svs"
    for p in (a, b, c):
        p.write_bytes(b"x")
    stems = unique_stems([a, b, c])
    assert len(set(stems)) == 3 and stems[2] == "other"
    assert all(s.startswith("same~") for s in stems[:2])
    assert unique_stems([b, c, a]) == [stems[1], stems[2], stems[0]]  # order-independent
    # case-insensitive disks: 'Slide' and 'slide' would be one file
    up, low = tmp_path / "a" / "Slide.svs", tmp_path / "b" / "slide.svs"
    up.write_bytes(b"x")
    low.write_bytes(b"x")
    s1, s2 = unique_stems([up, low])
    assert s1.casefold() != s2.casefold()
    # a link and its target are the same file: same stem
    (tmp_path / "c").mkdir()
    link = tmp_path / "c" / "same.tif"
    link.symlink_to(a)
    assert unique_stems([a, link]) == ["same", "same"]
    # a stem another input already used in the output folder is not reused
    (new,) = unique_stems([c], taken={"other": str(tmp_path / "a" / "other.svs")})
    assert new.startswith("other~")
    assert unique_stems([c], taken={"other": str(c)}) == ["other"]
    # hostile file names become safe stems
    (stem,) = unique_stems([tmp_path / "..\\..\\evil.tif"])
    assert "\\" not in stem and not stem.startswith(".")


def test_temp_names_carry_pid_and_host(tmp_path: Path) -> None:
    t = temp_path(tmp_path / "s.nuclei.parquet")
    parsed = parse_temp_name(t.name)
    assert parsed is not None and parsed.pid == os.getpid() and parsed.kind == "tmp"
    assert parsed.target == "s.nuclei.parquet"
    assert parse_temp_name("s.nuclei.parquet") is None
    assert parse_temp_name(".s.nuclei.parquet.1234.tmp") is None  # not ours: never touched
    with atomic_path(tmp_path / "r.json") as tmp:
        seen = parse_temp_name(tmp.name)
        tmp.write_text("{}")
    assert seen is not None and seen.target == "r.json" and seen.pid == os.getpid()


def _read_only_tree(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _writable_tree(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_read_only_folders_are_refused_for_every_user(tmp_path: Path) -> None:
    """``chmod -R a-w`` protects a folder from conic-qp even when it runs as root."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "a.json").write_text("{}")
    assert check_writable(folder) == folder
    assert check_writable(folder / "a.json") == folder / "a.json"
    _read_only_tree(folder)
    try:
        with pytest.raises(OutputError, match="read-only") as err:
            check_writable(folder)
        assert err.value.path == str(folder)
        with pytest.raises(OutputError, match="read-only"):
            check_writable(folder / "new.json")
        assert isinstance(err.value, ConicQPError) and "\n" not in str(err.value)
    finally:
        _writable_tree(folder)
    (folder / "a.json").chmod(0o444)  # a read-only file in a writable folder
    with pytest.raises(OutputError, match="read-only"):
        check_writable(folder / "a.json")
    with pytest.raises(OutputError, match="does not exist"):
        check_writable(tmp_path / "missing" / "x.json")
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # probe removed


def test_read_only_project_is_refused_also_for_root(tmp_path: Path) -> None:
    from conic_qp.qupath.project import ensure_project_writable, project_lock, write_project

    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    file = write_project(tmp_path / "p", [image])
    _read_only_tree(file.parent)
    try:
        with pytest.raises(ConicQPError, match="read-only"):
            ensure_project_writable(file)
        with pytest.raises(ConicQPError, match="read-only"):
            with project_lock(file.parent):
                pass
        assert sorted(p.name for p in file.parent.iterdir()) == ["project.qpproj"]
    finally:
        _writable_tree(file.parent)
