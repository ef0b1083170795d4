"""Run N new barcodes to Delivered against a fresh sandbox, then a no-op rerun.

Zips (tiny, valid) and their ``zipped`` markers are put in the S3 input prefix first,
as the zipping host leaves them; the simulators answer with no latency and the hold
is 0 days. Prints, for each size: wall time, S3 requests (counted from the S3
server's own access log), Alma and Zephir calls (from the simulators' request logs);
then the no-op rerun against one plain listing of the marker prefix, timed in the
same run; and the ratio of the largest run's wall time to the smallest's::

    python bench/scale.py --sizes 1000 10000
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import configparser
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox.alma_sim import AlmaControl
from sandbox.services import BUCKET, Ports, Sandbox
from sandbox.volumes import sample_barcodes
from sandbox.zephir_sim import ZephirControl

REPO = Path(__file__).resolve().parent.parent


def tiny_zip() -> bytes:
    """A valid zip of one page image and its checksum file."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("00000001.tif", b"II*\x00" + b"\x00" * 60)
        archive.writestr("checksum.md5", "0" * 32 + "  00000001.tif\n")
    return out.getvalue()


def seed(box: Sandbox, barcodes: list[str]) -> None:
    """Put each barcode's zip and zipped marker in S3, as the zipping host would."""
    client = box.s3_client()
    body = tiny_zip()
    md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())

    def put(barcode: str) -> None:
        client.put_object(Bucket=BUCKET, Key=f"input/{barcode}.zip", Body=body)
        details = {"zip_size": len(body), "zip_md5": md5}
        marker = {"barcode": barcode, "status": "zipped", "timestamp": stamp, "details": details}
        client.put_object(
            Bucket=BUCKET, Key=f"state/zipped/{barcode}.json", Body=json.dumps(marker).encode()
        )

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, barcodes))


def by_kind(requests: list[str]) -> str:
    """Requests counted by kind; a GET of the bucket itself is a listing."""
    kinds: collections.Counter[str] = collections.Counter()
    for request in requests:
        method, path = request.split(" ", 1)
        listing = method == "GET" and path.split("?", 1)[0].strip("/") == BUCKET
        kinds["LIST" if listing else method] += 1
    return ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())


def cpu_seconds(pid: int) -> float:
    """CPU time a process and its waited-for children have used, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = sum(int(f) for f in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def service_cpu(box: Sandbox) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in box.running().items()}


def run(env: dict[str, str], *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return time.perf_counter() - started, result


def measure(size: int, workers: int) -> tuple[dict[str, float], str]:
    """The figures of one run of ``size`` barcodes and its no-op rerun; S3 requests by kind."""
    root = Path(tempfile.mkdtemp(prefix="digifeeds-bench-"))
    box = Sandbox(root, Ports.free())
    box.start()
    try:
        settings = configparser.ConfigParser()
        settings.read_string(box.luigi_config())
        # The workflow host only: the zips are in S3 already.
        settings["digifeeds"].update(host_role="workflow", input_folder="", workers=str(workers))
        config = root / "bench.cfg"
        with config.open("w") as out:
            settings.write(out)
        # The environment cron gives its jobs, not this shell's: HTTP clients read
        # every variable of it on every request, looking for proxy settings.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/"),
            "LANG": "C.UTF-8",
            "LUIGI_CONFIG_PATH": str(config),
        }
        barcodes = sample_barcodes(size, start=100_000)
        seed(box, barcodes)
        alma, zephir = AlmaControl(box.url("alma")), ZephirControl(box.url("zephir"))
        alma.clear_requests()
        zephir.clear_requests()

        before = len(box.s3_requests())
        cpu_before = service_cpu(box)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds, result = run(env, "--hold-days", "0")
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_after = service_cpu(box)
        if result.returncode != 0:
            print(result.stdout, result.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the run of {size} barcodes failed ({result.returncode})")
        requests = box.s3_requests()[before:]
        kinds = by_kind(requests)
        figures = {
            "wall": seconds,
            "s3": len(requests),
            "alma": len([r for r in alma.requests() if "/conf/sets/" in r["path"]]),
            "zephir": len(zephir.requests()),
            "delivered": len(list(box.pickup.glob("*.zip"))),
            "cpu_run": (children_after.ru_utime + children_after.ru_stime)
            - (children_before.ru_utime + children_before.ru_stime),
        }
        for name, value in cpu_after.items():
            figures[f"cpu_{name}"] = value - cpu_before.get(name, 0.0)

        before = len(box.s3_requests())
        figures["noop_wall"], again = run(env, "--hold-days", "0")
        figures["noop_s3"] = len(box.s3_requests()) - before
        if again.returncode != 0 or "0 delivered" not in again.stdout:
            raise SystemExit(f"the no-op rerun did work: {again.stdout}")

        client = box.s3_client()
        started = time.perf_counter()
        keys = 0
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix="state/"
        ):
            keys += len(page.get("Contents", []))
        figures["listing_wall"] = time.perf_counter() - started
        figures["markers"] = keys
        return figures, kinds
    finally:
        box.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument(
        "--workers", type=int, default=4, help="[digifeeds] workers: batches built at once"
    )
    args = parser.parse_args()
    results = {}
    for size in args.sizes:
        print(f"running {size} barcodes...", flush=True)
        figures, kinds = measure(size, args.workers)
        results[size] = figures
        print(
            f"{size:>6} barcodes: {figures['wall']:7.1f} s, {figures['delivered']:.0f} delivered, "
            f"S3 {figures['s3']:.0f} requests ({figures['s3'] / size:.1f} per barcode), "
            f"Alma {figures['alma']:.0f} calls (1 per {size / max(figures['alma'], 1):.0f}), "
            f"Zephir {figures['zephir']:.0f} calls",
            flush=True,
        )
        print(f"        S3 requests by kind: {kinds}", flush=True)
        cpu = {k[4:]: v for k, v in figures.items() if k.startswith("cpu_")}
        print(
            "        CPU seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items())),
            flush=True,
        )
        print(
            f"        no-op rerun: {figures['noop_wall']:5.1f} s, S3 {figures['noop_s3']:.0f} "
            f"requests ({figures['noop_s3'] / size * 1000:.0f} per 1000 barcodes); "
            f"reference: one listing of {figures['markers']:.0f} markers "
            f"{figures['listing_wall']:.2f} s (ratio "
            f"{figures['noop_wall'] / figures['listing_wall']:.2f})",
            flush=True,
        )
    if len(results) > 1:
        small, large = min(results), max(results)
        print(
            f"wall-time ratio {large}/{small}: "
            f"{results[large]['wall'] / results[small]['wall']:.1f} "
            f"(linear would be {large / small:.0f})"
        )


if __name__ == "__main__":
    main()
