"""Batched Alma calls and batch listings keep every barcode's outcome as it is alone."""

from __future__ import annotations

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


def test_a_batch_listing_answers_completion_checks_without_a_request_each(
    clean: Sandbox,
) -> None:
    storage = Storage(
        BUCKET, endpoint_url=clean.url("s3"), credentials_file=str(clean.aws_credentials)
    )
    store = MarkerStore(storage, "state/")
    barcodes = new_barcodes(60)
    for barcode in barcodes[:30]:
        store.record(barcode, Status.ZIPPED)
    outside = new_barcodes(1)[0]
    store.record(outside, Status.ZIPPED)
    fresh = MarkerStore(storage, "state/")
    counts = count_requests(storage)

    listings = fresh.list_batch(barcodes, [Status.ZIPPED, Status.IN_ZEPHIR])
    answers = {b: fresh.exists(b, Status.ZIPPED) for b in barcodes}
    zephir_answers = {b: fresh.exists(b, Status.IN_ZEPHIR) for b in barcodes}

    # One listing per status, and one of the failure records.
    assert listings == 3
    assert counts == {"ListObjectsV2": 3}
    assert answers == {b: b in barcodes[:30] for b in barcodes}
    assert not any(zephir_answers.values())

    # Once the listing ends, negatives are asked again; positives stay known.
    fresh.end_listing()
    store.record(barcodes[40], Status.IN_ZEPHIR)
    assert fresh.exists(barcodes[40], Status.IN_ZEPHIR) is True
    assert fresh.exists(barcodes[0], Status.ZIPPED) is True
    assert fresh.exists(outside, Status.ZIPPED) is True
    assert counts == {"ListObjectsV2": 3, "PutObject": 1, "HeadObject": 2}
