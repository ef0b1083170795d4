"""ZipVolume end to end: packaging that survives a kill -9, refuses bad volumes, and waits.

Each test runs ``digifeeds`` as a subprocess against the sandbox and looks behind it at
the input, working and processed folders and at S3.
"""

from __future__ import annotations

import configparser
import hashlib
import io
import json
import os
import random
import re
import signal
import time
import zipfile
from pathlib import Path

import pytest
from helpers import digifeeds, failure, history, new_barcodes, s3_client, snapshot

from pipeline.volume import last_change
from sandbox.alma_sim import AlmaControl
from sandbox.services import BUCKET, Sandbox
from sandbox.volumes import make_volume
from sandbox.zephir_sim import ZephirControl

ZIP_ONLY = ("run", "--role", "zip", "--local-scheduler", "--workers", "1")

# ZipVolume's crash points (pipeline.tasks._crash_point), in the order a run passes them.
CRASH_POINTS = ["zipping", "uploading", "uploaded", "kept", "zipped", "retiring"]
# From this point on the zipped marker exists and the input folder may be (partly) gone.
MARKED = CRASH_POINTS.index("zipped")

# A settling time a test can wait out: 6 seconds.
SHORT_SETTLE_MINUTES = 0.1


def input_zips(sandbox: Sandbox) -> dict[str, bytes]:
    """Every object in the S3 input prefix, with its bytes."""
    client = s3_client(sandbox)
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix="input/").get("Contents", [])
    return {
        o["Key"]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing
    }


def zipped_marker(barcode: str) -> dict[str, object] | None:
    """The details of the barcode's zipped marker, read with ``digifeeds status``."""
    answer = digifeeds("status", "--json", barcode)
    assert answer.returncode == 0, answer.stderr
    found = [m for m in json.loads(answer.stdout)["history"] if m["status"] == "zipped"]
    return found[0]["details"] if found else None


def page_images(volume: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in volume.items() if name.endswith((".tif", ".jp2"))}


