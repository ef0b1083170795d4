"""Every setting of Digifeeds, as luigi.Config sections; luigi.cfg documents each key.

Secrets are never settings themselves: a setting names the environment variable or
the file that holds the secret, and :func:`read_secret` fetches it when a client is
built.
"""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path
from typing import TypeVar

import luigi
import luigi.configuration
import luigi.parameter

from pipeline.errors import ConfigurationError

HOST_ROLES = ("all", "zip", "workflow")


class digifeeds(luigi.Config):  # the section name in luigi.cfg
    """Where volumes come from and how the run is paced."""

    host_role = luigi.ChoiceParameter(
        default="all",
        choices=HOST_ROLES,
        description="What this host runs: 'zip' (zips volume folders from the input folder), "
        "'workflow' (Alma, Zephir, hold and delivery for zips in S3) or 'all' (both).",
    )
    input_folder = luigi.Parameter(
        default="",
        description="Folder where scanned volume folders arrive, one per barcode. "
        "Empty on a host that does not zip.",
    )
    working_folder = luigi.Parameter(
        default="",
        description="Scratch folder for the zip being made (the volume folder itself is "
        "read in place); needs room for the largest zip. Empty on a host that does not zip.",
    )
    processed_folder = luigi.Parameter(
        default="",
        description="Folder that keeps a timestamped copy of every zipped volume folder "
        "and its zip.",
    )
    settle_minutes = luigi.FloatParameter(
        default=10.0,
        description="A volume folder is zipped only after no file in it has changed for "
        "this many minutes, so folders still being copied in are left for the next run.",
    )
    compression = luigi.ChoiceParameter(
        default="deflate",
        choices=("deflate", "store"),
        description="Zip compression: 'deflate' (what the earlier process made) or 'store'.",
    )
    hold_days = luigi.FloatParameter(
        default=14.0,
        description="Days an item must have been in Zephir before it is delivered.",
    )
    batch_size = luigi.IntParameter(
        default=50,
        description="Barcodes scheduled together in one Luigi build; runs stay linear in "
        "the number of barcodes because builds are bounded.",
    )
    workers = luigi.IntParameter(
        default=2,
        description="Batches 'digifeeds run' builds at once, each in a builder process that "
        "runs its tasks itself and keeps its S3, Alma, Zephir and SFTP connections for "
        "all of them. 1 builds in the run's own process.",
    )
    lock_file = luigi.Parameter(
        default="",
        description="File locked for the length of 'digifeeds run' so that overlapping "
        "runs on one host are refused. Empty: <working_folder>/digifeeds.lock, or the "
        "system temporary folder.",
    )


class s3(luigi.Config):
    """The S3 bucket holding zips and markers."""

    bucket = luigi.Parameter(description="Bucket holding zips and markers.")
    endpoint_url = luigi.Parameter(default="", description="S3 endpoint; empty for AWS itself.")
    region = luigi.Parameter(default="us-east-1", description="S3 region.")
    input_prefix = luigi.Parameter(
        default="input/", description="Prefix of zips waiting for delivery."
    )
    processed_prefix = luigi.Parameter(
        default="processed/", description="Prefix zips are moved to once delivered."
    )
    state_prefix = luigi.Parameter(default="state/", description="Prefix of the status markers.")
    credentials_file = luigi.Parameter(
        default="",
        description="Optional AWS shared-credentials file; empty uses the usual chain "
        "(environment, ~/.aws, instance role).",
    )
    max_attempts = luigi.IntParameter(
        default=5, description="Attempts per S3 request (botocore 'standard' retries)."
    )
    timeout = luigi.FloatParameter(
        default=60.0, description="Seconds to connect to, and to wait on a read from, S3."
    )
    multipart_chunk_mb = luigi.IntParameter(
        default=64, description="Part size for multipart uploads, in MiB."
    )


class alma(luigi.Config):
    """The Alma API and the Digifeeds set."""

    base_url = luigi.Parameter(
        default="https://api-na.hosted.exlibrisgroup.com/almaws/v1",
        description="Alma API base URL for the institution's region.",
    )
    set_id = luigi.Parameter(description="ID of the Digifeeds set in Alma.")
    api_key_env = luigi.Parameter(
        default="ALMA_API_KEY",
        description="Environment variable holding the Alma API key.",
    )
    api_key_file = luigi.Parameter(
        default="",
        description="File holding the Alma API key, read when the variable is unset.",
    )
    timeout = luigi.FloatParameter(default=30.0, description="Seconds per Alma request.")
    retries = luigi.IntParameter(
        default=4, description="Retries of a throttled (429), failed (5xx) or timed-out call."
    )
    calls_per_second = luigi.FloatParameter(
        default=10.0,
        description="Client-side limit on Alma calls per second, shared by all workers of a host.",
    )
    batch_size = luigi.IntParameter(
        default=50,
        description="Most barcodes sent to Alma in one add_members call (at most 1000).",
    )


class zephir(luigi.Config):
    """HathiTrust's Zephir item API."""

    base_url = luigi.Parameter(
        default="http://zephir.cdlib.org/api", description="Zephir API base URL."
    )
    timeout = luigi.FloatParameter(default=30.0, description="Seconds per Zephir request.")
    retries = luigi.IntParameter(
        default=3, description="Retries of a failed (5xx) or timed-out request."
    )


