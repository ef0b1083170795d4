"""Tests of the volume packaging rules, on real folders in tmp_path and the shared fixtures."""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import fixtures

from pipeline.errors import VolumeChangedError, VolumeError, ZipError
from pipeline.volume import (
    CHUNK_SIZE,
    copy_volume,
    inspect_volume,
    last_change,
    parse_checksum_file,
    snapshot,
    verify_zip,
    write_zip,
)
from sandbox.volumes import make_volume

REPO = Path(__file__).resolve().parents[2]
BARCODE = "39015000000003"
VALID_FIXTURES = ["39015012078393", "39015058510069", "39015039746220", "39015048895836"]
MISMATCH_FIXTURE = "39015004074095"


def copy_fixture(tmp_path: Path, barcode: str) -> Path:
    source = fixtures() / barcode
    folder = tmp_path / "input" / barcode
    shutil.copytree(source, folder)
    for path in [folder, *folder.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def page_bytes(name: str) -> bytes:
    """Stand-in content for a page image: the rules never decode images, only hash them."""
    return f"page image {name}\n".encode() * 64


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def write_checksums(folder: Path, names: list[str]) -> None:
    lines = [f"{md5((folder / name).read_bytes())}  {name}\n" for name in names]
    (folder / "checksum.md5").write_text("".join(lines), encoding="utf-8")


def make_folder(folder: Path, pages: list[str], *, checksum: bool = True) -> Path:
    """Write page images, OCR text, meta.yml and (unless told not to) checksum.md5."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in pages:
        (folder / name).write_bytes(page_bytes(name))
        (folder / f"{name[:8]}.txt").write_text(f"text of {name}\n")
    (folder / "meta.yml").write_text("capture_date: 2016-01-01T00:00:00-04:00\n")
    if checksum:
        write_checksums(folder, [*pages, "meta.yml"])
    return folder


def valid_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / BARCODE, ["00000001.tif", "00000002.jp2", "00000003.tif"])


def tree_state(path: Path) -> dict[str, tuple[int, int, int, bytes | str | None]]:
    """Record everything about a folder a rule check could change: entries, modes, times, bytes."""
    if not path.is_dir() or path.is_symlink():
        st = path.lstat()
        return {"": (st.st_mode, st.st_size, st.st_mtime_ns, None)}
    state: dict[str, tuple[int, int, int, bytes | str | None]] = {}
    for entry in sorted(path.rglob("*")):
        st = entry.lstat()
        content: bytes | str | None = None
        if entry.is_symlink():
            content = os.readlink(entry)
        elif entry.is_file() and os.access(entry, os.R_OK) and st.st_mode & 0o444:
            content = entry.read_bytes()
        state[str(entry.relative_to(path))] = (st.st_mode, st.st_size, st.st_mtime_ns, content)
    st = path.lstat()
    state["."] = (st.st_mode, st.st_size, st.st_mtime_ns, None)
    return state


# --- each bad input, set up in a folder, with the words the error must contain ---------------


def _pages(*names: str) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        make_folder(folder, list(names))

    return setup


def _empty(folder: Path) -> None:
    folder.mkdir()


def _only_checksum(folder: Path) -> None:
    folder.mkdir()
    (folder / "meta.yml").write_text("capture_date: 2016-01-01T00:00:00-04:00\n")
    write_checksums(folder, ["meta.yml"])


def _not_a_folder(folder: Path) -> None:
    folder.write_bytes(b"PK\x03\x04 not a folder")


def _folder_link(folder: Path) -> None:
    real = make_folder(folder.parent / "elsewhere", ["00000001.tif"])
    folder.symlink_to(real, target_is_directory=True)


def _with(change: Callable[[Path], None], *, rechecksum: bool = False) -> Callable[[Path], None]:
    """Start from a valid three-page folder, then apply ``change``."""

    def setup(folder: Path) -> None:
        make_folder(folder, ["00000001.tif", "00000002.jp2", "00000003.tif"])
        change(folder)
        if rechecksum:
            names = sorted(
                p.name for p in folder.iterdir() if p.is_file() and p.name != "checksum.md5"
            )
            write_checksums(folder, names)

    return setup


def _add(name: str, data: bytes | None = None) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        (folder / name).write_bytes(page_bytes(name) if data is None else data)

    return change


def _checksum_bytes(data: bytes) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        (folder / "checksum.md5").write_bytes(data)

    return change


def _malformed_line(folder: Path) -> None:
    lines = (folder / "checksum.md5").read_text().splitlines(keepends=True)
    lines.insert(1, "this is not a checksum line\n")
    (folder / "checksum.md5").write_text("".join(lines))


def _list_absent_file(folder: Path) -> None:
    with (folder / "checksum.md5").open("a") as checksum:
        checksum.write(f"{md5(b'gone')}  00000009.tif\n")


def _unlist(name: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        lines = (folder / "checksum.md5").read_text().splitlines(keepends=True)
        (folder / "checksum.md5").write_text("".join(li for li in lines if name not in li))

    return change


def _subfolder(folder: Path) -> None:
    (folder / "extra").mkdir()
    (folder / "extra" / "00000004.tif").write_bytes(page_bytes("00000004.tif"))


def _link_inside(folder: Path) -> None:
    (folder / "00000004.tif").symlink_to("00000001.tif")


def _link_outside(folder: Path) -> None:
    outside = folder.parent / "outside.txt"
    outside.write_text("not part of the volume\n")
    (folder / "notes.txt").symlink_to(outside)


def _fifo(folder: Path) -> None:
    os.mkfifo(folder / "pipe")


def _remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _rescanned(folder: Path) -> None:
    (folder / "00000001.tif").write_bytes(b"changed")
    (folder / "00000003.tif").write_bytes(b"also changed")


def _several(folder: Path) -> None:
    (folder / "00000003.tif").rename(folder / "00000005.tif")
    (folder / "00000001.tif").write_bytes(b"rescanned")
    (folder / "0000006.tif").write_bytes(b"bad name")


BAD_VOLUMES = [
    pytest.param(_empty, ["is empty"], id="empty-folder"),
    pytest.param(_only_checksum, ["no page images"], id="no-page-images"),
    pytest.param(
        _pages("00000001.tif", "00000002.jp2", "00000005.tif", "00000006.jp2", "00000008.tif"),
        ["00000003 is missing", "00000004 is missing", "00000007 is missing"],
        id="gaps",
    ),
    pytest.param(
        _pages("00000001.tif", "00000500.tif"),
        ["00000002 to 00000499 are missing"],
        id="long-gap",
    ),
    pytest.param(
        _pages("00000000.tif", "00000001.tif", "00000002.tif"), ["page 00000000"], id="starts-at-0"
    ),
    pytest.param(
        _pages("00000002.tif", "00000003.jp2"), ["page image 00000001 is missing"], id="starts-at-2"
    ),
    pytest.param(
        _pages("00000001.tif", "00000001.jp2", "00000002.tif"),
        ["page 00000001 appears more than once: 00000001.jp2, 00000001.tif"],
        id="tif-and-jp2-duplicate",
    ),
    pytest.param(
        _with(_add("0000004.tif"), rechecksum=True), ["0000004.tif is not a valid"], id="7-digits"
    ),
    pytest.param(
        _with(_add("000000004.jp2"), rechecksum=True),
        ["000000004.jp2 is not a valid"],
        id="9-digits",
    ),
    pytest.param(
        _with(_add("00000004.TIF"), rechecksum=True),
        ["00000004.TIF is not a valid"],
        id="upper-case-extension",
    ),
    pytest.param(
        _with(_add("00000002.jp2", b""), rechecksum=True),
        ["00000002.jp2 is empty"],
        id="zero-byte-image",
    ),
    pytest.param(_with(_remove("checksum.md5")), ["checksum.md5 is missing"], id="no-checksum"),
    pytest.param(_with(_malformed_line), ["checksum.md5 line 2 is malformed"], id="bad-line"),
    pytest.param(
        _with(_list_absent_file),
        ["lists 00000009.tif, which is not in the folder"],
        id="listed-file-absent",
    ),
    pytest.param(
        _with(_unlist("00000002.jp2")),
        ["00000002.jp2 is not listed in checksum.md5"],
        id="page-not-listed",
    ),
    pytest.param(
        _with(_rescanned),
        ["00000001.tif does not match checksum.md5", "00000003.tif does not match checksum.md5"],
        id="md5-mismatch",
    ),
    pytest.param(_with(_checksum_bytes(b"")), ["checksum.md5 is empty"], id="empty-checksum"),
    pytest.param(
        _with(_checksum_bytes(b"\xff\x00\xfe\x80")),
        ["checksum.md5 is not text"],
        id="undecodable-checksum",
    ),
    pytest.param(_with(_subfolder), ["extra is a subfolder"], id="subfolder"),
    pytest.param(
        _with(_link_inside), ["00000004.tif is a symbolic link (to 00000001.tif)"], id="link-inside"
    ),
    pytest.param(
        _with(_link_outside), ["notes.txt is a symbolic link", "outside.txt"], id="link-outside"
    ),
    pytest.param(_with(_fifo), ["pipe is not a regular file"], id="fifo"),
    pytest.param(_not_a_folder, ["is not a folder"], id="not-a-folder"),
    pytest.param(lambda folder: None, ["does not exist"], id="no-such-folder"),
    pytest.param(_folder_link, ["is a symbolic link, not a folder"], id="folder-is-a-link"),
    pytest.param(
        _with(_several),
        [
            "00000001.tif does not match checksum.md5",
            "page image 00000003 is missing",
            "page image 00000004 is missing",
            "00000005.tif is not listed in checksum.md5",
            "lists 00000003.tif, which is not in the folder",
            "0000006.tif is not a valid page image name",
        ],
        id="every-problem-at-once",
    ),
]


@pytest.mark.parametrize(("setup", "expected"), BAD_VOLUMES)
def test_bad_volume_raises_one_error_naming_barcode_and_every_cause(
    tmp_path: Path, setup: Callable[[Path], None], expected: list[str]
) -> None:
    folder = tmp_path / BARCODE
    setup(folder)
    before = tree_state(folder) if folder.exists() or folder.is_symlink() else None

    with pytest.raises(VolumeError) as caught:
        inspect_volume(folder, BARCODE)

    error = caught.value
    assert error.barcode == BARCODE
    assert str(error).startswith(f"{BARCODE}: ")
    for words in expected:
        assert any(words in problem for problem in error.problems), (words, error.problems)
    after = tree_state(folder) if folder.exists() or folder.is_symlink() else None
    assert after == before


def test_md5_mismatch_names_each_mismatching_file(tmp_path: Path) -> None:
    folder = valid_folder(tmp_path)
    (folder / "00000001.tif").write_bytes(b"changed")
    (folder / "00000003.tif").write_bytes(b"also changed")

    with pytest.raises(VolumeError) as caught:
        inspect_volume(folder, BARCODE)

    mismatches = [p for p in caught.value.problems if "does not match" in p]
    assert len(mismatches) == 2
    assert "00000001.tif" in mismatches[0]
    assert "00000003.tif" in mismatches[1]


def test_long_gap_is_found_without_listing_every_number(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / BARCODE, ["00000001.tif", "99999999.tif"])

    with pytest.raises(VolumeError) as caught:
        inspect_volume(folder, BARCODE)

    assert caught.value.problems == ["page images 00000002 to 99999998 are missing (99999997)"]


def test_invalid_barcode_is_rejected_before_reading(tmp_path: Path) -> None:
    folder = valid_folder(tmp_path)

    with pytest.raises(Exception, match="not a valid barcode") as caught:
        inspect_volume(folder, "../etc")

    assert not isinstance(caught.value, VolumeError)


# --- unreadable files ---------------------------------------------------------------------------

_INSPECT_SCRIPT = """
import json, sys
from pathlib import Path
from pipeline.errors import VolumeError
from pipeline.volume import inspect_volume
try:
    inspect_volume(Path(sys.argv[1]), sys.argv[2])
except VolumeError as error:
    print(json.dumps({"barcode": error.barcode, "problems": error.problems}))
else:
    print(json.dumps(None))
"""

_DROP_READ_OVERRIDE = [
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-all",
]


def _inspect_without_root_read_override(folder: Path) -> dict[str, object] | None:
    """Run inspect_volume in a child that has lost root's power to read any file.

    As root, mode 000 does not stop reading (CAP_DAC_OVERRIDE). setpriv drops that
    capability and CAP_DAC_READ_SEARCH from the child, which then meets permissions as
    any user would. Without setpriv, or where capabilities cannot be dropped, the test
    is skipped rather than faked.
    """
    probe = folder.parent / "probe"
    probe.write_text("secret")
    probe.chmod(0)
    code = "open(__import__('sys').argv[1]).read()"
    try:
        result = subprocess.run(
            [*_DROP_READ_OVERRIDE, sys.executable, "-c", code, str(probe)],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("running as root and setpriv is not installed to drop CAP_DAC_OVERRIDE")
    if "PermissionError" not in result.stderr:
        pytest.skip(f"cannot drop root's read override here: {result.stderr.strip()[-200:]}")

    result = subprocess.run(
        [*_DROP_READ_OVERRIDE, sys.executable, "-c", _INSPECT_SCRIPT, str(folder), BARCODE],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    answer: dict[str, object] | None = json.loads(result.stdout)
    return answer


@pytest.mark.parametrize("name", ["00000002.jp2", "checksum.md5", "00000001.txt"])
def test_unreadable_file_is_reported(tmp_path: Path, name: str) -> None:
    folder = valid_folder(tmp_path)
    (folder / name).chmod(0)
    before = tree_state(folder)

    if os.geteuid() != 0:
        with pytest.raises(VolumeError) as caught:
            inspect_volume(folder, BARCODE)
        answer: dict[str, object] | None = {
            "barcode": caught.value.barcode,
            "problems": caught.value.problems,
        }
    else:
        answer = _inspect_without_root_read_override(folder)

    assert answer is not None, "inspect_volume accepted a folder with an unreadable file"
    assert answer["barcode"] == BARCODE
    assert f"{name} cannot be read: permission denied" in answer["problems"]  # type: ignore[operator]
    assert tree_state(folder) == before


# --- what is accepted ---------------------------------------------------------------------------


def test_valid_folder_gives_manifest_of_pages_in_order(tmp_path: Path) -> None:
    folder = make_folder(
        tmp_path / BARCODE,
        [f"{n:08d}.{'tif' if n % 3 else 'jp2'}" for n in range(12, 0, -1)],
    )

    manifest = inspect_volume(folder, BARCODE)

    assert manifest.barcode == BARCODE
    assert manifest.folder == folder
    assert [p.name for p in manifest.pages] == [
        f"{n:08d}.{'tif' if n % 3 else 'jp2'}" for n in range(1, 13)
    ]
    assert manifest.checksum_file == folder / "checksum.md5"
    assert manifest.zip_members == [p.name for p in manifest.pages] + ["checksum.md5"]
    assert manifest.warnings == []


@pytest.mark.parametrize("junk", ["Thumbs.db", ".DS_Store", "desktop.ini", "._00000001.tif"])
def test_junk_is_ignored_silently(
    tmp_path: Path, junk: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = valid_folder(tmp_path)
    (folder / junk).write_bytes(b"\x00junk")

    with caplog.at_level(logging.DEBUG, logger="pipeline.volume"):
        manifest = inspect_volume(folder, BARCODE)

    assert manifest.warnings == []
    assert junk not in manifest.zip_members
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(junk in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


@pytest.mark.parametrize("name", ["00000001.html", "00000002.xml", "00000003.txt", "meta.yml"])
def test_companion_files_are_allowed_and_not_zipped(tmp_path: Path, name: str) -> None:
    folder = valid_folder(tmp_path)
    (folder / name).write_text("<ocr/>\n")
    write_checksums(folder, ["00000001.tif", "00000002.jp2", "00000003.tif"])

    manifest = inspect_volume(folder, BARCODE)

    assert manifest.warnings == []
    assert name not in manifest.zip_members


@pytest.mark.parametrize("name", ["notes.docx", "00000001.TXT", "scan.log"])
def test_unknown_file_is_a_warning_not_an_error(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = valid_folder(tmp_path)
    (folder / name).write_text("something\n")

    with caplog.at_level(logging.WARNING, logger="pipeline.volume"):
        manifest = inspect_volume(folder, BARCODE)

    assert len(manifest.warnings) == 1
    assert name in manifest.warnings[0]
    assert name not in manifest.zip_members
    assert any(name in r.getMessage() and BARCODE in r.getMessage() for r in caplog.records)


def _checksum_lines(folder: Path, template: str, *, upper: bool = False) -> list[str]:
    names = ["00000001.tif", "00000002.jp2", "00000003.tif", "meta.yml"]
    lines = []
    for name in names:
        digest = md5((folder / name).read_bytes())
        lines.append(template.format(md5=digest.upper() if upper else digest, name=name))
    return lines


CHECKSUM_FORMS = [
    pytest.param("{md5}  {name}", "\n", "utf-8", False, id="md5sum-text"),
    pytest.param("{md5} *{name}", "\n", "utf-8", False, id="md5sum-binary"),
    pytest.param("{md5}\t{name}", "\n", "utf-8", True, id="tab-upper-hex"),
    pytest.param("{md5}     {name}   ", "\r\n", "utf-8", False, id="wide-spacing-crlf"),
    pytest.param("{md5}  {name}", "\r\n", "utf-8-sig", False, id="utf8-bom"),
    pytest.param("{md5} {name}", "\r\n", "utf-16", True, id="powershell-utf16le-bom"),
    pytest.param("{md5}  {name}", "\n", "utf-16-be-bom", False, id="utf16be-bom"),
    pytest.param("{md5}  ./{name}", "\n", "utf-8", False, id="dot-slash"),
    pytest.param("MD5 ({name}) = {md5}", "\n", "utf-8", False, id="bsd-md5"),
]


def _encode(text: str, encoding: str) -> bytes:
    if encoding == "utf-16-be-bom":
        return codecs.BOM_UTF16_BE + text.encode("utf-16-be")
    return text.encode(encoding)


@pytest.mark.parametrize(("template", "newline", "encoding", "upper"), CHECKSUM_FORMS)
def test_checksum_file_is_read_in_every_form(
    tmp_path: Path, template: str, newline: str, encoding: str, upper: bool
) -> None:
    folder = valid_folder(tmp_path)
    text = newline.join(_checksum_lines(folder, template, upper=upper)) + newline
    (folder / "checksum.md5").write_bytes(_encode(text, encoding))

    manifest = inspect_volume(folder, BARCODE)

    assert len(manifest.pages) == 3
    assert manifest.md5s["00000002.jp2"] == md5(page_bytes("00000002.jp2"))


@pytest.mark.parametrize(("template", "newline", "encoding", "upper"), CHECKSUM_FORMS)
def test_checksum_mismatch_is_caught_in_every_form(
    tmp_path: Path, template: str, newline: str, encoding: str, upper: bool
) -> None:
    folder = valid_folder(tmp_path)
    text = newline.join(_checksum_lines(folder, template, upper=upper)) + newline
    (folder / "checksum.md5").write_bytes(_encode(text, encoding))
    (folder / "00000002.jp2").write_bytes(b"not what was scanned")

    with pytest.raises(VolumeError, match=r"00000002\.jp2 does not match"):
        inspect_volume(folder, BARCODE)


def test_parse_checksum_file_lowercases_and_names_bad_lines() -> None:
    data = (
        "\ufeffABCDEF0123456789ABCDEF0123456789 *00000001.tif\r\n"
        "\r\n"
        "# a comment\r\n"
        "abc  00000002.jp2\r\n"
    ).encode()

    listed, problems = parse_checksum_file(data)

    assert listed == {"00000001.tif": "abcdef0123456789abcdef0123456789"}
    assert problems == ["checksum.md5 line 4 is malformed: 'abc  00000002.jp2'"]


# --- the shared fixtures ------------------------------------------------------------------------


@pytest.mark.parametrize("barcode", VALID_FIXTURES)
def test_fixture_volume_inspects_and_zips(tmp_path: Path, barcode: str) -> None:
    folder = copy_fixture(tmp_path, barcode)
    before = tree_state(folder)

    manifest = inspect_volume(folder, barcode)
    summary = write_zip(manifest, tmp_path / f"{barcode}.zip")

    assert manifest.zip_members == ["00000001.tif", "00000002.jp2", "checksum.md5"]
    with zipfile.ZipFile(summary.path) as archive:
        assert archive.namelist() == manifest.zip_members
        for name in archive.namelist():
            assert archive.read(name) == (folder / name).read_bytes()
    assert summary.page_count == 2
    assert tree_state(folder) == before


def test_fixture_with_wrong_checksums_names_both_images(tmp_path: Path) -> None:
    folder = copy_fixture(tmp_path, MISMATCH_FIXTURE)
    before = tree_state(folder)

    with pytest.raises(VolumeError) as caught:
        inspect_volume(folder, MISMATCH_FIXTURE)

    assert caught.value.barcode == MISMATCH_FIXTURE
    assert len(caught.value.problems) == 2
    assert "00000001.tif does not match" in caught.value.problems[0]
    assert "00000002.jp2 does not match" in caught.value.problems[1]
    assert tree_state(folder) == before


def test_fixture_originals_are_read_only_inputs() -> None:
    source = fixtures()
    assert sorted(p.name for p in source.iterdir()) == sorted([*VALID_FIXTURES, MISMATCH_FIXTURE])


# --- write_zip and verify_zip -------------------------------------------------------------------


def test_write_zip_holds_exactly_the_pages_and_checksum_flat(tmp_path: Path) -> None:
    folder = valid_folder(tmp_path)
    (folder / "notes.docx").write_text("not zipped\n")
    (folder / "Thumbs.db").write_bytes(b"junk")
    manifest = inspect_volume(folder, BARCODE)
    dest = tmp_path / "out" / f"{BARCODE}.zip"
    dest.parent.mkdir()

    summary = write_zip(manifest, dest)

    with zipfile.ZipFile(dest) as archive:
        assert archive.namelist() == [
            "00000001.tif",
            "00000002.jp2",
            "00000003.tif",
            "checksum.md5",
        ]
        assert archive.read("checksum.md5") == (folder / "checksum.md5").read_bytes()
        assert archive.read("00000002.jp2") == page_bytes("00000002.jp2")
    assert summary.path == dest
    assert summary.size == dest.stat().st_size
    assert summary.md5 == md5(dest.read_bytes())
    assert summary.page_count == 3
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


@pytest.mark.parametrize(
    ("compression", "method"),
    [("deflate", zipfile.ZIP_DEFLATED), ("store", zipfile.ZIP_STORED)],
)
def test_write_zip_compression(tmp_path: Path, compression: str, method: int) -> None:
    manifest = inspect_volume(valid_folder(tmp_path), BARCODE)

    summary = write_zip(manifest, tmp_path / "v.zip", compression=compression)

    with zipfile.ZipFile(summary.path) as archive:
        infos = archive.infolist()
    assert {info.compress_type for info in infos} == {method}
    packed = sum(info.compress_size for info in infos)
    unpacked = sum(info.file_size for info in infos)
    assert (packed < unpacked / 2) if compression == "deflate" else (packed == unpacked)


def test_write_zip_rejects_unknown_compression(tmp_path: Path) -> None:
    manifest = inspect_volume(valid_folder(tmp_path), BARCODE)

    with pytest.raises(ValueError, match="bzip2"):
        write_zip(manifest, tmp_path / "v.zip", compression="bzip2")
    assert not (tmp_path / "v.zip").exists()


def test_write_zip_reports_progress_in_chunks(tmp_path: Path) -> None:
    folder = valid_folder(tmp_path)
    (folder / "00000002.jp2").write_bytes(os.urandom(2 * CHUNK_SIZE + 123))
    write_checksums(folder, ["00000001.tif", "00000002.jp2", "00000003.tif"])
    manifest = inspect_volume(folder, BARCODE)
    total = sum((folder / name).stat().st_size for name in manifest.zip_members)
    calls: list[tuple[int, int]] = []

    write_zip(manifest, tmp_path / "v.zip", progress=lambda done, all_: calls.append((done, all_)))

    assert calls[-1] == (total, total)
    assert all(all_ == total for _, all_ in calls)
    done = [d for d, _ in calls]
    assert done == sorted(set(done))
    assert len(calls) >= 6


def test_write_zip_memory_does_not_grow_with_page_size(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / BARCODE, ["00000001.tif"], checksum=False)
    with (folder / "00000001.tif").open("wb") as page:
        for _ in range(24):
            page.write(os.urandom(CHUNK_SIZE))
    write_checksums(folder, ["00000001.tif"])
    manifest = inspect_volume(folder, BARCODE)

    tracemalloc.start()
    try:
        write_zip(manifest, tmp_path / "v.zip")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 6 * CHUNK_SIZE


def test_write_zip_raises_when_a_page_changed_after_inspection(tmp_path: Path) -> None:
    folder = valid_folder(tmp_path)
    manifest = inspect_volume(folder, BARCODE)
    (folder / "00000003.tif").write_bytes(b"rescanned meanwhile")

    with pytest.raises(VolumeChangedError) as caught:
        write_zip(manifest, tmp_path / "v.zip")

    assert caught.value.barcode == BARCODE
    assert caught.value.kind == "volume_changed"
    assert "00000003.tif" in str(caught.value)
    assert list(tmp_path.glob("*.zip*")) == [] and list(tmp_path.glob(".v.zip*")) == []


def test_write_zip_raises_when_a_page_vanished_after_inspection(tmp_path: Path) -> None:
    folder = valid_folder(tmp_path)
    manifest = inspect_volume(folder, BARCODE)
    (folder / "00000002.jp2").unlink()

    with pytest.raises(VolumeChangedError, match=r"00000002\.jp2"):
        write_zip(manifest, tmp_path / "v.zip")
    assert not (tmp_path / "v.zip").exists()


def _flip_byte_in_first_member(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        info = archive.infolist()[0]
    data = bytearray(path.read_bytes())
    name_length = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_length + extra_length
    data[start + info.compress_size // 2] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("compression", ["deflate", "store"])
def test_verify_zip_catches_a_corrupted_entry(tmp_path: Path, compression: str) -> None:
    manifest = inspect_volume(valid_folder(tmp_path), BARCODE)
    summary = write_zip(manifest, tmp_path / "v.zip", compression=compression)
    verify_zip(summary.path, manifest.zip_members, BARCODE)

    _flip_byte_in_first_member(summary.path)

    with pytest.raises(ZipError) as caught:
        verify_zip(summary.path, manifest.zip_members, BARCODE)
    assert caught.value.barcode == BARCODE
    assert "00000001.tif" in str(caught.value)


def test_verify_zip_catches_a_wrong_listing(tmp_path: Path) -> None:
    path = tmp_path / "v.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("00000001.tif", b"page")
        archive.writestr("meta.yml", b"extra")
        archive.writestr("checksum.md5", b"sums")

    with pytest.raises(ZipError, match=r"meta\.yml") as caught:
        verify_zip(path, ["00000001.tif", "checksum.md5"], BARCODE)
    assert caught.value.barcode == BARCODE


@pytest.mark.parametrize("order", [["checksum.md5", "00000001.tif"], ["00000001.tif"]])
def test_verify_zip_wants_the_exact_order_and_names(tmp_path: Path, order: list[str]) -> None:
    path = tmp_path / "v.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("00000001.tif", b"page")
        archive.writestr("checksum.md5", b"sums")
    verify_zip(path, ["00000001.tif", "checksum.md5"], BARCODE)

    with pytest.raises(ZipError):
        verify_zip(path, order, BARCODE)


def test_verify_zip_catches_a_file_that_is_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "v.zip"
    path.write_bytes(b"truncated upload")

    with pytest.raises(ZipError, match=BARCODE):
        verify_zip(path, ["checksum.md5"], BARCODE)


# --- snapshot, last_change and copy_volume ------------------------------------------------------


def test_snapshot_is_stable_for_an_unchanged_folder(tmp_path: Path) -> None:
    folder = valid_folder(tmp_path)

    first = snapshot(folder)

    assert first == snapshot(folder)
    names = [name for name, _, _ in first]
    assert names == sorted(p.name for p in folder.iterdir())
    assert dict((n, s) for n, s, _ in first)["00000001.tif"] == len(page_bytes("00000001.tif"))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda f: (f / "00000004.tif").write_bytes(b"new page"), id="added"),
        pytest.param(lambda f: (f / "00000001.txt").unlink(), id="removed"),
        pytest.param(lambda f: (f / "00000002.jp2").write_bytes(b"shorter"), id="rewritten"),
        pytest.param(
            lambda f: os.utime(f / "meta.yml", ns=(1, 1_000_000_000_000_000_000)), id="touched"
        ),
    ],
)
def test_snapshot_changes_when_the_folder_changes(
    tmp_path: Path, change: Callable[[Path], None]
) -> None:
    folder = valid_folder(tmp_path)
    before = snapshot(folder)

    change(folder)

    assert snapshot(folder) != before


def test_snapshot_and_last_change_do_not_follow_links(tmp_path: Path) -> None:
    folder = valid_folder(tmp_path)
    for path in [folder, *folder.iterdir()]:
        os.utime(path, (1_000_000_000, 1_000_000_000))
    target = tmp_path / "big"
    target.write_bytes(b"x" * 100_000)
    os.utime(target, (4_000_000_000, 4_000_000_000))
    (folder / "link").symlink_to(target)

    sizes = {name: size for name, size, _ in snapshot(folder)}
    latest = last_change(folder)

    assert sizes["link"] == len(str(target))
    assert latest < 4_000_000_000


def test_last_change_is_the_latest_time_in_the_folder(tmp_path: Path) -> None:
    folder = valid_folder(tmp_path)
    settled = last_change(folder)

    os.utime(folder / "00000002.jp2", (4_000_000_000, 4_000_000_000))

    assert settled < 4_000_000_000
    assert last_change(folder) == 4_000_000_000


def test_copy_volume_copies_regular_files_and_keeps_mtimes(tmp_path: Path) -> None:
    folder = valid_folder(tmp_path)
    (folder / ".DS_Store").write_bytes(b"junk")
    os.utime(folder / "00000001.tif", ns=(1_500_000_000_123_456_789, 1_500_000_000_123_456_789))
    before = tree_state(folder)

    copy = copy_volume(folder, tmp_path / "work" / BARCODE)

    assert copy == tmp_path / "work" / BARCODE
    originals = sorted(p.name for p in folder.iterdir() if p.name != ".DS_Store")
    assert sorted(p.name for p in copy.iterdir()) == originals
    for name in originals:
        assert (copy / name).read_bytes() == (folder / name).read_bytes()
        assert (copy / name).stat().st_mtime_ns == (folder / name).stat().st_mtime_ns
    assert inspect_volume(copy, BARCODE).zip_members == inspect_volume(folder, BARCODE).zip_members
    assert tree_state(folder) == before


def test_copy_volume_refuses_links_and_subfolders(tmp_path: Path) -> None:
    folder = valid_folder(tmp_path)
    (folder / "sub").mkdir()
    (folder / "00000004.tif").symlink_to("/etc/hostname")
    dest = tmp_path / "work" / BARCODE

    with pytest.raises(VolumeError) as caught:
        copy_volume(folder, dest)

    assert caught.value.barcode == BARCODE
    assert any("sub" in p for p in caught.value.problems)
    assert any("00000004.tif" in p for p in caught.value.problems)
    assert not dest.exists()


def test_copy_volume_refuses_an_existing_destination(tmp_path: Path) -> None:
    folder = valid_folder(tmp_path)
    dest = tmp_path / "work"
    dest.mkdir()

    with pytest.raises(FileExistsError):
        copy_volume(folder, dest)


def test_a_page_numbered_in_non_ascii_digits_is_not_a_page_image(tmp_path: Path) -> None:
    barcode = "39015012078393"
    folder = make_volume(tmp_path, barcode, pages=2)
    odd = "\u0660" * 7 + "\u0662" + ".jp2"  # "00000002" in Arabic-Indic digits
    (folder / "00000002.jp2").rename(folder / odd)

    with pytest.raises(VolumeError) as raised:
        inspect_volume(folder, barcode)

    assert barcode in str(raised.value)
    assert "00000002" in str(raised.value)