def assert_zip_holds(data: bytes, volume: dict[str, bytes]) -> None:
    """The zip holds every page image of ``volume`` and its checksum.md5, each once, intact."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        expected = [*sorted(page_images(volume)), "checksum.md5"]
        assert names == expected
        for name in names:
            assert archive.read(name) == volume[name], name


def assert_nothing_lost(sandbox: Sandbox, barcode: str, volume: dict[str, bytes]) -> None:
    """The input folder is unchanged, or the verified zip, the marker and a copy all exist.

    A folder deleted only in part may hold only untouched files of the volume.
    """
    folder = sandbox.input / barcode
    left = snapshot(folder) if folder.exists() else {}
    if left == volume:
        return
    assert all(volume.get(name) == data for name, data in left.items()), "input folder changed"
    details = zipped_marker(barcode)
    assert details is not None, "input folder touched before the zipped marker"
    assert_zip_holds(input_zips(sandbox)[f"input/{barcode}.zip"], volume)
    kept = Path(str(details["processed_copy"]))
    assert snapshot(kept / barcode) == volume
    assert hashlib.md5((kept / f"{barcode}.zip").read_bytes()).hexdigest() == details["zip_md5"]


def crash_volume(parent: Path, barcode: str) -> Path:
    """A volume whose zip is a few upload chunks long: one page image is 1.5 MB of noise."""
    folder = make_volume(parent, barcode, pages=3)
    (folder / "00000003.tif").write_bytes(random.Random(barcode).randbytes(1_500_000))
    write_checksums(folder)
    return folder


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_kill_during_zipping_loses_nothing_and_the_rerun_zips_once(
    clean: Sandbox, point: str
) -> None:
    (barcode,) = new_barcodes(1)
    folder = crash_volume(clean.input, barcode)
    volume = snapshot(folder)

    crashed = digifeeds(*ZIP_ONLY, env={"DIGIFEEDS_CRASH_AT": point})

    # A real kill -9 at the named point, which left the state of that point.
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert f"DIGIFEEDS_CRASH_AT is {point}" in crashed.stderr
    assert_nothing_lost(clean, barcode, volume)
    marked = zipped_marker(barcode) is not None
    assert marked == (CRASH_POINTS.index(point) >= MARKED)
    uploaded = f"input/{barcode}.zip" in input_zips(clean)
    assert uploaded == (CRASH_POINTS.index(point) >= CRASH_POINTS.index("uploaded"))
    kept = list(clean.processed.glob(f"{barcode}_*"))
    assert bool(kept) == (CRASH_POINTS.index(point) >= CRASH_POINTS.index("kept"))
    if point == "retiring":
        assert folder.exists() and snapshot(folder) != volume
    else:
        assert snapshot(folder) == volume
    if point in ("zipping", "uploading", "uploaded", "kept"):
        # The crash left its scratch zip behind, half-written or whole.
        assert any((clean.working / f"{barcode}.working").iterdir())

    rerun = digifeeds(*ZIP_ONLY)

    assert rerun.returncode == 0, rerun.stderr
    assert history(barcode) == ["zipped"]
    assert failure(barcode) is None
    assert not folder.exists()
    zips = input_zips(clean)
    assert list(zips) == [f"input/{barcode}.zip"]
    assert_zip_holds(zips[f"input/{barcode}.zip"], volume)
    assert_nothing_lost(clean, barcode, volume)
    assert not (clean.working / f"{barcode}.working").exists()


def test_a_folder_changed_after_zipping_is_not_deleted(clean: Sandbox) -> None:
    (barcode,) = new_barcodes(1)
    folder = make_volume(clean.input, barcode, pages=2)
    crashed = digifeeds(*ZIP_ONLY, env={"DIGIFEEDS_CRASH_AT": "zipped"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    (folder / "00000003.tif").write_bytes(b"a page scanned after zipping")
    before = snapshot(folder)

    rerun = digifeeds(*ZIP_ONLY)

    assert rerun.returncode == 1
    assert snapshot(folder) == before
    recorded = failure(barcode)
    assert recorded is not None and "differs from the one zipped" in recorded["message"]


def write_checksums(folder: Path, *, skip: tuple[str, ...] = (), extra: str = "") -> None:
    """Write an md5sum-style checksum.md5 for the folder's plain files, less ``skip``."""
    lines = [
        f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}\n"
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.is_symlink() and p.name not in {"checksum.md5", *skip}
    ]
    (folder / "checksum.md5").write_text("".join(lines) + extra)


def pages(folder: Path, *names: str) -> Path:
    """Make a volume folder holding these page images (small fake scans) and nothing else."""
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(f"scan of {name}".encode())
    return folder


