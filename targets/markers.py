"""Status markers: one small JSON object in S3 per barcode and status.

Layout, under the state prefix::

    <status>/<barcode>.json     one per status an item has reached (append-only)
    failed/<barcode>.json       the item's latest failure, removed when that task succeeds

A marker is written only if absent, so a status keeps the time it was first
recorded. Keys lead with the status, so "every item with a status" is one listing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Iterable
from typing import Any

import luigi
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.barcodes import validate
from pipeline.errors import DigifeedsError, StorageError
from pipeline.status import Status
from pipeline.storage import Storage

logger = logging.getLogger(__name__)

FAILED = "failed"


def utc_now() -> dt.datetime:
    """Return the current time in UTC, to the second."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclasses.dataclass(frozen=True)
class Marker:
    """One recorded status of one item."""

    barcode: str
    status: Status
    timestamp: dt.datetime
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the marker as stored."""
        return {
            "barcode": self.barcode,
            "status": self.status.value,
            "timestamp": self.timestamp.isoformat(),
            **({"details": self.details} if self.details else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Marker:
        """Read a stored marker."""
        return cls(
            barcode=data["barcode"],
            status=Status(data["status"]),
            timestamp=dt.datetime.fromisoformat(data["timestamp"]),
            details=data.get("details", {}),
        )


@dataclasses.dataclass(frozen=True)
class Failure:
    """The latest failure of one item: which task, what kind, what happened."""

    barcode: str
    task: str
    kind: str
    message: str
    timestamp: dt.datetime

    def to_json(self) -> dict[str, Any]:
        """Return the failure as stored."""
        return {**dataclasses.asdict(self), "timestamp": self.timestamp.isoformat()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Failure:
        """Read a stored failure."""
        return cls(**{**data, "timestamp": dt.datetime.fromisoformat(data["timestamp"])})


class MarkerStore:
    """Records and reads markers through one shared :class:`Storage`.

    ``exists`` answers from a per-process set of known markers when it can: only
    positive answers are kept, since a marker, once written, is never removed.
    """

    def __init__(self, storage: Storage, prefix: str) -> None:
        self.storage = storage
        self.prefix = prefix if prefix.endswith("/") or not prefix else prefix + "/"
        self._known: set[tuple[Status, str]] = set()
        # A listing taken for one batch answers negatives too, but only while it is
        # fresh: from list_batch() to end_listing(), around the scheduling of a build.
        self._listed: set[tuple[Status, str]] = set()
        self._listed_scope: frozenset[tuple[Status, str]] = frozenset()
        # Barcodes known to have had no failure record when their batch was listed;
        # a failure recorded by this process since is forgotten from it.
        self._unfailed: set[str] = set()

    def key(self, barcode: str, status: Status) -> str:
        """Return the S3 key of a marker; the barcode is validated first."""
        return f"{self.prefix}{status.value}/{validate(barcode)}.json"

    def failure_key(self, barcode: str) -> str:
        """Return the S3 key of an item's failure record."""
        return f"{self.prefix}{FAILED}/{validate(barcode)}.json"

    def exists(self, barcode: str, status: Status) -> bool:
        """Tell whether the item has reached ``status`` (at most one HEAD request)."""
        if (status, barcode) in self._known:
            return True
        if (status, barcode) in self._listed_scope:
            return (status, barcode) in self._listed
        found = self.storage.exists(self.key(barcode, status))
        if found:
            self._known.add((status, barcode))
        return found

    def read(self, barcode: str, status: Status) -> Marker | None:
        """Return the item's marker for ``status``, or None if it has not reached it."""
        data = self.storage.get_json(self.key(barcode, status))
        return Marker.from_json(data) if data else None

    def record(self, barcode: str, status: Status, **details: Any) -> Marker:
        """Record that the item reached ``status`` now, unless it already had.

        Returns the marker as stored: the earlier one when the status was already there.
        """
        marker = Marker(barcode, status, utc_now(), details)
        if self.storage.put_json(self.key(barcode, status), marker.to_json(), only_if_absent=True):
            logger.info("%s: recorded %s", barcode, status)
        else:
            earlier = self.read(barcode, status)
            if earlier is None:
                raise StorageError(f"marker {status} vanished while being written", barcode=barcode)
            marker = earlier
        self._known.add((status, barcode))
        return marker

    def history(self, barcode: str) -> list[Marker]:
        """Return every status the item has reached, oldest first."""
        markers = [m for m in (self.read(barcode, status) for status in Status) if m]
        return sorted(markers, key=lambda m: m.timestamp)

    def barcodes_with(self, status: Status) -> dict[str, dt.datetime]:
        """Return every barcode that has reached ``status``, with the marker's write time.

        One listing request per thousand markers; the write time is the object's
        LastModified, which is the marker's timestamp give or take a second.
        """
        prefix = f"{self.prefix}{status.value}/"
        found = {}
        for item in self.storage.list(prefix):
            barcode = item["Key"][len(prefix) :].removesuffix(".json")
            found[barcode] = item["LastModified"]
            self._known.add((status, barcode))
        return found

    def list_batch(self, barcodes: Iterable[str], statuses: Iterable[Status]) -> int:
        """List the markers of a batch, so that existence checks cost no request.

        For each status, one listing covers the key range from the batch's first to
        its last barcode (more pages only where other markers crowd that range). Until
        :meth:`end_listing`, ``exists`` answers for these barcodes from the listing.
        Returns the number of listing requests made.
        """
        chosen = sorted({validate(b) for b in barcodes})
        if not chosen:
            return 0
        requests = 0
        scope: set[tuple[Status, str]] = set()
        for status in statuses:
            prefix = f"{self.prefix}{status.value}/"
            last = f"{prefix}{chosen[-1]}.json"
            paginator = self.storage.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=self.storage.bucket,
                Prefix=prefix,
                StartAfter=f"{prefix}{chosen[0][:-1]}",
            )
            for page in self._pages(pages, prefix):
                requests += 1
                keys = [item["Key"] for item in page.get("Contents", [])]
                for key in keys:
                    if key <= last:
                        self._listed.add((status, key[len(prefix) :].removesuffix(".json")))
                if not keys or keys[-1] >= last or not page.get("IsTruncated"):
                    break
            scope.update((status, barcode) for barcode in chosen)
        self._listed_scope = frozenset(scope)
        self._known.update(self._listed & scope)

        # The batch's failure records, so that a success need not look for one.
        prefix = f"{self.prefix}{FAILED}/"
        failed: set[str] = set()
        pages = self.storage.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.storage.bucket, Prefix=prefix, StartAfter=f"{prefix}{chosen[0][:-1]}"
        )
        last = f"{prefix}{chosen[-1]}.json"
        for page in self._pages(pages, prefix):
            requests += 1
            keys = [item["Key"] for item in page.get("Contents", [])]
            failed.update(k[len(prefix) :].removesuffix(".json") for k in keys if k <= last)
            if not keys or keys[-1] >= last or not page.get("IsTruncated"):
                break
        self._unfailed = set(chosen) - failed
        return requests

    def _pages(self, pages: Iterable[dict[str, Any]], prefix: str) -> Iterable[dict[str, Any]]:
        try:
            yield from pages
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot list {self.storage.url(prefix)}: {exc}") from exc

    def end_listing(self) -> None:
        """Stop answering from the batch listing: from now on, negatives ask S3 again."""
        self._listed = set()
        self._listed_scope = frozenset()

    def record_failure(self, barcode: str, task: str, error: BaseException) -> Failure:
        """Keep the item's latest failure; the message is the error's, never a traceback."""
        kind = error.kind if isinstance(error, DigifeedsError) else type(error).__name__
        failure = Failure(barcode, task, kind, str(error), utc_now())
        self._unfailed.discard(barcode)
        self.storage.put_json(self.failure_key(barcode), failure.to_json())
        return failure

    def clear_failure(self, barcode: str, tasks: Iterable[str]) -> None:
        """Forget the item's failure if it was one of ``tasks``, now that they succeeded."""
        if barcode in self._unfailed:
            return
        data = self.storage.get_json(self.failure_key(barcode))
        if data and data.get("task") in set(tasks):
            self.storage.delete(self.failure_key(barcode))

    def failure(self, barcode: str) -> Failure | None:
        """Return the item's latest failure, if it has one."""
        data = self.storage.get_json(self.failure_key(barcode))
        return Failure.from_json(data) if data else None

    def failures(self) -> list[Failure]:
        """Return every item's latest failure: one listing, then one read per failure."""
        prefix = f"{self.prefix}{FAILED}/"
        found = []
        for item in self.storage.list(prefix):
            data = self.storage.get_json(item["Key"])
            if data:
                found.append(Failure.from_json(data))
        return found


class MarkerTarget(luigi.Target):
    """A Luigi target that exists once the item has reached a status."""

    def __init__(self, store: MarkerStore, barcode: str, status: Status) -> None:
        self.store = store
        self.barcode = barcode
        self.status = status

    def exists(self) -> bool:
        """Tell whether the marker is stored: one HEAD request on its exact key."""
        return self.store.exists(self.barcode, self.status)

    def __repr__(self) -> str:
        return f"MarkerTarget({self.barcode}, {self.status})"