class pickup(luigi.Config):
    """Google's SFTP pickup server."""

    host = luigi.Parameter(description="Pickup server host name.")
    port = luigi.IntParameter(default=22, description="Pickup server SSH port.")
    username = luigi.Parameter(
        default="", description="SFTP user name; empty for the user running Digifeeds."
    )
    directory = luigi.Parameter(
        default=".", description="Remote directory the zips are delivered into."
    )
    known_hosts = luigi.Parameter(
        description="known_hosts file pinning the server's host key; unknown keys are refused."
    )
    key_file = luigi.Parameter(
        default="", description="Private key file for authentication; empty for a password."
    )
    password_env = luigi.Parameter(
        default="PICKUP_PASSWORD",
        description="Environment variable holding the SFTP password (or the key's passphrase).",
    )
    password_file = luigi.Parameter(
        default="", description="File holding the password, read when the variable is unset."
    )
    timeout = luigi.FloatParameter(default=60.0, description="Seconds per SFTP operation.")


class metrics(luigi.Config):
    """Where run metrics are pushed."""

    pushgateway_url = luigi.Parameter(
        default="", description="Prometheus Pushgateway URL; empty disables pushing."
    )
    job = luigi.Parameter(default="digifeeds", description="Pushgateway job name.")
    instance = luigi.Parameter(
        default="",
        description="Value of the 'instance' grouping label; empty uses the host name.",
    )
    timeout = luigi.FloatParameter(default=10.0, description="Seconds per push.")


def read_secret(what: str, env_name: str, file_name: str, *, required: bool = True) -> str:
    """Return a secret from the environment variable ``env_name`` or the file ``file_name``.

    ``what`` names the secret in errors; the secret itself is never part of a message.
    """
    value = os.environ.get(env_name, "") if env_name else ""
    if not value and file_name:
        try:
            value = Path(file_name).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the {what} from {file_name}: {exc.strerror}"
            ) from exc
    if not value and required:
        raise ConfigurationError(
            f"no {what}: set the environment variable {env_name} or the file setting"
        )
    return value


ConfigT = TypeVar("ConfigT", bound=luigi.Config)


def _source(section: str, key: str | None = None) -> str:
    """The configuration file that sets ``key`` of ``section`` (or the section), as read last.

    Luigi reads its files in order, each overriding the ones before.
    """
    parser = luigi.configuration.get_config()
    for path in reversed(getattr(parser, "_config_paths", [])):
        single = configparser.ConfigParser(interpolation=None)
        try:
            single.read(path)
        except configparser.Error:
            continue
        if single.has_section(section) and (key is None or single.has_option(section, key)):
            return str(path)
    return "the configuration"


def _read(section: type[ConfigT]) -> ConfigT:
    """Build one section, naming the file, the key and the value Luigi could not parse."""
    name = section.__name__
    try:
        return section()
    except (ValueError, luigi.parameter.ParameterException) as exc:
        found = re.search(r"value of '(\w+)'", str(exc))
        if found:
            key = found.group(1)
            raw = luigi.configuration.get_config().get(name, key, "")
            raise ConfigurationError(
                f"{_source(name, key)}: [{name}] {key} = {raw!r} is not a valid value"
            ) from exc
        raise ConfigurationError(f"{_source(name)}: [{name}] {exc}") from exc


def check() -> None:
    """Read every setting the configured host role uses; raise ConfigurationError on a bad one.

    Run before any work, so that a wrong value stops the run with one clear message.
    """
    run = _read(digifeeds)
    role = run.host_role
    store = _read(s3)
    sections: list[luigi.Config] = [run, store, _read(metrics)]
    if role in ("workflow", "all"):
        sections += [_read(alma), _read(zephir), _read(pickup)]
    problems = []
    if run.batch_size < 1:
        problems.append("[digifeeds] batch_size must be at least 1")
    if run.workers < 1:
        problems.append("[digifeeds] workers must be at least 1")
    if run.hold_days < 0:
        problems.append("[digifeeds] hold_days must not be negative")
    if run.settle_minutes < 0:
        problems.append("[digifeeds] settle_minutes must not be negative")
    if role in ("zip", "all"):
        for key in ("input_folder", "working_folder", "processed_folder"):
            if not getattr(run, key):
                problems.append(f"[digifeeds] {key} is needed on a host that zips")
        if run.input_folder and not Path(run.input_folder).is_dir():
            problems.append(f"[digifeeds] input_folder {run.input_folder} is not a folder")
    if not store.bucket:
        problems.append("[s3] bucket is empty")
    if role in ("workflow", "all"):
        if alma().calls_per_second <= 0:
            problems.append("[alma] calls_per_second must be more than 0")
        if not 1 <= alma().batch_size <= 1000:
            problems.append("[alma] batch_size must be from 1 to 1000")
        if not Path(pickup().known_hosts).is_file():
            problems.append(f"[pickup] known_hosts {pickup().known_hosts} is not a file")
    for section in sections:
        for name, value in section.param_kwargs.items():
            if name in ("timeout", "retries", "max_attempts") and value < 0:
                problems.append(f"[{section.get_task_family()}] {name} must not be negative")
    if problems:
        raise ConfigurationError("; ".join(problems))