def bad_volumes(parent: Path, outside: Path) -> dict[str, tuple[str, ...]]:
    """Write one folder per kind of bad volume; return what each one's failure must name."""
    names = iter(new_barcodes(17))
    causes: dict[str, tuple[str, ...]] = {}

    def volume(*page_names: str, cause: tuple[str, ...], checksums: bool = True) -> Path:
        barcode = next(names)
        folder = pages(parent / barcode, *page_names)
        if checksums:
            write_checksums(folder)
        causes[barcode] = cause
        return folder

    volume(cause=("is empty",), checksums=False)
    only = volume(cause=("no page images",), checksums=False)
    (only / "checksum.md5").write_text(f"{'0' * 32}  00000001.tif\n")
    volume(
        "00000001.tif", "00000002.tif", "00000004.tif", cause=("page image 00000003 is missing",)
    )
    volume("00000000.tif", "00000001.tif", "00000002.tif", cause=("page 00000000 is not allowed",))
    volume("00000002.tif", "00000003.tif", cause=("page image 00000001 is missing",))
    volume(
        "00000001.tif",
        "00000002.tif",
        "00000002.jp2",
        cause=("page 00000002 appears more than once", "00000002.jp2", "00000002.tif"),
    )
    volume("00000001.tif", "0000002.tif", cause=("0000002.tif is not a valid page image name",))
    volume("00000001.tif", "000000002.jp2", cause=("000000002.jp2 is not a valid page image",))
    volume("00000001.tif", "00000002.TIF", cause=("00000002.TIF is not a valid page image name",))
    empty = volume("00000001.tif", cause=("00000002.jp2 is empty (0 bytes)",), checksums=False)
    (empty / "00000002.jp2").write_bytes(b"")
    write_checksums(empty)
    volume("00000001.tif", "00000002.tif", cause=("checksum.md5 is missing",), checksums=False)
    malformed = volume("00000001.tif", cause=("checksum.md5 line 2 is malformed",))
    write_checksums(malformed, extra="not a checksum line\n")
    listed = volume("00000001.tif", cause=("lists 00000002.tif, which is not in the folder",))
    write_checksums(listed, extra=f"{'0' * 32}  00000002.tif\n")
    unlisted = volume("00000001.tif", "00000002.jp2", cause=("00000002.jp2 is not listed",))
    write_checksums(unlisted, skip=("00000002.jp2",))
    nested = volume(cause=("pages is a subfolder",), checksums=False)
    pages(nested / "pages", "00000001.tif", "00000002.tif")
    write_checksums(nested)
    inside = volume("00000001.tif", cause=("00000002.tif is a symbolic link",))
    (inside / "00000002.tif").symlink_to("00000001.tif")
    linked_out = volume("00000001.tif", cause=("00000002.tif is a symbolic link", str(outside)))
    (linked_out / "00000002.tif").symlink_to(outside)
    return causes


def folder_state(folder: Path) -> tuple[dict[str, bytes], dict[str, str], float]:
    """A folder's files with their bytes, its links with their targets, and its mtime."""
    links = {
        str(p.relative_to(folder)): os.readlink(p) for p in folder.rglob("*") if p.is_symlink()
    }
    return snapshot(folder), links, folder.stat().st_mtime


def test_one_run_refuses_every_bad_volume_and_name_and_delivers_the_good_ones(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl, tmp_path: Path
) -> None:
    outside = tmp_path / "00000002.tif"
    outside.write_bytes(b"a page outside the input folder")
    causes = bad_volumes(clean.input, outside)
    good = new_barcodes(2)
    for barcode in good:
        make_volume(clean.input, barcode, pages=2)
    not_barcodes = ["39015 0001 2345", "39015000000012.old", "thirty9015abcd", "390150000000123"]
    for name in not_barcodes:
        pages(clean.input / name, "00000001.tif")
        write_checksums(clean.input / name)
    (clean.input / "notes.txt").write_text("scanner notes")
    before = {barcode: folder_state(clean.input / barcode) for barcode in causes}
    refused_before = {name: folder_state(clean.input / name) for name in not_barcodes}

    result = digifeeds("run")

    assert result.returncode == 1, result.stderr
    for barcode in good:
        with zipfile.ZipFile(clean.pickup / f"{barcode}.zip") as archive:
            assert archive.testzip() is None
    for barcode, cause in causes.items():
        recorded = failure(barcode)
        assert recorded is not None, barcode
        assert recorded["kind"] == "bad_volume", recorded
        assert barcode in recorded["message"]
        for words in cause:
            assert words in recorded["message"], recorded["message"]
        assert folder_state(clean.input / barcode) == before[barcode]
        assert history(barcode) == []
        assert not (clean.pickup / f"{barcode}.zip").exists()
    for name in [*not_barcodes, "notes.txt"]:
        assert f"{name}: refused" in result.stderr
    for name in not_barcodes:
        assert folder_state(clean.input / name) == refused_before[name]
    assert (clean.input / "notes.txt").read_text() == "scanner notes"
    assert set(input_zips(clean)) == set()
    assert f"failed: {len(causes)} bad_volume, {len(not_barcodes) + 1} refused" in result.stdout


