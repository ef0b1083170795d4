"""Packaging rules for one volume folder: inspect it, zip it, and watch it for changes.

A volume folder is named by its barcode and holds page images named by an 8-digit
sequence (``00000001.tif`` or ``00000001.jp2``), a ``checksum.md5`` listing their md5
sums, and optionally OCR text (``.txt``), coordinate OCR (``.html``, ``.xml``) and
``meta.yml``. The zip holds the page images and ``checksum.md5``, flat, nothing else.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import re
import shutil
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import barcodes
from pipeline.errors import VolumeChangedError, VolumeError, ZipError

logger = logging.getLogger(__name__)

CHECKSUM_FILE = "checksum.md5"
META_FILE = "meta.yml"

# Files are read and written in chunks of this size, so memory does not grow with a volume.
CHUNK_SIZE = 1024 * 1024

COMPRESSIONS = {"deflate": zipfile.ZIP_DEFLATED, "store": zipfile.ZIP_STORED}

_PAGE_IMAGE = re.compile(r"([0-9]{8})\.(?:tif|jp2)")
# A name meant as a page image that breaks the rule: wrong digit count or extension case.
_PAGE_IMAGE_LIKE = re.compile(r"[0-9]+\.(?:tiff?|jp2)", re.IGNORECASE)
_COMPANION = re.compile(r"[0-9]{8}\.(?:txt|html|xml)")
# A run of missing page images longer than this is reported as a range, not one by one.
_MAX_LISTED_GAP = 20
_JUNK = frozenset({"thumbs.db", ".ds_store", "desktop.ini"})

# checksum.md5 lines: md5sum text ("<md5>  <file>") and binary ("<md5> *<file>") forms with
# any spacing, and the BSD form ("MD5 (<file>) = <md5>") that macOS's md5 writes.
_MD5SUM_LINE = re.compile(r"([0-9a-fA-F]{32})[ \t]+\*?(\S.*)")
_BSD_LINE = re.compile(r"MD5 ?\((.+)\) ?= ?([0-9a-fA-F]{32})")

Progress = Callable[[int, int], None]
Snapshot = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Manifest:
    """What :func:`inspect_volume` found in a valid volume folder: the files to zip."""

    barcode: str
    folder: Path
    pages: list[Path]
    checksum_file: Path
    warnings: list[str] = field(default_factory=list)
    # md5 (lower-case hex) of each zip member as inspected, by file name.
    md5s: dict[str, str] = field(default_factory=dict)

    @property
    def zip_members(self) -> list[str]:
        """Name the zip's entries in order: the page images in sequence, then checksum.md5."""
        return [page.name for page in self.pages] + [self.checksum_file.name]


@dataclass(frozen=True)
class ZipSummary:
    """A written and verified zip: where it is, its size and md5, how many pages it holds."""

    path: Path
    size: int
    md5: str
    page_count: int


