"""The clients a process shares, built from configuration on first use.

Luigi may fork worker processes; a client (and its open connections) is never
shared across a fork, so each cache is keyed by process id.
"""

from __future__ import annotations

import getpass
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pipeline import config
from pipeline.alma import AlmaClient, RateLimiter
from pipeline.pickup import PickupClient
from pipeline.storage import Storage
from pipeline.zephir import ZephirClient
from targets.markers import MarkerStore

T = TypeVar("T")

RUN_FOLDER_VARIABLE = "DIGIFEEDS_RUN_FOLDER"

_cache: dict[tuple[int, str], object] = {}


def _shared(name: str, build: Callable[[], T]) -> T:
    key = (os.getpid(), name)
    if key not in _cache:
        _cache[key] = build()
    return _cache[key]  # type: ignore[return-value]


def reset() -> None:
    """Forget every client, so the next use rebuilds it from the configuration."""
    _cache.clear()


def storage() -> Storage:
    """The S3 client for the configured bucket."""

    def build() -> Storage:
        cfg = config.s3()
        return Storage(
            cfg.bucket,
            endpoint_url=cfg.endpoint_url or None,
            region=cfg.region,
            credentials_file=cfg.credentials_file or None,
            max_attempts=cfg.max_attempts,
            timeout=cfg.timeout,
            chunk_size=cfg.multipart_chunk_mb * 1024 * 1024,
        )

    return _shared("storage", build)


def markers() -> MarkerStore:
    """The marker store under the configured state prefix."""
    return _shared("markers", lambda: MarkerStore(storage(), config.s3().state_prefix))


def run_folder() -> Path:
    """A folder for what the workers of one run share on this host (rate limit, flags).

    ``digifeeds run`` makes one per run; any other process makes its own on first use
    and hands it down to the workers it forks through the environment.
    """
    path = os.environ.get(RUN_FOLDER_VARIABLE)
    if not path:
        path = tempfile.mkdtemp(prefix="digifeeds-run-")
        os.environ[RUN_FOLDER_VARIABLE] = path
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def alma_stop_file() -> Path:
    """Written when Alma refused the key, the set or the quota: no more calls this run."""
    return run_folder() / "alma-stopped"


def alma_retry_file() -> Path:
    """Barcodes Alma took in a batch call that failed for another barcode in it.

    One file per process: each of a run's builders goes on with its own.
    """
    return run_folder() / f"alma-retry.{os.getpid()}"


def alma_remaining_file() -> Path:
    """Holds the last X-Exl-Api-Remaining any worker of this run saw."""
    return run_folder() / "alma-remaining"


def alma() -> AlmaClient:
    """The Alma client, rate-limited across this host's workers."""

    def build() -> AlmaClient:
        cfg = config.alma()
        key = config.read_secret("Alma API key", cfg.api_key_env, cfg.api_key_file)
        limiter = RateLimiter(run_folder() / "alma-rate", cfg.calls_per_second)
        return AlmaClient(
            cfg.base_url,
            cfg.set_id,
            key,
            timeout=cfg.timeout,
            retries=cfg.retries,
            rate_limiter=limiter,
        )

    return _shared("alma", build)


def zephir() -> ZephirClient:
    """The Zephir client."""

    def build() -> ZephirClient:
        cfg = config.zephir()
        return ZephirClient(cfg.base_url, timeout=cfg.timeout, retries=cfg.retries)

    return _shared("zephir", build)


def pickup() -> PickupClient:
    """The SFTP pickup client (connects on first delivery)."""

    def build() -> PickupClient:
        cfg = config.pickup()
        password = config.read_secret(
            "pickup password", cfg.password_env, cfg.password_file, required=not cfg.key_file
        )
        return PickupClient(
            cfg.host,
            cfg.port,
            cfg.username or getpass.getuser(),
            cfg.directory,
            Path(cfg.known_hosts),
            key_file=Path(cfg.key_file) if cfg.key_file else None,
            password=password or None,
            timeout=cfg.timeout,
        )

    return _shared("pickup", build)
