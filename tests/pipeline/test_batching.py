"""Batched Alma calls and the run's one listing keep every barcode's outcome as it is alone."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

from helpers import (
    DELIVERED,
    config_with,
    count_requests,
    digifeeds,
    failure,
    history,
    new_barcodes,
)

from pipeline.report import Item, Report
from pipeline.status import Status
from pipeline.storage import Storage
from sandbox.alma_sim import AlmaControl
from sandbox.services import BUCKET, Sandbox
from sandbox.volumes import make_volume
from sandbox.zephir_sim import ZephirControl
from targets.markers import MarkerStore


def outcomes(barcodes: list[str]) -> dict[str, tuple[list[str], str | None]]:
    """Each barcode's statuses and failure kind."""
    return {b: (history(b), (failure(b) or {}).get("kind")) for b in barcodes}


def mixed_run(
    sandbox: Sandbox, alma: AlmaControl, zephir: ZephirControl, env: dict[str, str]
) -> tuple[list[str], int]:
    """Zip seven volumes, then take them through the workflow with a mix of answers."""
    barcodes = new_barcodes(7)
    for barcode in barcodes:
        make_volume(sandbox.input, barcode)
    assert digifeeds("run", "--role", "zip", env=env).returncode == 0
    alma.mark_missing(barcodes[1], barcodes[4])
    alma.add_members(barcodes[2])
    zephir.mark_absent(barcodes[3])
    alma.clear_requests()
    result = digifeeds("run", "--role", "workflow", env=env)
    return barcodes, result.returncode


def test_alma_calls_are_batched_and_each_barcode_ends_as_it_would_alone(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl, tmp_path: Path
) -> None:
    alone = config_with(tmp_path / "alone.cfg", {"alma": {"batch_size": "1"}})
    barcodes, code = mixed_run(clean, alma, zephir, alone)
    calls_alone = len(alma.requests())
    expected = outcomes(barcodes)
    shape = [(h, k) for h, k in expected.values()]

    batched = config_with(tmp_path / "batched.cfg", {"alma": {"batch_size": "50"}})
    others, batched_code = mixed_run(clean, alma, zephir, batched)
    calls_batched = [r for r in alma.requests() if "/conf/sets/" in r["path"]]

    assert [(h, k) for h, k in outcomes(others).values()] == shape
    assert batched_code == code == 1
    assert shape[0] == (DELIVERED, None)
    assert shape[1] == (["zipped", "not_found_in_alma"], "not_found_in_alma")
    assert shape[2] == (DELIVERED, None)
    assert shape[3] == (["zipped", "added_to_digifeeds_set"], None)
    # One batch: the first call names every barcode pending in Alma (the seven new and
    # the first run's two unknown ones); Alma's refusals name the missing and the
    # already present, and the client calls again with the rest.
    first_call = set(calls_batched[0]["barcodes"])
    assert first_call == set(others) | {barcodes[1], barcodes[4]}
    assert len(calls_batched) <= 3 < calls_alone


def test_one_listing_answers_completion_checks_without_a_request_each(
    clean: Sandbox,
) -> None:
    storage = Storage(
        BUCKET, endpoint_url=clean.url("s3"), credentials_file=str(clean.aws_credentials)
    )
    store = MarkerStore(storage, "state/")
    barcodes = new_barcodes(60)
    (outside,) = new_barcodes(1)  # after the last of the sixty
    for barcode in [*barcodes[:30], outside]:
        store.record(barcode, Status.ZIPPED)
    store.record_failure(barcodes[1], "InAlmaSet", RuntimeError("boom"))
    storage.put_json("state/zipped/not-a-barcode.json", {})  # left out, not an error
    fresh = MarkerStore(storage, "state/")
    counts = count_requests(storage)

    listing = fresh.list_barcodes(barcodes)
    fresh.use_listing(listing)
    answers = {b: fresh.exists(b, Status.ZIPPED) for b in barcodes}
    zephir_answers = {b: fresh.exists(b, Status.IN_ZEPHIR) for b in barcodes}
    for barcode in barcodes[2:4]:
        fresh.clear_failure(barcode, ["InAlmaSet"])  # the listing found none to clear

    # One listing request per status folder and one for the failure records, over the
    # sixty barcodes' range only; then no request at all.
    folders = len(Status) + 1
    assert counts == {"ListObjectsV2": folders} == {"ListObjectsV2": listing.requests}
    assert answers == {b: b in barcodes[:30] for b in barcodes}
    assert not any(zephir_answers.values())
    assert barcodes[1] in listing.failed
    assert outside not in listing.barcodes_with(Status.ZIPPED)

    # Outside the listing's range, a negative is not trusted: it is asked.
    assert fresh.exists(outside, Status.ZIPPED) is True
    assert counts["HeadObject"] == 1

    # Once the listing ends, negatives are asked again; positives stay known.
    fresh.end_listing()
    store.record(barcodes[40], Status.IN_ZEPHIR)
    assert fresh.exists(barcodes[40], Status.IN_ZEPHIR) is True
    assert fresh.exists(barcodes[0], Status.ZIPPED) is True
    assert counts == {"ListObjectsV2": folders, "PutObject": 1, "HeadObject": 2}

    # A failure the listing found is looked for, and cleared by its task's success.
    fresh.clear_failure(barcodes[1], ["InAlmaSet"])
    assert counts["GetObject"] == 1 and counts["DeleteObject"] == 1
    assert store.failure(barcodes[1]) is None


