"""AlmaClient against the Alma simulator over HTTP: requests, batches, errors, retries."""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from pipeline.alma import AddResult, AlmaClient, AlmaCode, RateLimiter
from pipeline.barcodes import with_check_digit
from pipeline.errors import (
    AlmaConfigurationError,
    AlmaError,
    AlmaQuotaError,
    BarcodeNotInAlmaError,
    InvalidBarcodeError,
)
from sandbox.alma_sim import AlmaControl, AlmaSimulator

API_KEY = "l8xx-sim-secret-7f3a9c51"
SET_ID = "9912345670006381"
BARCODES = [with_check_digit(f"3901500000{n:03d}") for n in range(1, 8)]
B = BARCODES[0]
RETRIES = 2
SHAPES = ["json", "json_single", "wrapped", "xml"]


@pytest.fixture(scope="module")
def alma_sim() -> Iterator[AlmaSimulator]:
    with AlmaSimulator(api_key=API_KEY, set_id=SET_ID) as sim:
        yield sim


@pytest.fixture
def control(alma_sim: AlmaSimulator) -> AlmaControl:
    control = AlmaControl(alma_sim.root_url)
    control.reset()
    return control


@pytest.fixture
def client(alma_sim: AlmaSimulator, control: AlmaControl) -> AlmaClient:
    return AlmaClient(alma_sim.url, SET_ID, API_KEY, timeout=2.0, retries=RETRIES, backoff=0.001)


@pytest.fixture(autouse=True)
def _key_never_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    assert API_KEY not in caplog.text


def assert_key_free(exc: BaseException) -> None:
    """The API key appears nowhere in an exception or the exceptions it wraps."""
    seen: BaseException | None = exc
    while seen is not None:
        assert API_KEY not in str(seen)
        assert API_KEY not in repr(seen)
        assert all(API_KEY not in str(arg) for arg in seen.args)
        seen = seen.__cause__ or seen.__context__


def api_requests(control: AlmaControl) -> list[dict[str, object]]:
    return [r for r in control.requests() if str(r["path"]).startswith("/almaws/")]


# -- the call itself


def test_adds_barcodes_with_the_documented_request(
    client: AlmaClient, control: AlmaControl
) -> None:
    result = client.add_members(BARCODES[:3])

    assert result == AddResult(added=BARCODES[:3])
    assert control.members() == BARCODES[:3]
    [request] = api_requests(control)
    assert request["method"] == "POST"
    assert request["path"] == f"/almaws/v1/conf/sets/{SET_ID}"
    assert request["query"] == {
        "op": "add_members",
        "id_type": "BARCODE",
        "fail_on_invalid_id": "true",
    }
    assert request["body"] == {"members": {"member": [{"id": b} for b in BARCODES[:3]]}}
    assert request["key_valid"] is True
    assert request["key_in_query"] is False
    assert "application/json" in str(request["accept"])
    assert "application/json" in str(request["content_type"])


def test_keeps_the_last_remaining_calls_header(client: AlmaClient, control: AlmaControl) -> None:
    assert client.remaining is None
    control.set_remaining(7)

    client.add_members([B])

    assert client.remaining == 6


def test_batch_with_one_missing_and_one_already_in_set_sorts_each_barcode(
    client: AlmaClient, control: AlmaControl
) -> None:
    batch = BARCODES[:5]
    control.mark_missing(batch[1])
    control.add_members(batch[3])

    result = client.add_members(batch)

    assert result.added == [batch[0], batch[2], batch[4]]
    assert result.not_found == [batch[1]]
    assert result.already_in_set == [batch[3]]
    assert sorted(control.members()) == sorted([batch[0], batch[2], batch[3], batch[4]])
    # One call refused for the missing barcode, one for the member, one that succeeds.
    assert len(api_requests(control)) == 3


def test_missing_barcode_alone_is_not_found(client: AlmaClient, control: AlmaControl) -> None:
    control.mark_missing(B)

    assert client.add_members([B]) == AddResult(not_found=[B])
    assert control.members() == []