def inspect_volume(folder: Path, barcode: str) -> Manifest:
    """Check a volume folder against the packaging rules and list the files to zip.

    Every problem found is gathered into one :class:`VolumeError`; the folder is only
    read, never changed. Files that are neither part of a volume nor known junk are
    reported in ``Manifest.warnings`` and left out of the zip.
    """
    barcode = barcodes.validate(barcode)
    entries = _list_folder(folder, barcode)
    problems: list[str] = []
    warnings: list[str] = []

    # Sort the entries into page images, the checksum file, companions and the rest.
    pages_by_number: dict[int, list[str]] = {}
    regular: set[str] = set()
    present = {entry.name for entry in entries}
    for entry in entries:
        name = entry.name
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            problems.append(f"{name} cannot be examined: {exc.strerror or exc}")
            continue
        if stat.S_ISLNK(st.st_mode):
            problems.append(f"{name} is a symbolic link (to {os.readlink(entry.path)})")
            continue
        if stat.S_ISDIR(st.st_mode):
            problems.append(f"{name} is a subfolder; a volume folder must be flat")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{name} is not a regular file")
            continue
        if _is_junk(name):
            logger.debug("%s: ignoring %s", barcode, name)
            continue
        if not _readable(Path(entry.path)):
            problems.append(f"{name} cannot be read: permission denied")
            continue
        regular.add(name)

        page = _PAGE_IMAGE.fullmatch(name)
        if page:
            pages_by_number.setdefault(int(page.group(1)), []).append(name)
            if st.st_size == 0:
                problems.append(f"{name} is empty (0 bytes)")
        elif _PAGE_IMAGE_LIKE.fullmatch(name):
            problems.append(
                f"{name} is not a valid page image name: expected 8 digits and .tif or .jp2"
                " in lower case"
            )
        elif name not in (CHECKSUM_FILE, META_FILE) and not _COMPANION.fullmatch(name):
            warnings.append(f"{name} is not part of a volume; it will not be zipped")

    problems.extend(_sequence_problems(pages_by_number))
    page_names = sorted(name for names in pages_by_number.values() for name in names)

    # Check the page images (and anything else listed) against checksum.md5.
    md5s: dict[str, str] = {}
    checksum_path = folder / CHECKSUM_FILE
    if CHECKSUM_FILE in regular:
        listed, checksum_problems = parse_checksum_file(checksum_path.read_bytes())
        problems.extend(checksum_problems)
        md5s[CHECKSUM_FILE] = md5_of_file(checksum_path)
        for name in page_names:
            if name not in listed and (listed or not checksum_problems):
                problems.append(f"{name} is not listed in {CHECKSUM_FILE}")
        for name, expected in listed.items():
            if name == CHECKSUM_FILE:
                continue
            if name not in regular:
                if name not in present:
                    problems.append(f"{CHECKSUM_FILE} lists {name}, which is not in the folder")
                continue
            actual = md5_of_file(folder / name)
            if actual != expected:
                problems.append(
                    f"{name} does not match {CHECKSUM_FILE}: listed {expected}, actual {actual}"
                )
            md5s[name] = actual
    elif CHECKSUM_FILE not in present:
        problems.append(f"{CHECKSUM_FILE} is missing")

    if problems:
        raise VolumeError(barcode, problems)
    for warning in warnings:
        logger.warning("%s: %s", barcode, warning)
    logger.info("%s: inspected %s: %d page images", barcode, folder, len(page_names))
    return Manifest(
        barcode=barcode,
        folder=folder,
        pages=[folder / name for name in page_names],
        checksum_file=checksum_path,
        warnings=warnings,
        md5s=md5s,
    )


def parse_checksum_file(data: bytes) -> tuple[dict[str, str], list[str]]:
    """Read the bytes of a checksum.md5 into {file name: lower-case md5} and a list of problems.

    Accepts UTF-8 (with or without a byte-order mark) and UTF-16 or UTF-32 with a
    byte-order mark, CRLF or LF line ends, upper- or lower-case hex.
    """
    try:
        text = _decode(data)
    except UnicodeDecodeError:
        return {}, [f"{CHECKSUM_FILE} is not text in UTF-8, or UTF-16 with a byte-order mark"]
    if not text.strip():
        return {}, [f"{CHECKSUM_FILE} is empty"]

    listed: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        md5sum = _MD5SUM_LINE.fullmatch(line)
        bsd = None if md5sum else _BSD_LINE.fullmatch(line)
        if md5sum:
            digest, name = md5sum.group(1), md5sum.group(2)
        elif bsd:
            name, digest = bsd.group(1), bsd.group(2)
        else:
            problems.append(f"{CHECKSUM_FILE} line {number} is malformed: {line[:80]!r}")
            continue
        name = name.removeprefix("./").removeprefix(".\\")
        if name in listed and listed[name] != digest.lower():
            problems.append(f"{CHECKSUM_FILE} line {number} lists {name} a second time")
        listed[name] = digest.lower()
    return listed, problems


def md5_of_file(path: Path) -> str:
    """Return the md5 (lower-case hex) of a file, read in chunks."""
    with path.open("rb") as source:
        return hashlib.file_digest(source, "md5").hexdigest()


