"""Markers in moto's S3 server: keys, append-only writes, histories, listings, costs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from helpers import count_requests, new_barcodes

from pipeline.errors import InvalidBarcodeError, VolumeError
from pipeline.status import Status
from pipeline.storage import Storage
from sandbox.services import BUCKET, Sandbox
from targets.markers import MarkerStore, MarkerTarget


@pytest.fixture
def store(clean: Sandbox) -> Iterator[MarkerStore]:
    storage = Storage(
        BUCKET, endpoint_url=clean.url("s3"), credentials_file=str(clean.aws_credentials)
    )
    yield MarkerStore(storage, "state/")


def test_a_marker_lives_at_its_status_and_barcode(store: MarkerStore) -> None:
    (barcode,) = new_barcodes(1)

    store.record(barcode, Status.IN_ZEPHIR)

    assert store.storage.exists(f"state/in_zephir/{barcode}.json")
    marker = store.read(barcode, Status.IN_ZEPHIR)
    assert marker is not None
    assert marker.barcode == barcode
    assert marker.timestamp.tzinfo == dt.UTC


def test_target_existence_is_one_head_request_and_positive_answers_are_kept(
    store: MarkerStore,
) -> None:
    barcode, other = new_barcodes(2)
    store.record(barcode, Status.ZIPPED)
    fresh = MarkerStore(store.storage, "state/")
    counts = count_requests(store.storage)

    assert MarkerTarget(fresh, other, Status.ZIPPED).exists() is False
    assert MarkerTarget(fresh, barcode, Status.ZIPPED).exists() is True
    assert MarkerTarget(fresh, barcode, Status.ZIPPED).exists() is True
    assert MarkerTarget(fresh, other, Status.ZIPPED).exists() is False

    assert counts == {"HeadObject": 3}


def test_a_status_is_recorded_once_and_keeps_its_first_time(store: MarkerStore) -> None:
    (barcode,) = new_barcodes(1)
    first = store.record(barcode, Status.NOT_FOUND_IN_ALMA)

    again = store.record(barcode, Status.NOT_FOUND_IN_ALMA, note="later")

    assert again == first
    assert [m.status for m in store.history(barcode)] == [Status.NOT_FOUND_IN_ALMA]


def test_recording_tells_whether_it_wrote_the_marker_even_within_one_second(
    store: MarkerStore,
) -> None:
    (barcode,) = new_barcodes(1)
    first, written = store.record_new(barcode, Status.COPYING_START)

    # Another process, in the same second: the marker is there already.
    again, written_again = MarkerStore(store.storage, "state/").record_new(
        barcode, Status.COPYING_START
    )

    assert written is True and written_again is False
    assert again == first


def test_history_is_oldest_first_and_listing_finds_every_barcode(store: MarkerStore) -> None:
    barcodes = new_barcodes(3)
    for barcode in barcodes:
        store.record(barcode, Status.ZIPPED)
    store.record(barcodes[0], Status.ADDED_TO_DIGIFEEDS_SET)

    assert [m.status for m in store.history(barcodes[0])] == [
        Status.ZIPPED,
        Status.ADDED_TO_DIGIFEEDS_SET,
    ]
    listing = store.list_all()
    assert set(barcodes) <= set(listing.barcodes_with(Status.ZIPPED))
    assert barcodes[0] in listing.barcodes_with(Status.ADDED_TO_DIGIFEEDS_SET)
    assert not any(listing.has(b, Status.ADDED_TO_DIGIFEEDS_SET) for b in barcodes[1:])


def test_a_failure_is_kept_until_its_task_succeeds(store: MarkerStore) -> None:
    (barcode,) = new_barcodes(1)
    store.record_failure(barcode, "ZipVolume", VolumeError(barcode, ["page 2 is missing"]))

    store.clear_failure(barcode, ["InAlmaSet"])
    kept = store.failure(barcode)
    store.clear_failure(barcode, ["ZipVolume"])

    assert kept is not None and kept.kind == "bad_volume" and "page 2" in kept.message
    assert store.failure(barcode) is None


@pytest.mark.parametrize("barcode", ["../x", "39015 0000000", "", "3901500000000a", "a/b"])
def test_keys_are_built_only_from_valid_barcodes(store: MarkerStore, barcode: str) -> None:
    with pytest.raises(InvalidBarcodeError, match="not a valid barcode"):
        store.key(barcode, Status.ZIPPED)