def test_barcode_already_in_set_is_reported_so(client: AlmaClient, control: AlmaControl) -> None:
    control.add_members(B)

    assert client.add_members([B]) == AddResult(already_in_set=[B])


def test_repeated_barcodes_are_sent_once(client: AlmaClient, control: AlmaControl) -> None:
    assert client.add_members([B, B, BARCODES[1]]).added == [B, BARCODES[1]]

    [request] = api_requests(control)
    assert request["barcodes"] == [B, BARCODES[1]]


def test_no_barcodes_makes_no_call(client: AlmaClient, control: AlmaControl) -> None:
    assert client.add_members([]) == AddResult()
    assert api_requests(control) == []


def test_more_than_1000_barcodes_is_refused_before_any_call(
    client: AlmaClient, control: AlmaControl
) -> None:
    many = [with_check_digit(f"39015{n:08d}") for n in range(1001)]

    with pytest.raises(ValueError, match="1000"):
        client.add_members(many)
    assert api_requests(control) == []


@pytest.mark.parametrize("bad", ["39015/../../x", "", "3901500000001", "39015000000012 "])
def test_invalid_barcode_is_refused_before_any_call(
    client: AlmaClient, control: AlmaControl, bad: str
) -> None:
    with pytest.raises(InvalidBarcodeError):
        client.add_members([B, bad])
    assert api_requests(control) == []


def test_repr_hides_the_key(client: AlmaClient) -> None:
    assert API_KEY not in repr(client)
    assert SET_ID in repr(client)


# -- errors named by Alma


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("code", "status", "error_type"),
    [
        (AlmaCode.INVALID_SET, 400, AlmaConfigurationError),
        (AlmaCode.UNAUTHORIZED, 400, AlmaConfigurationError),
        (AlmaCode.FORBIDDEN, 403, AlmaConfigurationError),
        (AlmaCode.DAILY_THRESHOLD, 429, AlmaQuotaError),
        (AlmaCode.TOO_MANY_MEMBERS, 400, AlmaError),
        (AlmaCode.DUPLICATE_MEMBER, 400, AlmaError),
        (AlmaCode.REQUEST_TOO_LARGE, 413, AlmaError),
        # Codes that should name a barcode but name none of those sent.
        (AlmaCode.NOT_VALID_MEMBER_ID, 400, AlmaError),
        (AlmaCode.ALREADY_IN_SET, 400, AlmaError),
        (AlmaCode.ALREADY_IN_SET_BY_ID_TYPE, 400, AlmaError),
    ],
)
def test_error_code_raises_its_error_without_retrying(
    client: AlmaClient,
    control: AlmaControl,
    code: AlmaCode,
    status: int,
    error_type: type[AlmaError],
    shape: str,
) -> None:
    control.fault(status=status, code=code.value, message="Something is wrong.", shape=shape)

    with pytest.raises(AlmaError) as caught:
        client.add_members([B])

    error = caught.value
    assert type(error) is error_type
    assert error.code == code.value
    assert error.http_status == status
    assert error.barcode == B
    assert B in str(error)
    assert code.value in str(error)
    assert "Something is wrong." in str(error)
    assert_key_free(error)
    assert len(api_requests(control)) == 1
    assert control.members() == []


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("code", "field"),
    [
        (AlmaCode.NOT_VALID_MEMBER_ID, "not_found"),
        (AlmaCode.ALREADY_IN_SET, "already_in_set"),
        (AlmaCode.ALREADY_IN_SET_BY_ID_TYPE, "already_in_set"),
    ],
)
def test_code_naming_the_barcode_sorts_it_in_every_body_shape(
    client: AlmaClient, control: AlmaControl, code: AlmaCode, field: str, shape: str
) -> None:
    # The fault names its barcode in the message, as Alma does; the rest go through.
    control.fault(status=400, code=code.value, barcode=BARCODES[1], shape=shape)

    result = client.add_members(BARCODES[:3])

    assert getattr(result, field) == [BARCODES[1]]
    assert result.added == [BARCODES[0], BARCODES[2]]
    assert len(api_requests(control)) == 2


