"""Time PickupClient against OpenSSH's sftp, delivering the same file to the same server.

Both upload one file of random bytes (zips do not compress) to a sandbox sshd on
loopback, in alternating runs; each time includes connecting and logging in. The
ratio printed is PickupClient's median time over sftp's::

    python bench/sftp_delivery.py --size-mb 200 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.barcodes import with_check_digit
from pipeline.pickup import PickupClient
from sandbox.sshd import SshdServer

BARCODE = with_check_digit("3901500000001")


def make_file(path: Path, size_mb: int) -> None:
    """Write ``size_mb`` MiB of random bytes to ``path``."""
    with path.open("wb") as out:
        for _ in range(size_mb):
            out.write(os.urandom(1024 * 1024))


def time_sftp(server: SshdServer, source: Path, work: Path, cipher: str | None) -> float:
    """Upload ``source`` with OpenSSH's ``sftp -b`` and return the seconds it took."""
    target = server.pickup_dir / "sftp.zip"
    batch = work / "batch"
    batch.write_text(f"put {source} {target}\n")
    command = server.sftp_command(batch)
    command[1:1] = ["-q"]
    if cipher:
        command[1:1] = ["-c", cipher]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def time_client(server: SshdServer, source: Path) -> float:
    """Deliver ``source`` with a fresh PickupClient and return the seconds it took."""
    started = time.perf_counter()
    with PickupClient(
        server.host,
        server.port,
        server.username,
        str(server.pickup_dir),
        server.known_hosts,
        key_file=server.client_key,
    ) as client:
        client.deliver_file(source, BARCODE)
    elapsed = time.perf_counter() - started
    (server.pickup_dir / f"{BARCODE}.zip").unlink()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200, help="file size in MiB")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each uploader")
    parser.add_argument(
        "--sftp-cipher", help="cipher for sftp (-c); by default OpenSSH picks its own"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="sftp-bench-") as folder:
        work = Path(folder)
        source = work / "volume.zip"
        make_file(source, args.size_mb)
        with SshdServer(work / "sshd") as server:
            sftp_times: list[float] = []
            client_times: list[float] = []
            for run in range(1, args.repeats + 1):
                sftp_times.append(time_sftp(server, source, work, args.sftp_cipher))
                client_times.append(time_client(server, source))
                print(
                    f"run {run}: sftp {sftp_times[-1]:.2f}s  PickupClient {client_times[-1]:.2f}s",
                    flush=True,
                )

    sftp_median = statistics.median(sftp_times)
    client_median = statistics.median(client_times)
    print(f"{args.size_mb} MiB, median of {args.repeats}:")
    print(f"  OpenSSH sftp  {sftp_median:.2f}s  ({args.size_mb / sftp_median:.0f} MiB/s)")
    print(f"  PickupClient  {client_median:.2f}s  ({args.size_mb / client_median:.0f} MiB/s)")
    print(f"  ratio         {client_median / sftp_median:.2f}")


if __name__ == "__main__":
    main()
