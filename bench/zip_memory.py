"""Measure the peak memory of inspecting and zipping a large volume, against an idle baseline.

A child process imports ``pipeline.volume``, runs ``inspect_volume`` and ``write_zip``
(deflate) on a volume of about 2 GB built by ``make_scaled_volume`` from a real fixture's
pages, and exits. The baseline is a child that imports the same module and does nothing.
The peak of each is its ``ru_maxrss``, read by the parent from ``wait4``; the difference
is what the work itself costs. Linux counts in a child's ``ru_maxrss`` the memory of the
parent it was forked from, so the volume is built in a child too and this script itself
imports nothing heavy; each child also prints its own ``VmHWM`` as a cross-check. The
target is a peak under 300 MB::

    python bench/zip_memory.py --pages 800
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The shared sample volumes (DIGIFEEDS_FIXTURES names their folder), as in the tests.
FIXTURES = Path(
    os.environ.get("DIGIFEEDS_FIXTURES", REPO.parent / "shared" / "fixtures" / "volumes")
)
FIXTURE = FIXTURES / "39015012078393"
BARCODE = "39015000091002"  # a valid barcode with its check digit
MIN_FREE = 8 * 1024**3
TARGET_MB = 300

_PATH = f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
_HWM = (
    "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')]\n"
    "print(hwm[0].split()[1])\n"
)
BUILD = _PATH + (
    "from pathlib import Path\n"
    "from sandbox.volumes import make_scaled_volume\n"
    "make_scaled_volume(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))\n"
)
BASELINE = _PATH + "import pipeline.volume as volume\n" + _HWM
WORK = (
    BASELINE.removesuffix(_HWM)
    + "from pathlib import Path\n"
    + "folder, barcode, dest = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])\n"
    + "manifest = volume.inspect_volume(folder, barcode)\n"
    + "volume.write_zip(manifest, dest, compression='deflate')\n"
    + _HWM
)


def peak_mb(code: str, *args: str) -> tuple[float, float]:
    """Run ``code`` in a child Python; return its ru_maxrss and its own VmHWM, in MB."""
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE)
    assert child.stdout is not None
    printed = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"the child process failed with exit code {child.returncode}")
    return usage.ru_maxrss / 1024, int(printed.split()[-1]) / 1024  # both in KiB on Linux


def own_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=800, help="page images in the volume")
    parser.add_argument("--fixture", type=Path, default=FIXTURE, help="fixture volume folder")
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the temporary folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    parent = args.tmp or Path(tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < MIN_FREE:
        print(
            f"skipped: {parent} has {free / 1024**3:.1f} GB free, the benchmark needs "
            f"{MIN_FREE / 1024**3:.0f} GB"
        )
        return 0

    with tempfile.TemporaryDirectory(prefix="digifeeds-bench-", dir=parent) as tmp:
        work = Path(tmp)
        barcode = BARCODE
        started = time.perf_counter()
        folder = work / "input" / barcode
        build = [sys.executable, "-c", BUILD, str(folder.parent), barcode, str(args.pages)]
        subprocess.run([*build, str(args.fixture)], check=True)
        size = sum(path.stat().st_size for path in folder.iterdir())
        print(
            f"volume: {args.pages} pages, {size / 1e9:.2f} GB, "
            f"built in {time.perf_counter() - started:.0f} s in {folder}"
        )

        baseline, baseline_hwm = peak_mb(BASELINE)
        started = time.perf_counter()
        peak, peak_hwm = peak_mb(WORK, str(folder), barcode, str(work / f"{barcode}.zip"))
        elapsed = time.perf_counter() - started
        zipped = (work / f"{barcode}.zip").stat().st_size
        print(f"zip: {zipped / 1e9:.2f} GB written and verified in {elapsed:.0f} s")
        print(f"parent (this script) peak:         {own_peak_mb():7.1f} MB")
        print("                                    ru_maxrss    VmHWM")
        print(f"baseline (imports only) peak:      {baseline:7.1f} MB {baseline_hwm:7.1f} MB")
        print(f"inspect_volume + write_zip peak:   {peak:7.1f} MB {peak_hwm:7.1f} MB")
        print(
            f"difference (the work itself):      {peak - baseline:7.1f} MB "
            f"{peak_hwm - baseline_hwm:7.1f} MB"
        )
        verdict = "met" if peak < TARGET_MB else "MISSED"
        print(
            f"ratio peak / baseline: {peak / baseline:.2f}; "
            f"target peak under {TARGET_MB} MB: {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
