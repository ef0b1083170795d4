"""Helpers the tests share: looking behind the pipeline, running its commands."""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.storage import Storage
from sandbox.services import Sandbox
from sandbox.volumes import sample_barcodes

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(
    os.environ.get("DIGIFEEDS_FIXTURES", REPO.parent / "shared" / "fixtures" / "volumes")
)


def fixtures() -> Path:
    """The folder of real sample volumes; the test is skipped, saying so, where it is not."""
    if not FIXTURES.is_dir():
        import pytest

        pytest.skip(f"fixture volumes {FIXTURES} are not available (set DIGIFEEDS_FIXTURES)")
    return FIXTURES


# Every status of an item that went all the way, in order.
DELIVERED = [
    "zipped",
    "added_to_digifeeds_set",
    "in_zephir",
    "ready_for_pickup",
    "copying_start",
    "copying_end",
    "pending_deletion",
]

_barcode_numbers = itertools.count(1000)


def new_barcodes(count: int) -> list[str]:
    """Barcodes no other test of this session uses."""
    return sample_barcodes(count, start=next(_barcode_numbers) * 100)


def s3_client(sandbox: Sandbox):  # type: ignore[no-untyped-def]
    """A plain boto3 client on the sandbox's S3 server, for looking behind the pipeline."""
    return sandbox.s3_client()


def digifeeds(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``digifeeds`` command from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def luigi_command(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the plain ``luigi --module pipeline`` command from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "luigi", "--module", "pipeline", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def history(barcode: str) -> list[str]:
    """The statuses recorded for ``barcode``, oldest first, read with ``digifeeds status``."""
    answer = digifeeds("status", "--json", barcode)
    assert answer.returncode == 0, answer.stderr
    return [m["status"] for m in json.loads(answer.stdout)["history"]]


def failure(barcode: str) -> dict[str, str] | None:
    """The barcode's failure record, read with ``digifeeds status``."""
    answer = digifeeds("status", "--json", barcode)
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)["failure"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to show a folder is untouched."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def config_with(path: Path, settings: dict[str, dict[str, str]]) -> dict[str, str]:
    """Write the test sandbox's configuration plus ``settings`` to ``path``.

    Returns the environment that makes a ``digifeeds`` subprocess read it.
    """
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.environ["LUIGI_CONFIG_PATH"])
    for section, values in settings.items():
        if not parser.has_section(section):
            parser.add_section(section)
        for key, value in values.items():
            parser.set(section, key, value)
    with path.open("w") as out:
        parser.write(out)
    return {"LUIGI_CONFIG_PATH": str(path)}


def count_requests(storage: Storage) -> collections.Counter[str]:
    """Count the requests the client sends from now on, by operation."""
    counts: collections.Counter[str] = collections.Counter()

    def on_send(request: object, **kwargs: object) -> None:
        counts[str(kwargs["event_name"]).split(".")[-1]] += 1

    storage.client.meta.events.register("before-send.s3", on_send)
    return counts