def test_error_in_a_batch_naming_no_barcode_carries_no_barcode(
    client: AlmaClient, control: AlmaControl
) -> None:
    control.fault(status=400, code="60120", message="The member ID is not valid.")

    with pytest.raises(AlmaError) as caught:
        client.add_members(BARCODES[:3])

    assert type(caught.value) is AlmaError
    assert not isinstance(caught.value, BarcodeNotInAlmaError)
    assert caught.value.barcode is None
    assert "3 barcodes" in str(caught.value)


def test_wrong_key_is_a_configuration_error(alma_sim: AlmaSimulator, control: AlmaControl) -> None:
    wrong_key = "l8xx-not-the-key-0000"
    client = AlmaClient(alma_sim.url, SET_ID, wrong_key, retries=RETRIES, backoff=0.001)

    with pytest.raises(AlmaConfigurationError) as caught:
        client.add_members([B])

    assert caught.value.code == "UNAUTHORIZED"
    assert wrong_key not in str(caught.value)
    [request] = api_requests(control)
    assert request["key_valid"] is False


def test_unknown_set_is_a_configuration_error(
    alma_sim: AlmaSimulator, control: AlmaControl
) -> None:
    client = AlmaClient(alma_sim.url, "404404", API_KEY, retries=RETRIES, backoff=0.001)

    with pytest.raises(AlmaConfigurationError) as caught:
        client.add_members([B])

    assert caught.value.code == "60107"
    assert caught.value.barcode == B


def test_spent_daily_quota_raises_quota_error_at_once(
    client: AlmaClient, control: AlmaControl
) -> None:
    control.set_remaining(0)

    with pytest.raises(AlmaQuotaError) as caught:
        client.add_members([B])

    assert caught.value.code == "DAILY_THRESHOLD"
    assert caught.value.http_status == 429
    assert client.remaining == 0
    assert len(api_requests(control)) == 1


def test_empty_key_is_refused_at_construction(alma_sim: AlmaSimulator) -> None:
    with pytest.raises(AlmaConfigurationError):
        AlmaClient(alma_sim.url, SET_ID, "")


# -- bodies that are not Alma's


@pytest.mark.parametrize(
    ("shape", "expected"), [("html", "400 Bad Request"), ("empty", "empty body")]
)
def test_non_alma_body_raises_with_status_and_excerpt(
    client: AlmaClient, control: AlmaControl, shape: str, expected: str
) -> None:
    control.fault(status=400, shape=shape)

    with pytest.raises(AlmaError) as caught:
        client.add_members([B])

    assert type(caught.value) is AlmaError
    assert caught.value.http_status == 400
    assert caught.value.code is None
    assert "HTTP 400" in str(caught.value)
    assert expected in str(caught.value)
    assert "<" not in str(caught.value)
    assert B in str(caught.value)


@pytest.mark.parametrize("status", [400, 502])
def test_key_echoed_by_a_proxy_is_scrubbed(
    client: AlmaClient, control: AlmaControl, status: int
) -> None:
    control.fault(status=status, shape="html", echo_authorization=True, count=None)

    with pytest.raises(AlmaError) as caught:
        client.add_members([B])

    assert_key_free(caught.value)
    assert "apikey ***" in str(caught.value)


def test_long_html_body_is_cut_short(client: AlmaClient, control: AlmaControl) -> None:
    control.fault(status=400, body="<html><body>" + "x" * 5000 + "</body></html>")

    with pytest.raises(AlmaError) as caught:
        client.add_members([B])

    assert len(str(caught.value)) < 400


def key_fragments(text: str, length: int = 6) -> list[str]:
    """The substrings of the API key, ``length`` characters or longer, that ``text`` holds."""
    return [
        API_KEY[start : start + length]
        for start in range(len(API_KEY) - length + 1)
        if API_KEY[start : start + length] in text
    ]