def write_zip(
    manifest: Manifest,
    dest: Path,
    *,
    compression: str = "deflate",
    progress: Progress | None = None,
) -> ZipSummary:
    """Zip a volume's page images and checksum.md5 into ``dest``, verify it and describe it.

    The zip is flat (each entry named by its bare file name), in the order of
    ``Manifest.zip_members``, and is written to a hidden partial file renamed to
    ``dest`` only once it has passed :func:`verify_zip`, so a half-written zip never
    carries the final name. ``progress(bytes_done, bytes_total)`` is called after each
    chunk, counting bytes read from the volume. A member whose md5 differs from what
    inspection saw raises :class:`VolumeChangedError`.
    """
    try:
        method = COMPRESSIONS[compression]
    except KeyError:
        raise ValueError(
            f"compression must be one of {sorted(COMPRESSIONS)}, not {compression!r}"
        ) from None
    barcode = manifest.barcode
    sources = [*manifest.pages, manifest.checksum_file]
    total = sum(_zip_info(path, method, barcode).file_size for path in sources)
    partial = dest.with_name(f".{dest.name}.partial")

    # Write every member in chunks, checking each against the md5 seen at inspection.
    done = 0
    changed: list[str] = []
    try:
        with zipfile.ZipFile(partial, "w", compression=method, allowZip64=True) as archive:
            for path in sources:
                info = _zip_info(path, method, barcode)
                digest = hashlib.md5(usedforsecurity=False)
                with archive.open(info, "w") as member:
                    for chunk in _read_chunks(path, barcode):
                        member.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
                expected = manifest.md5s.get(path.name)
                if expected is not None and digest.hexdigest() != expected:
                    changed.append(f"{path.name} changed after inspection")
        if changed:
            raise VolumeChangedError(barcode, changed)
        verify_zip(partial, manifest.zip_members, barcode)
        # NOTE: the md5 takes one more sequential read of the zip, which the page cache
        # usually serves. Hashing while writing is not possible: zipfile seeks back to
        # fill in each entry's local header once its CRC is known.
        md5 = md5_of_file(partial)
        os.replace(partial, dest)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ZipError(f"cannot write {dest}: {exc.strerror or exc}", barcode=barcode) from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise

    summary = ZipSummary(dest, dest.stat().st_size, md5, len(manifest.pages))
    logger.info(
        "%s: zipped %d page images into %s (%d bytes)",
        barcode,
        len(manifest.pages),
        dest,
        summary.size,
    )
    return summary


def verify_zip(path: Path, expected_names: Sequence[str], barcode: str) -> None:
    """Re-read a zip, raising :class:`ZipError` unless it is exactly what was meant to be written.

    The listing must equal ``expected_names``, in order, and every entry must decompress
    and pass its CRC check. Entries are read in chunks.
    """
    bad: list[str] = []
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if names != list(expected_names):
                raise ZipError(
                    f"{path.name} holds {names}, expected {list(expected_names)}",
                    barcode=barcode,
                )
            for info in archive.infolist():
                try:
                    with archive.open(info) as member:
                        while member.read(CHUNK_SIZE):
                            pass
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                    bad.append(f"{info.filename} ({exc})")
    except (zipfile.BadZipFile, OSError) as exc:
        raise ZipError(f"{path.name} cannot be read as a zip: {exc}", barcode=barcode) from exc
    if bad:
        raise ZipError(f"{path.name} has damaged entries: {', '.join(bad)}", barcode=barcode)


