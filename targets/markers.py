"""Status markers: one small JSON object in S3 per barcode and status.

Layout, under the state prefix::

    <status>/<barcode>.json     one per status an item has reached (append-only)
    failed/<barcode>.json       the item's latest failure, removed when that task succeeds

A marker is written only if absent, so a status keeps the time it was first
recorded. Keys lead with the status, so "every item with a status" is one listing,
and one listing of the whole prefix (:meth:`MarkerStore.list_all`) tells everything
about every item. A run reads only the markers of the barcodes it works on
(:meth:`MarkerStore.list_barcodes`), and keeps a :class:`Journal` of what it
records, so that its cost follows its work and not the whole history.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Collection, Iterable
from typing import Any

import luigi
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.barcodes import is_valid, validate
from pipeline.errors import DigifeedsError, StorageError
from pipeline.status import Status
from pipeline.storage import Storage

logger = logging.getLogger(__name__)

FAILED = "failed"
_STATUS_FOLDERS = {status.value for status in Status}


def _marker_name(barcode: str) -> str:
    """The name of an item's marker in a status folder (its key's last part)."""
    return f"{barcode}.json"


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


@dataclasses.dataclass(frozen=True)
class Listing:
    """Markers and failure records under the state prefix, as a listing found them.

    ``covered`` is the barcodes whose markers the listing holds in full; None for a
    listing of everything. Only for those does a marker missing from the listing
    mean a status not reached. Times are the objects' LastModified: the marker's
    timestamp give or take a second.
    """

    reached: dict[Status, dict[str, dt.datetime]]
    failed: dict[str, dt.datetime]
    requests: int = 0
    covered: frozenset[str] | None = None

    def barcodes_with(self, status: Status) -> dict[str, dt.datetime]:
        """Every barcode that had reached ``status``, with when."""
        return self.reached.get(status, {})

    def has(self, barcode: str, status: Status) -> bool:
        """Tell whether the item had reached ``status``."""
        return barcode in self.reached.get(status, {})

    def covers(self, barcode: str) -> bool:
        """Tell whether the listing holds every marker of ``barcode``."""
        return self.covered is None or barcode in self.covered


@dataclasses.dataclass
class Journal:
    """What one process recorded: markers written, failure records written or removed.

    A run's summary is the listing it started from with its builders' journals on
    top, so it needs no second listing. ``failures`` maps a barcode to its new
    failure record, or to None where the record was removed.
    """

    reached: dict[Status, dict[str, dt.datetime]] = dataclasses.field(default_factory=dict)
    failures: dict[str, Failure | None] = dataclasses.field(default_factory=dict)

    def add(self, other: Journal) -> None:
        """Take in what another journal holds, as recorded after this one."""
        for status, barcodes in other.reached.items():
            self.reached.setdefault(status, {}).update(barcodes)
        self.failures.update(other.failures)

    def __bool__(self) -> bool:
        return bool(self.failures) or any(self.reached.values())


class MarkerStore:
    """Records and reads markers through one shared :class:`Storage`.

    ``exists`` answers from a per-process set of known markers when it can: only
    positive answers are kept, since a marker, once written, is never removed.
    While a :class:`Listing` is being used (:meth:`use_listing` to
    :meth:`end_listing`, around the scheduling of a build), it answers negatives too.
    """

    def __init__(self, storage: Storage, prefix: str, *, page_size: int = 1000) -> None:
        self.storage = storage
        self.prefix = prefix if prefix.endswith("/") or not prefix else prefix + "/"
        # Keys a listing request asks for; S3 answers at most 1000.
        self.page_size = page_size
        self._known: set[tuple[Status, str]] = set()
        # The last listing used: its positives stay true; its negatives only while it is
        # in use.
        self._listing: Listing | None = None
        self._listing_in_use = False
        # Failure records recorded by this process: a success looks for a failure
        # record to clear only where the listing found one or one was written since.
        self._failed_since: set[str] = set()
        self._journal = Journal()

    def key(self, barcode: str, status: Status) -> str:
        """Return the S3 key of a marker; the barcode is validated first."""
        return f"{self.prefix}{status.value}/{_marker_name(validate(barcode))}"

    def failure_key(self, barcode: str) -> str:
        """Return the S3 key of an item's failure record."""
        return f"{self.prefix}{FAILED}/{_marker_name(validate(barcode))}"

    def exists(self, barcode: str, status: Status) -> bool:
        """Tell whether the item has reached ``status`` (at most one HEAD request)."""
        if self.known(barcode, status):
            return True
        if self._listing is not None and self._listing_in_use and self._listing.covers(barcode):
            return False
        found = self.storage.exists(self.key(barcode, status))
        if found:
            self._known.add((status, barcode))
        return found

    def known(self, barcode: str, status: Status) -> bool:
        """Tell whether this process knows the item reached ``status``; no request."""
        if (status, barcode) in self._known:
            return True
        return self._listing is not None and self._listing.has(barcode, status)

    def read(self, barcode: str, status: Status) -> Marker | None:
        """Return the item's marker for ``status``, or None if it has not reached it."""
        data = self.storage.get_json(self.key(barcode, status))
        return Marker.from_json(data) if data else None

    def record(self, barcode: str, status: Status, **details: Any) -> Marker:
        """Record that the item reached ``status`` now, unless it already had.

        Returns the marker as stored: the earlier one when the status was already there.
        """
        return self.record_new(barcode, status, **details)[0]

    def record_new(self, barcode: str, status: Status, **details: Any) -> tuple[Marker, bool]:
        """Record as :meth:`record` does; also tell whether this call wrote the marker.

        False: the status was there already, and the marker returned is that earlier one.
        """
        marker = Marker(barcode, status, utc_now(), details)
        written = self.storage.put_json(
            self.key(barcode, status), marker.to_json(), only_if_absent=True
        )
        if written:
            logger.info("%s: recorded %s", barcode, status)
        else:
            earlier = self.read(barcode, status)
            if earlier is None:
                raise StorageError(f"marker {status} vanished while being written", barcode=barcode)
            marker = earlier
        self._known.add((status, barcode))
        self._journal.reached.setdefault(status, {})[barcode] = marker.timestamp
        return marker, written

    def history(self, barcode: str) -> list[Marker]:
        """Return every status the item has reached, oldest first."""
        markers = [m for m in (self.read(barcode, status) for status in Status) if m]
        return sorted(markers, key=lambda m: m.timestamp)

    def list_all(self) -> Listing:
        """List every marker and failure record: one request per thousand objects.

        Objects that are not ``<status>/<barcode>.json`` are left out.
        """
        listing = self._list(self.prefix)
        for status, barcodes in listing.reached.items():
            self._known.update((status, barcode) for barcode in barcodes)
        return listing

    def list_barcodes(self, barcodes: Collection[str]) -> Listing:
        """List the markers and failure records of ``barcodes``, and only theirs.

        Each status folder and the failure records are read from the first barcode's
        key onwards, a page at a time: a page answers for every barcode up to its last
        key, and the next starts at the first barcode not yet answered for. A folder
        costs a request per page of markers in the barcodes' range, and never more
        than a request per barcode; no barcodes cost no request.
        """
        wanted = sorted(set(barcodes), key=_marker_name)
        reached: dict[Status, dict[str, dt.datetime]] = {}
        requests = 0
        for status in Status:
            found, cost = self._list_for(f"{self.prefix}{status.value}/", wanted)
            reached[status] = found
            self._known.update((status, barcode) for barcode in found)
            requests += cost
        failed, cost = self._list_for(f"{self.prefix}{FAILED}/", wanted)
        return Listing(reached, failed, requests + cost, covered=frozenset(wanted))

    def _list_for(self, folder: str, wanted: list[str]) -> tuple[dict[str, dt.datetime], int]:
        """The objects of ``wanted`` (sorted by key) in ``folder``: barcode to LastModified."""
        found: dict[str, dt.datetime] = {}
        requests = 0
        names = {_marker_name(barcode): barcode for barcode in wanted}
        index, after = 0, ""
        while index < len(wanted):
            # Just before the key of the first barcode not answered for, and never
            # before the end of the last page.
            start = max(folder + wanted[index], after)
            try:
                page = self.storage.client.list_objects_v2(
                    Bucket=self.storage.bucket,
                    Prefix=folder,
                    StartAfter=start,
                    MaxKeys=self.page_size,
                )
            except (ClientError, BotoCoreError) as exc:
                raise StorageError(f"cannot list {self.storage.url(folder)}: {exc}") from exc
            requests += 1
            contents = page.get("Contents", [])
            for item in contents:
                barcode = names.get(item["Key"][len(folder) :])
                if barcode is not None:
                    found[barcode] = item["LastModified"]
            if not page.get("IsTruncated") or not contents:
                break
            # Every wanted key up to the page's last is answered for.
            after = contents[-1]["Key"]
            last = after[len(folder) :]
            while index < len(wanted) and _marker_name(wanted[index]) <= last:
                index += 1
        return found, requests

    def _list(self, prefix: str) -> Listing:
        """List every marker and failure record under ``prefix``."""
        reached: dict[Status, dict[str, dt.datetime]] = {status: {} for status in Status}
        failed: dict[str, dt.datetime] = {}
        requests = 0
        pages = self.storage.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.storage.bucket, Prefix=prefix
        )
        try:
            for page in pages:
                requests += 1
                for item in page.get("Contents", []):
                    folder, _, name = item["Key"][len(self.prefix) :].partition("/")
                    barcode = name.removesuffix(".json")
                    if not is_valid(barcode) or not name.endswith(".json"):
                        continue
                    if folder == FAILED:
                        failed[barcode] = item["LastModified"]
                    elif folder in _STATUS_FOLDERS:
                        reached[Status(folder)][barcode] = item["LastModified"]
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot list {self.storage.url(prefix)}: {exc}") from exc
        return Listing(reached, failed, requests)

    def use_listing(self, listing: Listing) -> None:
        """Answer ``exists`` from ``listing`` (negatives too) until :meth:`end_listing`.

        Only for a listing fresh for the items asked about: the scheduling of a build
        of items that nothing else works on meanwhile.
        """
        self._listing = listing
        self._listing_in_use = True

    def end_listing(self) -> None:
        """Stop answering negatives from the listing: from now on, they ask S3 again."""
        self._listing_in_use = False

    def take_journal(self) -> Journal:
        """Return what this process recorded since the last call, and start a new journal."""
        journal, self._journal = self._journal, Journal()
        return journal

    def record_failure(self, barcode: str, task: str, error: BaseException) -> Failure:
        """Keep the item's latest failure; the message is the error's, never a traceback."""
        kind = error.kind if isinstance(error, DigifeedsError) else type(error).__name__
        failure = Failure(barcode, task, kind, str(error), utc_now())
        self._failed_since.add(barcode)
        self.storage.put_json(self.failure_key(barcode), failure.to_json())
        self._journal.failures[barcode] = failure
        return failure

    def clear_failure(self, barcode: str, tasks: Iterable[str]) -> None:
        """Forget the item's failure if it was one of ``tasks``, now that they succeeded.

        No request at all for an item that the last listing found without a failure
        record and that has not failed in this process since.
        """
        listing = self._listing
        if (
            listing is not None
            and listing.covers(barcode)
            and barcode not in listing.failed
            and barcode not in self._failed_since
        ):
            return
        data = self.storage.get_json(self.failure_key(barcode))
        if data and data.get("task") in set(tasks):
            self.storage.delete(self.failure_key(barcode))
            self._journal.failures[barcode] = None

    def failure(self, barcode: str) -> Failure | None:
        """Return the item's latest failure, if it has one."""
        data = self.storage.get_json(self.failure_key(barcode))
        return Failure.from_json(data) if data else None


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
