"""Time ZipVolume's local work on a volume against Info-ZIP's ``zip -r -q`` on the same folder.

Ours is what ZipVolume does before uploading: ``inspect_volume`` (page order, and the md5
of every file against checksum.md5) and ``write_zip`` (write, re-read with every CRC
checked, md5 of the zip). The reference only writes a zip. Both deflate at the default
level (6). The volume, built by ``make_scaled_volume`` from a real fixture's pages, is
read once before timing so the page cache is equally warm for both; runs then alternate,
reference first. The ratio printed is our median time over the reference's::

    python bench/zip_volume.py --pages 400 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.volume import inspect_volume, write_zip
from sandbox.volumes import make_scaled_volume, sample_barcodes

REPO = Path(__file__).resolve().parent.parent
# The shared sample volumes (DIGIFEEDS_FIXTURES names their folder), as in the tests.
FIXTURES = Path(
    os.environ.get("DIGIFEEDS_FIXTURES", REPO.parent / "shared" / "fixtures" / "volumes")
)
FIXTURE = FIXTURES / "39015012078393"
MIN_FREE = 8 * 1024**3
CHUNK = 4 * 1024 * 1024


def enough_space(folder: Path) -> bool:
    """Tell whether ``folder``'s file system has the free space the benchmark needs."""
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE:
        print(
            f"skipped: {folder} has {free / 1024**3:.1f} GB free, the benchmark needs "
            f"{MIN_FREE / 1024**3:.0f} GB"
        )
        return False
    return True


def volume_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())


def warm(folder: Path) -> None:
    """Read every file of ``folder`` once, so the page cache holds the volume."""
    for path in sorted(folder.iterdir()):
        with path.open("rb") as source:
            while source.read(CHUNK):
                pass


def time_zip_command(folder: Path, dest: Path) -> float:
    """Zip ``folder`` with ``zip -r -q`` (deflate, level 6) and return the seconds it took."""
    started = time.perf_counter()
    subprocess.run(["zip", "-r", "-q", str(dest), folder.name], cwd=folder.parent, check=True)
    elapsed = time.perf_counter() - started
    dest.unlink()
    return elapsed


def time_ours(folder: Path, barcode: str, dest: Path) -> float:
    """Inspect and zip ``folder`` as ZipVolume does and return the seconds it took."""
    started = time.perf_counter()
    manifest = inspect_volume(folder, barcode)
    write_zip(manifest, dest, compression="deflate")
    elapsed = time.perf_counter() - started
    dest.unlink()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=400, help="page images in the volume")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (at least 3)")
    parser.add_argument("--fixture", type=Path, default=FIXTURE, help="fixture volume folder")
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the temporary folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if shutil.which("zip") is None:
        print("skipped: the zip command is not installed")
        return 0
    parent = args.tmp or Path(tempfile.gettempdir())
    if not enough_space(parent):
        return 0

    with tempfile.TemporaryDirectory(prefix="digifeeds-bench-", dir=parent) as tmp:
        work = Path(tmp)
        barcode = sample_barcodes(1, start=9000)[0]
        started = time.perf_counter()
        folder = make_scaled_volume(work / "input", barcode, args.pages, args.fixture)
        size = volume_bytes(folder)
        print(
            f"volume: {args.pages} pages, {size / 1e9:.2f} GB "
            f"({size / args.pages / 1e6:.2f} MB per page), "
            f"built in {time.perf_counter() - started:.0f} s in {folder}"
        )
        warm(folder)

        reference: list[float] = []
        ours: list[float] = []
        for run in range(1, max(args.repeats, 3) + 1):
            reference.append(time_zip_command(folder, work / "reference.zip"))
            ours.append(time_ours(folder, barcode, work / "ours.zip"))
            print(f"run {run}: zip -r -q {reference[-1]:6.2f} s   ours {ours[-1]:6.2f} s")

        ref_median, our_median = statistics.median(reference), statistics.median(ours)
        for label, median in (("zip -r -q (reference)", ref_median), ("ours", our_median)):
            print(f"{label:22} median: {median:6.2f} s  {size / median / 1e6:5.0f} MB/s")
        ratio = our_median / ref_median
        verdict = "met" if ratio <= 1.2 else "MISSED"
        print(f"ratio ours / reference: {ratio:.2f}; target at most 1.20: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