def test_a_listing_costs_no_more_than_a_request_per_barcode_amid_many_others(
    clean: Sandbox,
) -> None:
    storage = Storage(
        BUCKET, endpoint_url=clean.url("s3"), credentials_file=str(clean.aws_credentials)
    )
    barcodes = new_barcodes(32)
    writer = MarkerStore(storage, "state/")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda b: writer.record(b, Status.ZIPPED), barcodes))
    wanted = [barcodes[0], barcodes[31]]  # thirty others' markers lie between them
    writer.record(barcodes[31], Status.IN_ZEPHIR)

    # Pages of five keys: the thirty-two zipped markers make seven pages.
    sparse = MarkerStore(storage, "state/", page_size=5)
    sparse_listing = sparse.list_barcodes(wanted)
    dense = MarkerStore(storage, "state/", page_size=5)
    dense_listing = dense.list_barcodes(barcodes)

    # Two barcodes: the zipped folder costs a request each, not its seven pages.
    assert sparse_listing.requests == (len(Status) - 1) + 2 + 1
    assert set(sparse_listing.barcodes_with(Status.ZIPPED)) == set(wanted)
    assert set(sparse_listing.barcodes_with(Status.IN_ZEPHIR)) == {barcodes[31]}
    # All thirty-two: the zipped folder costs its seven pages, not a request each.
    assert dense_listing.requests == (len(Status) - 1) + 7 + 1
    assert set(dense_listing.barcodes_with(Status.ZIPPED)) == set(barcodes)
    # Each answers for the barcodes it was asked about, and only for those.
    sparse.use_listing(sparse_listing)
    assert sparse.exists(barcodes[31], Status.IN_ZEPHIR) is True
    assert sparse.exists(barcodes[0], Status.IN_ZEPHIR) is False
    assert not sparse_listing.covers(barcodes[1])
    assert sparse.exists(barcodes[1], Status.ZIPPED) is True  # asked of S3


def test_no_barcodes_cost_no_listing_and_trust_no_negative(clean: Sandbox) -> None:
    storage = Storage(
        BUCKET, endpoint_url=clean.url("s3"), credentials_file=str(clean.aws_credentials)
    )
    store = MarkerStore(storage, "state/")
    (barcode,) = new_barcodes(1)
    store.record(barcode, Status.ZIPPED)
    counts = count_requests(storage)

    listing = store.list_barcodes([])
    store.use_listing(listing)

    assert counts == {} and listing.requests == 0
    assert not listing.covers(barcode)
    assert MarkerStore(storage, "state/").exists(barcode, Status.ZIPPED) is True


def test_a_run_journal_tells_what_a_second_listing_would(clean: Sandbox) -> None:
    storage = Storage(
        BUCKET, endpoint_url=clean.url("s3"), credentials_file=str(clean.aws_credentials)
    )
    store = MarkerStore(storage, "state/")
    barcodes = new_barcodes(4)
    store.record(barcodes[0], Status.ZIPPED)
    store.record_failure(barcodes[1], "InAlmaSet", RuntimeError("boom"))
    store.record_failure(barcodes[2], "InAlmaSet", RuntimeError("boom"))
    worker = MarkerStore(storage, "state/")
    listing = worker.list_barcodes(barcodes)
    worker.use_listing(listing)

    # What a run's tasks do: record statuses, fail, succeed after a failure.
    worker.record(barcodes[0], Status.ZIPPED)  # already there: keeps its first time
    worker.record(barcodes[0], Status.ADDED_TO_DIGIFEEDS_SET)
    worker.record(barcodes[3], Status.ZIPPED)
    worker.record_failure(barcodes[3], "InAlmaSet", RuntimeError("again"))
    worker.clear_failure(barcodes[1], ["InAlmaSet"])
    journal = worker.take_journal()

    summary = Report.from_listing(listing, worker, journal=journal)
    reread = Report.read(MarkerStore(storage, "state/"))
    for barcode in barcodes:
        got, want = (
            summary.items.get(barcode, Item(barcode)),
            reread.items.get(barcode, Item(barcode)),
        )
        assert got.current == want.current, barcode
        assert (got.failure and got.failure.message) == (want.failure and want.failure.message)
    assert summary.counts(barcodes) == reread.counts(barcodes)
    assert not worker.take_journal()


def test_a_barcode_that_breaks_every_alma_call_fails_alone_and_its_batch_goes_on(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    barcodes = new_barcodes(5)
    for barcode in barcodes:
        make_volume(clean.input, barcode)
    assert digifeeds("run", "--role", "zip").returncode == 0
    broken = barcodes[3]
    alma.fault(barcode=broken, count=None, status=500, code="GENERAL_ERROR")
    alma.clear_requests()

    result = digifeeds("run", "--role", "workflow")

    assert result.returncode == 1
    assert outcomes(barcodes) == {
        b: (["zipped"], "alma") if b == broken else (DELIVERED, None) for b in barcodes
    }
    assert broken in (failure(broken) or {})["message"]
    # One call for the batch, then halves down to the broken barcode alone: each
    # barcode ended as it would alone, for a few more calls rather than one each.
    calls = [r["barcodes"] for r in alma.requests() if "/conf/sets/" in r["path"]]
    assert set(calls[0]) == set(barcodes)
    assert [broken] in calls
    assert len({tuple(c) for c in calls}) <= 7