def settling_config(path: Path, minutes: float) -> dict[str, str]:
    """Write the sandbox's configuration with ``settle_minutes``; return the environment."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.environ["LUIGI_CONFIG_PATH"])
    parser.set("digifeeds", "settle_minutes", str(minutes))
    with path.open("w") as out:
        parser.write(out)
    return {"LUIGI_CONFIG_PATH": str(path)}


def test_a_fresh_volume_waits_ten_minutes_even_with_back_dated_mtimes(
    clean: Sandbox, tmp_path: Path
) -> None:
    (barcode,) = new_barcodes(1)
    folder = make_volume(clean.input, barcode, pages=2)
    # Old mtimes on new files, as a copy by cp -p or rsync -a leaves them.
    eleven_minutes_ago = time.time() - 11 * 60
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (eleven_minutes_ago, eleven_minutes_ago))
    before = snapshot(folder)
    env = settling_config(tmp_path / "settle.cfg", 10)

    result = digifeeds(*ZIP_ONLY, env=env)

    # The ctimes, which no copy or touch can set back, are as new as the volume.
    assert result.returncode == 0, result.stderr
    assert "0 zipped" in result.stdout and "failed: none" in result.stdout
    assert history(barcode) == []
    assert failure(barcode) is None
    assert snapshot(folder) == before
    assert input_zips(clean) == {}


def test_a_volume_is_zipped_once_it_has_settled(clean: Sandbox, tmp_path: Path) -> None:
    (barcode,) = new_barcodes(1)
    folder = make_volume(clean.input, barcode, pages=2)
    written_at = last_change(folder)
    env = settling_config(tmp_path / "settle.cfg", SHORT_SETTLE_MINUTES)

    early = digifeeds(*ZIP_ONLY, env=env)

    assert time.time() - written_at < SHORT_SETTLE_MINUTES * 60, "too slow to see the wait"
    assert early.returncode == 0, early.stderr
    assert history(barcode) == []
    assert folder.exists()

    time.sleep(max(0.0, written_at + SHORT_SETTLE_MINUTES * 60 + 0.5 - time.time()))
    settled = digifeeds(*ZIP_ONLY, env=env)

    assert settled.returncode == 0, settled.stderr
    assert "1 zipped" in settled.stdout
    assert history(barcode) == ["zipped"]
    assert not folder.exists()


def test_a_volume_waiting_to_settle_is_reported_as_waiting_on_zip(
    clean: Sandbox, tmp_path: Path
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode, pages=2)
    env = settling_config(tmp_path / "settle.cfg", 10)

    result = digifeeds(*ZIP_ONLY, env=env)

    assert result.returncode == 0, result.stderr
    assert "waiting: 1 on zip" in result.stdout


def test_a_builder_killed_mid_batch_fails_that_batch_and_the_others_go_on(
    clean: Sandbox,
) -> None:
    doomed, other = new_barcodes(2)
    volumes = {b: snapshot(crash_volume(clean.input, b)) for b in (doomed, other)}
    # luigid would hold the killed task as running for a while; as in the tests above,
    # each builder schedules for itself.
    parallel = (*ZIP_ONLY[:-1], "2", "--batch-size", "1")

    crashed = digifeeds(*parallel, env={"DIGIFEEDS_CRASH_AT": f"zipped:{doomed}"})

    assert crashed.returncode == 1, crashed.stderr
    assert re.search(r"batch \d: its builder \(pid \d+\) died \(exit code -9\)", crashed.stderr)
    assert "1 batches stopped when their builder died" in crashed.stdout
    # The summary read back what the dead builder had recorded.
    assert "2 zipped" in crashed.stdout
    assert history(other) == ["zipped"] and not (clean.input / other).exists(), crashed.stderr
    assert history(doomed) == ["zipped"] and (clean.input / doomed).exists()
    assert_nothing_lost(clean, doomed, volumes[doomed])

    rerun = digifeeds(*parallel)

    assert rerun.returncode == 0, rerun.stderr
    assert not (clean.input / doomed).exists()
    assert sorted(input_zips(clean)) == sorted(f"input/{b}.zip" for b in (doomed, other))
    for barcode, volume in volumes.items():
        assert_zip_holds(input_zips(clean)[f"input/{barcode}.zip"], volume)
