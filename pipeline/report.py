"""What the markers say about items: every item (one listing of them all), or a run's."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from typing import Any

from pipeline.status import Status
from targets.markers import Failure, Journal, Listing, MarkerStore

# The statuses of the chain, in order; an item's current status is the last it reached.
CHAIN = (
    Status.ZIPPED,
    Status.NOT_FOUND_IN_ALMA,
    Status.ADDED_TO_DIGIFEEDS_SET,
    Status.IN_ZEPHIR,
    Status.READY_FOR_PICKUP,
    Status.COPYING_START,
    Status.COPYING_END,
    Status.PENDING_DELETION,
)

# What an item is waiting on, by its current status, when it has no failure.
WAITING_ON = {
    None: "zip",
    Status.ZIPPED: "alma",
    Status.ADDED_TO_DIGIFEEDS_SET: "zephir",
    Status.IN_ZEPHIR: "hold",
}


@dataclasses.dataclass
class Item:
    """One barcode as the markers describe it."""

    barcode: str
    reached: dict[Status, dt.datetime] = dataclasses.field(default_factory=dict)
    failure: Failure | None = None

    @property
    def current(self) -> Status | None:
        """The furthest status reached, or None for an item with no status yet."""
        reached = [s for s in CHAIN if s in self.reached]
        return reached[-1] if reached else None

    @property
    def waiting_on(self) -> str | None:
        """What the item waits on (zip, alma, zephir, hold), or None if it is not waiting."""
        if self.failure is not None:
            return None
        return WAITING_ON.get(self.current)

    def waiting_since(self) -> dt.datetime | None:
        """When the item started waiting on what it waits on now."""
        current = self.current
        return self.reached.get(current) if current else None


@dataclasses.dataclass
class Report:
    """Every item the markers know, with counts, failures and waits."""

    items: dict[str, Item]
    taken_at: dt.datetime

    @classmethod
    def read(cls, store: MarkerStore, *, now: dt.datetime | None = None) -> Report:
        """Read every marker: one listing request per thousand objects, one read per failure."""
        return cls.from_listing(store.list_all(), store, now=now)

    @classmethod
    def from_listing(
        cls,
        listing: Listing,
        store: MarkerStore,
        *,
        journal: Journal | None = None,
        now: dt.datetime | None = None,
    ) -> Report:
        """Describe every item in ``listing``, with what ``journal`` recorded since.

        A failure record the journal holds is taken from it; one only the listing
        found is read (one request each).
        """
        journal = journal or Journal()
        items: dict[str, Item] = {}
        for status in CHAIN:
            found = {**listing.barcodes_with(status), **journal.reached.get(status, {})}
            for barcode, written in found.items():
                items.setdefault(barcode, Item(barcode)).reached[status] = written
        for barcode in sorted(set(listing.failed) | set(journal.failures)):
            if barcode in journal.failures:
                failure = journal.failures[barcode]
            else:
                failure = store.failure(barcode)
            if failure is not None:
                items.setdefault(barcode, Item(barcode)).failure = failure
        return cls(items, now or dt.datetime.now(dt.UTC))

    def counts(self, barcodes: Iterable[str] | None = None) -> dict[str, int]:
        """Count items (of ``barcodes`` only, if given) by current status.

        Failed items count under 'failed', but for those Alma does not know, which
        count under 'not_found_in_alma' as they are listed.
        """
        counts = {status.value: 0 for status in CHAIN}
        counts["failed"] = 0
        for item in self._chosen(barcodes):
            if item.current is Status.NOT_FOUND_IN_ALMA:
                counts[Status.NOT_FOUND_IN_ALMA.value] += 1
            elif item.failure is not None:
                counts["failed"] += 1
            elif item.current is not None:
                counts[item.current.value] += 1
        return counts

    def failures(self, barcodes: Iterable[str] | None = None) -> list[Failure]:
        """Every item's failure (of ``barcodes`` only, if given), oldest first."""
        chosen = self._chosen(barcodes)
        found = [i.failure for i in chosen if i.failure is not None]
        return sorted(found, key=lambda f: f.timestamp)

    def waiting(
        self,
        on: str,
        *,
        longer_than: dt.timedelta | None = None,
        barcodes: Iterable[str] | None = None,
    ) -> dict[str, dt.timedelta]:
        """Items waiting on ``on`` (zip, alma, zephir, hold), with how long they have waited."""
        found = {}
        for item in self._chosen(barcodes):
            if item.waiting_on != on:
                continue
            # An item with no status yet (a folder settling) has only just started waiting.
            since = item.waiting_since()
            age = self.taken_at - since if since else dt.timedelta(0)
            if longer_than is None or age > longer_than:
                found[item.barcode] = age
        return found

    def without_zip(self, zips: Iterable[str]) -> list[str]:
        """Items on their way that no run will find: their zip is not among ``zips``.

        Every item from ``zipped`` until ``pending_deletion`` has its zip in the S3
        input prefix, where the workflow host finds it; one without has had its zip
        removed by someone, and waits for a person.
        """
        present = set(zips)
        return sorted(
            barcode
            for barcode, item in self.items.items()
            if item.current not in (None, Status.PENDING_DELETION) and barcode not in present
        )

    def _chosen(self, barcodes: Iterable[str] | None) -> list[Item]:
        if barcodes is None:
            return list(self.items.values())
        return [self.items.get(b) or Item(b) for b in barcodes]

    def to_json(self, *, waiting_days: float, zips: Iterable[str]) -> dict[str, Any]:
        """The report as ``digifeeds report --json`` prints it; ``zips``: the input prefix's."""
        longer = dt.timedelta(days=waiting_days)
        return {
            "taken_at": self.taken_at.isoformat(),
            "counts": self.counts(),
            "failed": [f.to_json() for f in self.failures()],
            "not_found_in_alma": sorted(
                b for b, i in self.items.items() if i.current is Status.NOT_FOUND_IN_ALMA
            ),
            "waiting_longer_than_days": waiting_days,
            "waiting": {
                on: {b: round(age.total_seconds() / 86400, 2) for b, age in sorted(ages.items())}
                for on in ("zephir", "hold")
                for ages in [self.waiting(on, longer_than=longer)]
            },
            "without_zip": self.without_zip(zips),
        }