def snapshot(folder: Path) -> Snapshot:
    """Return (name, size, mtime_ns) of every entry in a folder, sorted, without following links.

    Two snapshots differ when a file was added, removed, resized or rewritten between
    them, which tells whether a folder changed while it was being zipped.
    """
    entries = []
    with os.scandir(folder) as scan:
        for entry in scan:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            entries.append((entry.name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def last_change(folder: Path) -> float:
    """Return the latest mtime or ctime (epoch seconds) of a folder and everything in it.

    Links are not followed, so a link's own times count, not its target's.
    """
    st = folder.lstat()
    latest = max(st.st_mtime, st.st_ctime)
    with os.scandir(folder) as scan:
        for entry in scan:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            latest = max(latest, st.st_mtime, st.st_ctime)
            if stat.S_ISDIR(st.st_mode):
                latest = max(latest, last_change(Path(entry.path)))
    return latest


def copy_volume(folder: Path, dest: Path, *, barcode: str | None = None) -> Path:
    """Copy a volume folder's regular files into a new folder ``dest``, keeping their mtimes.

    Junk (``Thumbs.db``, ``.DS_Store``, ``desktop.ini``, ``._*``) is not copied. A folder
    holding anything but regular files (a subfolder, a link, a FIFO) raises
    :class:`VolumeError` before anything is copied. ``dest`` must not exist yet.
    """
    barcode = barcode or folder.name
    entries = _list_folder(folder, barcode)
    odd = [e.name for e in entries if not e.is_file(follow_symlinks=False)]
    if odd:
        raise VolumeError(barcode, [f"{name} is not a regular file" for name in odd])

    dest.mkdir(parents=True)
    for entry in entries:
        if _is_junk(entry.name):
            continue
        try:
            shutil.copy2(entry.path, dest / entry.name, follow_symlinks=False)
        except FileNotFoundError as exc:
            raise VolumeChangedError(barcode, [f"{entry.name} vanished while copying"]) from exc
    logger.info("%s: copied %s to %s", barcode, folder, dest)
    return dest


def _list_folder(folder: Path, barcode: str) -> list[os.DirEntry[str]]:
    """List a volume folder's entries by name, raising VolumeError if it is not a folder."""
    try:
        st = folder.lstat()
    except FileNotFoundError:
        raise VolumeError(barcode, [f"{folder} does not exist"]) from None
    if stat.S_ISLNK(st.st_mode):
        raise VolumeError(barcode, [f"{folder} is a symbolic link, not a folder"])
    if not stat.S_ISDIR(st.st_mode):
        raise VolumeError(barcode, [f"{folder} is not a folder"])
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError as exc:
        raise VolumeError(barcode, [f"{folder} cannot be listed: {exc.strerror}"]) from exc
    if not entries:
        raise VolumeError(barcode, [f"{folder} is empty"])
    return entries


def _is_junk(name: str) -> bool:
    return name.lower() in _JUNK or name.startswith("._")


def _readable(path: Path) -> bool:
    """Tell whether a regular file can be opened for reading (root can read mode 000 files)."""
    try:
        with path.open("rb"):
            return True
    except PermissionError:
        return False


def _sequence_problems(pages_by_number: dict[int, list[str]]) -> list[str]:
    """Name every duplicate, every missing page image and a sequence not starting at 1."""
    if not pages_by_number:
        return ["no page images (NNNNNNNN.tif or NNNNNNNN.jp2)"]
    problems = [
        f"page {number:08d} appears more than once: {', '.join(sorted(names))}"
        for number, names in sorted(pages_by_number.items())
        if len(names) > 1
    ]
    if 0 in pages_by_number:
        problems.append("page 00000000 is not allowed: the sequence starts at 00000001")

    # Walk the sorted numbers pair by pair, so a huge gap costs nothing to find. Each
    # missing number is named, except inside a run longer than _MAX_LISTED_GAP.
    previous = 0
    for number in sorted(n for n in pages_by_number if n > 0):
        first, last = previous + 1, number - 1
        if last - first >= _MAX_LISTED_GAP:
            count = last - first + 1
            problems.append(f"page images {first:08d} to {last:08d} are missing ({count})")
        else:
            problems.extend(f"page image {n:08d} is missing" for n in range(first, last + 1))
        previous = number
    return problems


def _decode(data: bytes) -> str:
    """Decode checksum.md5 bytes by their byte-order mark, else as UTF-8 (or BOM-less UTF-16)."""
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if data.startswith(bom):
            return data.decode(encoding)
    if len(data) >= 2 and b"\x00" in data:
        # NOTE: some Windows tools write UTF-16 without a byte-order mark; the NUL bytes
        # of its ASCII characters tell which byte order it is.
        # Only an all-ASCII result is trusted, as a guess could turn any bytes into text.
        text = data.decode("utf-16-le" if data[1] == 0 else "utf-16-be", errors="replace")
        if text.isascii():
            return text
    return data.decode("utf-8")


def _zip_info(path: Path, method: int, barcode: str) -> zipfile.ZipInfo:
    """Describe a file as a zip entry named by its bare name; failure means the volume changed."""
    try:
        info = zipfile.ZipInfo.from_file(path, path.name, strict_timestamps=False)
    except OSError as exc:
        raise VolumeChangedError(
            barcode, [f"{path.name} cannot be read for zipping: {exc.strerror or exc}"]
        ) from exc
    info.compress_type = method
    return info


def _read_chunks(path: Path, barcode: str) -> Iterator[bytes]:
    """Yield a file's bytes in chunks; a read failure means the volume changed under us."""
    try:
        with path.open("rb") as source:
            while chunk := source.read(CHUNK_SIZE):
                yield chunk
    except OSError as exc:
        raise VolumeChangedError(
            barcode, [f"{path.name} cannot be read for zipping: {exc.strerror or exc}"]
        ) from exc