def assert_no_key_fragment(exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    seen: BaseException | None = exc
    while seen is not None:
        assert key_fragments(str(seen)) == []
        assert key_fragments(repr(seen)) == []
        seen = seen.__cause__ or seen.__context__
    assert key_fragments(caplog.text) == []


# The key placed so that, once markup is stripped, the 200-character cut splits it.
_CUT_BODY = "<html><body><p>" + "x" * 189 + " " + API_KEY + " and more</p></body></html>"
KEY_LEAKS = {
    "cut-by-the-excerpt": _CUT_BODY,
    "split-by-a-tag": (
        f"<html><body><p>Authorization: apikey {API_KEY[:11]}<b></b>{API_KEY[11:]}</p>"
        "</body></html>"
    ),
    "split-by-a-tag-without-apikey": (
        f"<html><body><p>token {API_KEY[:9]}<span></span>{API_KEY[9:]}</p></body></html>"
    ),
    "partial-key-echoed": f"<html><body><p>credential {API_KEY[:12]}...</p></body></html>",
    "key-in-json": '{"echo": {"Authorization": "apikey ' + API_KEY + '"}}',
}


@pytest.mark.parametrize("status", [400, 502])
@pytest.mark.parametrize("body", KEY_LEAKS.values(), ids=list(KEY_LEAKS))
def test_no_fragment_of_the_key_survives_in_an_excerpt(
    client: AlmaClient,
    control: AlmaControl,
    caplog: pytest.LogCaptureFixture,
    body: str,
    status: int,
) -> None:
    control.fault(status=status, body=body, count=None)

    with pytest.raises(AlmaError) as caught:
        client.add_members([B])

    assert f"HTTP {status}" in str(caught.value)
    assert_no_key_fragment(caught.value, caplog)


def test_excerpt_keeps_the_text_around_a_scrubbed_key(
    client: AlmaClient, control: AlmaControl
) -> None:
    control.fault(status=400, body=KEY_LEAKS["split-by-a-tag"])

    with pytest.raises(AlmaError) as caught:
        client.add_members([B])

    assert "Authorization: apikey ***" in str(caught.value)


@pytest.mark.parametrize(
    "message",
    [
        f"Key {API_KEY[:10]}<b></b>{API_KEY[10:]} is unknown.",
        f"apikey {API_KEY} is unknown.",
        f"Key {API_KEY[3:15]} is unknown.",
    ],
)
def test_no_fragment_of_the_key_survives_in_an_alma_error_message(
    client: AlmaClient, control: AlmaControl, caplog: pytest.LogCaptureFixture, message: str
) -> None:
    control.fault(status=400, code="UNAUTHORIZED", message=message)

    with pytest.raises(AlmaConfigurationError) as caught:
        client.add_members([B])

    assert "is unknown" in str(caught.value)
    assert_no_key_fragment(caught.value, caplog)


# -- a 2xx answer that is not the set object

NOT_THE_SET: dict[str, tuple[dict[str, Any], str]] = {
    "html": ({"shape": "html"}, "200 OK"),
    "empty": ({"shape": "empty"}, "empty body"),
    "plain-text": ({"body": "OK", "content_type": "text/plain"}, "OK"),
    "json-without-id": (
        {"body": '{"name": "Digifeeds"}', "content_type": "application/json"},
        "Digifeeds",
    ),
    "json-list": ({"body": '[{"id": "1"}]', "content_type": "application/json"}, "id"),
    "json-error-list": ({"code": "GENERAL_ERROR", "shape": "json"}, "GENERAL_ERROR"),
    "json-other-set": (
        {"body": '{"id": "404404", "name": "Other"}', "content_type": "application/json"},
        "404404",
    ),
    "broken-json": ({"body": '{"id": "99', "content_type": "application/json"}, "99"),
    "xml-error-list": ({"code": "GENERAL_ERROR", "shape": "xml"}, "GENERAL_ERROR"),
    "xml-other-root": (
        {"body": "<collection><id>1</id></collection>", "content_type": "application/xml"},
        "1",
    ),
    "xhtml": (
        {"body": "<html><body><p>Log in</p></body></html>", "content_type": "text/html"},
        "Log in",
    ),
}


@pytest.mark.parametrize("answer", NOT_THE_SET, ids=list(NOT_THE_SET))
def test_2xx_that_is_not_the_set_object_is_an_alma_error(
    client: AlmaClient, control: AlmaControl, answer: str
) -> None:
    spec, expected = NOT_THE_SET[answer]
    control.fault(status=200, **spec)

    with pytest.raises(AlmaError) as caught:
        client.add_members([B])

    error = caught.value
    assert type(error) is AlmaError
    assert error.kind == "alma"
    assert error.barcode == B
    assert error.http_status == 200
    assert error.code is None
    assert str(error).startswith(f"{B}: ")
    assert "HTTP 200" in str(error)
    assert expected in str(error)
    assert "<" not in str(error)
    assert len(str(error)) < 400
    assert_key_free(error)
    assert len(api_requests(control)) == 1


def test_2xx_that_is_not_the_set_object_in_a_batch_names_the_call(
    client: AlmaClient, control: AlmaControl
) -> None:
    control.fault(status=200, shape="html")

    with pytest.raises(AlmaError) as caught:
        client.add_members(BARCODES[:3])

    assert caught.value.barcode is None
    assert "3 barcodes" in str(caught.value)
    assert "HTTP 200" in str(caught.value)


@pytest.mark.parametrize("status", [201, 204])
def test_other_2xx_without_the_set_object_is_an_alma_error(
    client: AlmaClient, control: AlmaControl, status: int
) -> None:
    control.fault(status=status, body="", content_type="text/plain")

    with pytest.raises(AlmaError) as caught:
        client.add_members([B])

    assert caught.value.http_status == status
    assert f"HTTP {status}" in str(caught.value)


def test_the_simulators_xml_set_object_counts_as_added(
    alma_sim: AlmaSimulator, client: AlmaClient, control: AlmaControl
) -> None:
    # Ask the simulator for its XML answer (no JSON Accept), then serve it to the client.
    answer = requests.post(
        f"{alma_sim.url}/conf/sets/{SET_ID}",
        params={"op": "add_members", "id_type": "BARCODE"},
        json={"members": {"member": [{"id": BARCODES[1]}]}},
        headers={"Authorization": f"apikey {API_KEY}", "Accept": "application/xml"},
        timeout=5,
    )
    assert answer.status_code == 200
    assert answer.text.lstrip().startswith("<?xml")
    control.fault(status=200, body=answer.text, content_type="application/xml;charset=UTF-8")

    assert client.add_members([B]) == AddResult(added=[B])


def test_the_simulators_json_set_object_counts_as_added(
    client: AlmaClient, control: AlmaControl
) -> None:
    assert client.add_members([B]) == AddResult(added=[B])

    [request] = api_requests(control)
    assert request["fault"] is None
    assert control.members() == [B]


# -- faults worth retrying

RETRYABLE: dict[str, tuple[dict[str, Any], str | None]] = {
    "per-second-limit": ({"status": 429, "code": "PER_SECOND_THRESHOLD"}, "PER_SECOND_THRESHOLD"),
    "general-error": ({"status": 500, "code": "GENERAL_ERROR"}, "GENERAL_ERROR"),
    "500-xml": ({"status": 500, "shape": "xml"}, "GENERAL_ERROR"),
    "502-html": ({"status": 502, "shape": "html"}, None),
    "503-empty": ({"status": 503, "shape": "empty"}, None),
    "504-wrapped": ({"status": 504, "shape": "wrapped"}, "GENERAL_ERROR"),
    "429-html": ({"status": 429, "shape": "html"}, None),
    "dropped": ({"drop": True}, None),
    "timeout": ({"latency": 0.6}, None),
}


@pytest.mark.parametrize("fault", RETRYABLE, ids=list(RETRYABLE))
def test_fault_is_retried_then_succeeds(
    alma_sim: AlmaSimulator, control: AlmaControl, fault: str
) -> None:
    client = AlmaClient(alma_sim.url, SET_ID, API_KEY, timeout=0.3, retries=3, backoff=0.001)
    spec, _ = RETRYABLE[fault]
    control.fault(**spec, count=2)

    result = client.add_members([B])

    if fault == "timeout":
        # The slow calls were carried out after the client gave up on them, so the
        # retry finds the barcode already in the set, which counts as added.
        assert result == AddResult(already_in_set=[B])
    else:
        assert result == AddResult(added=[B])
    assert len(api_requests(control)) == 3
    assert control.members() == [B]


@pytest.mark.parametrize("fault", RETRYABLE, ids=list(RETRYABLE))
def test_fault_that_persists_raises_after_bounded_retries(
    alma_sim: AlmaSimulator, control: AlmaControl, fault: str
) -> None:
    client = AlmaClient(alma_sim.url, SET_ID, API_KEY, timeout=0.3, retries=RETRIES, backoff=0.001)
    spec, code = RETRYABLE[fault]
    control.fault(**spec, count=None)

    with pytest.raises(AlmaError) as caught:
        client.add_members([B])

    error = caught.value
    assert type(error) is AlmaError
    assert error.code == code
    assert error.barcode == B
    assert B in str(error)
    assert f"{RETRIES + 1} tries" in str(error)
    assert error.http_status == spec.get("status")
    assert_key_free(error)
    assert len(api_requests(control)) == RETRIES + 1


def test_retry_after_is_honoured(client: AlmaClient, control: AlmaControl) -> None:
    control.fault(status=429, code="PER_SECOND_THRESHOLD", retry_after="1", count=1)

    started = time.monotonic()
    assert client.add_members([B]).added == [B]

    assert time.monotonic() - started >= 0.95
    first, second = api_requests(control)
    assert float(str(second["time"])) - float(str(first["time"])) >= 0.95


def test_without_retry_after_tiny_backoff_retries_quickly(
    client: AlmaClient, control: AlmaControl
) -> None:
    control.fault(status=429, code="PER_SECOND_THRESHOLD", count=1)

    started = time.monotonic()
    client.add_members([B])

    assert time.monotonic() - started < 0.5


def test_backoff_grows_between_retries(alma_sim: AlmaSimulator, control: AlmaControl) -> None:
    client = AlmaClient(alma_sim.url, SET_ID, API_KEY, retries=3, backoff=0.1)
    control.fault(status=503, shape="empty", count=3)

    client.add_members([B])

    times = [float(str(r["time"])) for r in api_requests(control)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # urllib3: no wait before the first retry, then backoff * 2 ** (n - 1) plus jitter.
    assert gaps[1] >= 0.2
    assert gaps[2] >= 0.4


# -- the rate limiter


def test_client_waits_for_the_rate_limiter(
    alma_sim: AlmaSimulator, control: AlmaControl, tmp_path: Path
) -> None:
    limiter = RateLimiter(tmp_path / "alma-rate", calls_per_second=10)
    client = AlmaClient(alma_sim.url, SET_ID, API_KEY, rate_limiter=limiter, backoff=0.001)

    for barcode in BARCODES[:3]:
        client.add_members([barcode])

    times = [float(str(r["time"])) for r in api_requests(control)]
    assert times[2] - times[0] >= 0.18


def _take_slots(path: Path, calls: int, out: Path) -> None:
    limiter = RateLimiter(path, calls_per_second=20)
    with out.open("a") as stream:
        for _ in range(calls):
            limiter.acquire()
            stream.write(f"{time.time()}\n")


def test_rate_limiter_holds_across_processes(tmp_path: Path) -> None:
    rate_file = tmp_path / "rate"
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_take_slots, args=(rate_file, 5, tmp_path / f"w{n}"))
        for n in range(3)
    ]

    started = time.time()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=10)
        assert worker.exitcode == 0

    times = sorted(float(line) for n in range(3) for line in (tmp_path / f"w{n}").open())
    assert len(times) == 15
    # 15 calls at 20 a second, shared by three processes: the last waits 14 intervals.
    # A limit per process would let all 15 through in 4 intervals.
    assert times[-1] - started >= 14 * 0.05 - 0.01


def test_rate_limiter_refuses_a_non_positive_rate(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RateLimiter(tmp_path / "rate", 0)
