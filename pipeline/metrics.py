"""Run metrics, pushed to a Prometheus Pushgateway at the end of every run."""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunFigures:
    """What one run did, as the metrics report it."""

    role: str
    started: float
    finished: float
    succeeded: bool
    by_status: Mapping[str, int]
    delivered: int
    zipped: int
    failures_by_kind: Mapping[str, int]
    waiting: Mapping[str, int]
    oldest_waiting_seconds: Mapping[str, float]
    unfinished: int = 0
    alma_remaining: int | None = None


def build_registry(figures: RunFigures) -> CollectorRegistry:
    """Return a registry holding the run's metrics.

    ``digifeeds_last_success_timestamp_seconds`` is only set when the run succeeded;
    pushed with POST, a failed run leaves the last good value in place.
    """
    registry = CollectorRegistry()
    by_status = Gauge(
        "digifeeds_barcodes",
        "Barcodes this run worked on, by the status it left them in.",
        ["status"],
        registry=registry,
    )
    for status, count in figures.by_status.items():
        by_status.labels(status).set(count)
    Gauge(
        "digifeeds_delivered", "Barcodes delivered to the pickup by this run.", registry=registry
    ).set(figures.delivered)
    Gauge("digifeeds_zipped", "Volumes zipped by this run.", registry=registry).set(figures.zipped)
    failures = Gauge(
        "digifeeds_failures",
        "Barcodes that failed in this run, by kind.",
        ["kind"],
        registry=registry,
    )
    for kind, count in figures.failures_by_kind.items():
        failures.labels(kind).set(count)
    failures.labels("any").set(sum(figures.failures_by_kind.values()))
    waiting = Gauge(
        "digifeeds_waiting", "Barcodes waiting, by what they wait on.", ["on"], registry=registry
    )
    for on, count in figures.waiting.items():
        waiting.labels(on).set(count)
    Gauge(
        "digifeeds_unfinished",
        "Barcodes this run left neither done, waiting nor failed (held by another worker).",
        registry=registry,
    ).set(figures.unfinished)
    oldest = Gauge(
        "digifeeds_oldest_waiting_seconds",
        "Age of the longest wait, by what is waited on.",
        ["on"],
        registry=registry,
    )
    for on, seconds in figures.oldest_waiting_seconds.items():
        oldest.labels(on).set(seconds)
    Gauge("digifeeds_run_duration_seconds", "Wall time of the run.", registry=registry).set(
        figures.finished - figures.started
    )
    Gauge(
        "digifeeds_last_run_timestamp_seconds", "When the last run ended.", registry=registry
    ).set(figures.finished)
    if figures.alma_remaining is not None:
        Gauge(
            "digifeeds_alma_api_remaining",
            "Alma API calls left today (X-Exl-Api-Remaining).",
            registry=registry,
        ).set(figures.alma_remaining)
    if figures.succeeded:
        Gauge(
            "digifeeds_last_success_timestamp_seconds",
            "When the last run with no failure ended.",
            registry=registry,
        ).set(figures.finished)
    return registry


def grouping_key(role: str, instance: str = "") -> dict[str, str]:
    """The Pushgateway grouping key of a host: its role and its name."""
    return {"role": role, "instance": instance or socket.gethostname()}


def push(
    figures: RunFigures, url: str, job: str, *, instance: str = "", timeout: float = 10.0
) -> bool:
    """Push the run's metrics; a failure to push is logged, not raised."""
    if not url:
        logger.info("no Pushgateway configured; metrics not pushed")
        return False
    try:
        pushadd_to_gateway(
            url,
            job=job,
            registry=build_registry(figures),
            grouping_key=grouping_key(figures.role, instance),
            timeout=timeout,
        )
    except OSError as exc:
        logger.error("cannot push metrics to %s: %s", url, exc)
        return False
    logger.info("pushed run metrics to %s (job %s)", url, job)
    return True
