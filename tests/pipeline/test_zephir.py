"""ZephirClient against the Zephir simulator over HTTP: found, not found, and faults."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from pipeline.barcodes import with_check_digit
from pipeline.errors import InvalidBarcodeError, ZephirError
from pipeline.zephir import ZephirClient
from sandbox.zephir_sim import ZephirControl, ZephirSimulator

B = with_check_digit("3901500000001")
RETRIES = 2


@pytest.fixture(scope="module")
def zephir_sim() -> Iterator[ZephirSimulator]:
    with ZephirSimulator() as sim:
        yield sim


@pytest.fixture
def control(zephir_sim: ZephirSimulator) -> ZephirControl:
    control = ZephirControl(zephir_sim.root_url)
    control.reset()
    return control


@pytest.fixture
def client(zephir_sim: ZephirSimulator, control: ZephirControl) -> ZephirClient:
    return ZephirClient(zephir_sim.url, timeout=0.3, retries=RETRIES, backoff=0.001)


def item_requests(control: ZephirControl) -> list[dict[str, Any]]:
    return [r for r in control.requests() if r["path"].startswith("/api/")]


def test_record_found_is_true(client: ZephirClient, control: ZephirControl) -> None:
    assert client.has_record(B) is True

    [request] = item_requests(control)
    assert request["method"] == "GET"
    assert request["path"] == f"/api/item/mdp.{B}"
    assert "application/json" in request["accept"]


def test_record_absent_is_false(client: ZephirClient, control: ZephirControl) -> None:
    control.mark_absent(B)

    assert client.has_record(B) is False
    assert len(item_requests(control)) == 1


def test_record_that_appears_later_is_found(client: ZephirClient, control: ZephirControl) -> None:
    control.set_default_present(False)
    assert client.has_record(B) is False

    control.mark_present(B)

    assert client.has_record(B) is True


def test_unacceptable_identifier_raises_naming_the_barcode(
    client: ZephirClient, control: ZephirControl
) -> None:
    control.fault(status=422, message="Unacceptable identifier", count=None)

    with pytest.raises(ZephirError, match="unacceptable identifier") as caught:
        client.has_record(B)

    assert caught.value.barcode == B
    assert B in str(caught.value)
    assert len(item_requests(control)) == 1


@pytest.mark.parametrize("shape", ["json", "html", "empty"])
@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_error_is_retried_then_found(
    client: ZephirClient, control: ZephirControl, status: int, shape: str
) -> None:
    control.fault(status=status, shape=shape, count=1)

    assert client.has_record(B) is True
    assert len(item_requests(control)) == 2


@pytest.mark.parametrize("status", [500, 503])
def test_server_error_that_persists_raises_never_not_found(
    client: ZephirClient, control: ZephirControl, status: int
) -> None:
    control.fault(status=status, count=None)

    with pytest.raises(ZephirError) as caught:
        client.has_record(B)

    assert caught.value.barcode == B
    assert f"HTTP {status}" in str(caught.value)
    assert len(item_requests(control)) == RETRIES + 1


def test_timeout_is_retried_then_raises(client: ZephirClient, control: ZephirControl) -> None:
    control.fault(latency=0.6, count=None)

    started = time.monotonic()
    with pytest.raises(ZephirError) as caught:
        client.has_record(B)

    assert caught.value.barcode == B
    assert "timed out after 0.3 s" in str(caught.value)
    assert "ConnectionError" not in str(caught.value)
    assert len(item_requests(control)) == RETRIES + 1
    assert time.monotonic() - started < 3


def test_refused_connection_is_not_called_a_timeout() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = ZephirClient(f"http://127.0.0.1:{port}/api", timeout=0.3, retries=0)

    with pytest.raises(ZephirError) as caught:
        client.has_record(B)

    assert caught.value.barcode == B
    assert "timed out" not in str(caught.value)
    assert "ConnectionError" in str(caught.value)


def test_timeout_once_is_retried_then_found(client: ZephirClient, control: ZephirControl) -> None:
    control.fault(latency=0.6, count=1)

    assert client.has_record(B) is True
    assert len(item_requests(control)) == 2


def test_dropped_connection_is_retried_then_raises(
    client: ZephirClient, control: ZephirControl
) -> None:
    control.fault(drop=True, count=None)

    with pytest.raises(ZephirError) as caught:
        client.has_record(B)

    assert caught.value.barcode == B
    assert len(item_requests(control)) == RETRIES + 1


def test_dropped_connection_once_is_retried_then_found(
    client: ZephirClient, control: ZephirControl
) -> None:
    control.fault(drop=True, count=1)

    assert client.has_record(B) is True
    assert len(item_requests(control)) == 2


def test_retry_after_is_honoured(client: ZephirClient, control: ZephirControl) -> None:
    control.fault(status=503, retry_after="1", count=1)

    started = time.monotonic()
    assert client.has_record(B) is True

    assert time.monotonic() - started >= 0.95


@pytest.mark.parametrize("status", [400, 401, 403, 410, 429])
def test_other_status_raises_without_retrying(
    client: ZephirClient, control: ZephirControl, status: int
) -> None:
    control.fault(status=status, count=None)

    with pytest.raises(ZephirError, match=f"HTTP {status}") as caught:
        client.has_record(B)

    assert caught.value.barcode == B
    assert len(item_requests(control)) == 1


@pytest.mark.parametrize("bad", ["uc1.b000", "39015/../1", "", "3901500000001"])
def test_invalid_barcode_is_refused_before_any_call(
    client: ZephirClient, control: ZephirControl, bad: str
) -> None:
    with pytest.raises(InvalidBarcodeError):
        client.has_record(bad)
    assert item_requests(control) == []


# -- a 200 answer that is not the record

NOT_A_RECORD: dict[str, dict[str, Any]] = {
    "html": {"shape": "html"},
    "empty": {"shape": "empty"},
    "plain-text": {"body": "OK", "content_type": "text/plain"},
    "json-status": {"shape": "json"},
    "login-page-naming-the-item": {
        "body": (
            f'<html><body><a href="/login?next=/api/item/mdp.{B}">Log in</a>'
            f"<p>mdp.{B}</p></body></html>"
        ),
        "content_type": "text/html",
    },
    "unparsable-html-naming-the-item": {
        "body": f"<html><body><p>Log in to see mdp.{B}<br></body></html>",
        "content_type": "text/html",
    },
    "record-of-another-item": {
        "body": '{"fields": [{"974": {"subfields": [{"u": "mdp.39015000000029"}]}}]}',
        "content_type": "application/json",
    },
    "record-of-a-longer-id": {
        "body": '{"fields": [{"974": {"subfields": [{"u": "mdp.' + B + '0"}]}}]}',
        "content_type": "application/json",
    },
}


@pytest.mark.parametrize("answer", NOT_A_RECORD, ids=list(NOT_A_RECORD))
def test_200_that_is_not_the_record_raises_never_found(
    client: ZephirClient, control: ZephirControl, answer: str
) -> None:
    control.fault(status=200, **NOT_A_RECORD[answer], count=None)

    with pytest.raises(ZephirError) as caught:
        client.has_record(B)

    assert caught.value.barcode == B
    assert str(caught.value).startswith(f"{B}: ")
    assert "200 answer is not a Zephir record" in str(caught.value)
    assert "<" not in str(caught.value)
    assert len(str(caught.value)) < 400
    assert len(item_requests(control)) == 1


def test_the_simulators_xml_record_counts_as_found(
    zephir_sim: ZephirSimulator, client: ZephirClient, control: ZephirControl
) -> None:
    record = requests.get(f"{zephir_sim.url}/item/mdp.{B}", timeout=5)
    assert "xml" in record.headers["Content-Type"]
    control.fault(status=200, body=record.text, content_type="application/xml")

    assert client.has_record(B) is True


def test_record_with_several_items_counts_as_found(
    client: ZephirClient, control: ZephirControl
) -> None:
    other = "mdp.39015000000029"
    body = (
        '{"leader": "00000nam a2200000 a 4500", "fields": ['
        '{"974": {"subfields": [{"u": "' + other + '"}]}},'
        '{"974": {"subfields": [{"u": "mdp.' + B + '"}, {"z": "v.2"}]}}]}'
    )
    control.fault(status=200, body=body, content_type="application/json")

    assert client.has_record(B) is True
