"""The Alma and Zephir simulators answer as DOMAIN.md says, over plain HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from sandbox.alma_sim import AlmaControl, AlmaSimulator
from sandbox.zephir_sim import ZephirControl, ZephirSimulator

API_KEY = "l8xx-sim-secret-4242"
SET_ID = "9912345670006381"
B1, B2, B3 = "39015000000011", "39015000000029", "39015000000037"
JSON = {"Accept": "application/json", "Content-Type": "application/json"}
AUTH = {"Authorization": f"apikey {API_KEY}"}
ADD = {"op": "add_members", "id_type": "BARCODE", "fail_on_invalid_id": "true"}
MDP = "{http://www.loc.gov/MARC21/slim}"


@pytest.fixture(scope="module")
def alma_sim() -> Iterator[AlmaSimulator]:
    with AlmaSimulator(api_key=API_KEY, set_id=[SET_ID, "777"], daily_quota=50) as sim:
        yield sim


@pytest.fixture
def alma(alma_sim: AlmaSimulator) -> AlmaControl:
    control = AlmaControl(alma_sim.root_url)
    control.reset()
    return control


@pytest.fixture(scope="module")
def zephir_sim() -> Iterator[ZephirSimulator]:
    with ZephirSimulator() as sim:
        yield sim


@pytest.fixture
def zephir(zephir_sim: ZephirSimulator) -> ZephirControl:
    control = ZephirControl(zephir_sim.root_url)
    control.reset()
    return control


def xml_root(text: str) -> ET.Element:
    """Parse a simulator's XML answer (our own output, so plain ElementTree is fine)."""
    return ET.fromstring(text)  # noqa: S314


def add(
    sim: AlmaSimulator,
    *members: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    set_id: str = SET_ID,
) -> requests.Response:
    return requests.post(
        f"{sim.url}/conf/sets/{set_id}",
        params=ADD if params is None else params,
        json={"members": {"member": [{"id": m} for m in members]}},
        headers={**JSON, **AUTH} if headers is None else headers,
        timeout=5,
    )


def errors(response: requests.Response) -> list[tuple[str, str]]:
    body = response.json()
    assert body["errorsExist"] is True
    assert body["result"] is None
    return [(e["errorCode"], e["errorMessage"]) for e in body["errorList"]["error"]]


# -- Alma: normal answers


def test_alma_adds_members_and_answers_with_the_set(
    alma_sim: AlmaSimulator, alma: AlmaControl
) -> None:
    response = add(alma_sim, B1, B2)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict)
    assert body["id"] == SET_ID
    assert body["type"]["value"] == "ITEMIZED"
    assert body["content"]["value"] == "ITEM"
    assert body["number_of_members"]["value"] == 2
    assert B1 not in json.dumps(body)  # members are not echoed
    assert alma.members() == [B1, B2]
    assert alma.members("777") == []


def test_alma_answers_xml_when_json_is_not_asked_for(
    alma_sim: AlmaSimulator, alma: AlmaControl
) -> None:
    response = add(alma_sim, B1, headers={"Content-Type": "application/json", **AUTH})

    assert response.status_code == 200
    assert "xml" in response.headers["Content-Type"]
    root = xml_root(response.text)
    assert root.tag == "set"
    assert root.findtext("id") == SET_ID
    assert root.findtext("number_of_members") == "1"
    set_type = root.find("type")
    assert set_type is not None
    assert (set_type.text, set_type.get("desc")) == ("ITEMIZED", "Itemized")
    assert root.findtext("content") == "ITEM"
    assert B1 not in response.text  # members are not echoed


def test_alma_accepts_an_xml_body(alma_sim: AlmaSimulator, alma: AlmaControl) -> None:
    body = f"<set><members><member><id>{B1}</id></member></members></set>"
    response = requests.post(
        f"{alma_sim.url}/conf/sets/{SET_ID}",
        params=ADD,
        data=body,
        headers={"Content-Type": "application/xml", "Accept": "application/json", **AUTH},
        timeout=5,
    )

    assert response.status_code == 200
    assert alma.members() == [B1]


def test_alma_counts_down_the_daily_quota_on_every_answer(
    alma_sim: AlmaSimulator, alma: AlmaControl
) -> None:
    assert add(alma_sim, B1).headers["X-Exl-Api-Remaining"] == "49"
    assert add(alma_sim, B2).headers["X-Exl-Api-Remaining"] == "48"
    assert add(alma_sim, B2).headers["X-Exl-Api-Remaining"] == "47"  # an error costs a call
    assert alma.remaining() == 47


def test_alma_refuses_calls_once_the_quota_is_spent(
    alma_sim: AlmaSimulator, alma: AlmaControl
) -> None:
    alma.set_remaining(1)
    assert add(alma_sim, B1).status_code == 200

    response = add(alma_sim, B2)

    assert response.status_code == 429
    assert response.headers["X-Exl-Api-Remaining"] == "0"
    assert errors(response)[0][0] == "DAILY_THRESHOLD"
    assert "Retry-After" not in response.headers
    assert alma.members() == [B1]


# -- Alma: errors


@pytest.mark.parametrize(
    "headers",
    [
        JSON,
        {**JSON, "Authorization": "apikey wrong"},
        {**JSON, "Authorization": API_KEY},
        {**JSON, "Authorization": f"Bearer {API_KEY}"},
    ],
    ids=["missing", "wrong", "no-scheme", "bearer"],
)
def test_alma_refuses_a_missing_or_wrong_key(
    alma_sim: AlmaSimulator, alma: AlmaControl, headers: dict[str, str]
) -> None:
    response = add(alma_sim, B1, headers=headers)

    assert response.status_code == 400
    assert errors(response)[0][0] == "UNAUTHORIZED"
    assert "X-Exl-Api-Remaining" in response.headers
    assert alma.members() == []
    assert alma.requests()[-1]["key_valid"] is False


def test_alma_request_log_never_holds_the_key(alma_sim: AlmaSimulator, alma: AlmaControl) -> None:
    add(alma_sim, B1)
    add(alma_sim, B2, headers=JSON, params={**ADD, "apikey": API_KEY})

    log = alma.requests()
    assert API_KEY not in json.dumps(log)
    assert [r["key_valid"] for r in log] == [True, True]
    assert [r["key_in_query"] for r in log] == [False, True]
    assert log[0]["body"] == {"members": {"member": [{"id": B1}]}}
    assert log[0]["query"] == ADD


def test_alma_refuses_an_unknown_set(alma_sim: AlmaSimulator, alma: AlmaControl) -> None:
    response = add(alma_sim, B1, set_id="404")

    assert response.status_code == 400
    assert errors(response)[0][0] == "60107"


def test_alma_refuses_more_than_1000_members(alma_sim: AlmaSimulator, alma: AlmaControl) -> None:
    members = [f"39015{n:09d}" for n in range(1001)]

    response = add(alma_sim, *members)

    assert response.status_code == 400
    assert errors(response)[0][0] == "60118"
    assert alma.members() == []
    assert add(alma_sim, *members[:1000]).status_code == 200


def test_alma_refuses_a_duplicate_member(alma_sim: AlmaSimulator, alma: AlmaControl) -> None:
    response = add(alma_sim, B1, B2, B1)

    assert response.status_code == 400
    [(code, message)] = errors(response)
    assert code == "60119"
    assert B1 in message
    assert alma.members() == []


def test_alma_refuses_the_whole_call_naming_unknown_barcodes(
    alma_sim: AlmaSimulator, alma: AlmaControl
) -> None:
    alma.mark_missing(B2, B3)

    response = add(alma_sim, B1, B2, B3)

    assert response.status_code == 400
    [(code, message)] = errors(response)
    assert code == "60120"
    assert B2 in message
    assert B3 in message
    assert B1 not in message
    assert alma.members() == []


def test_alma_refuses_the_whole_call_naming_members_already_in_set(
    alma_sim: AlmaSimulator, alma: AlmaControl
) -> None:
    alma.add_members(B2)

    response = add(alma_sim, B1, B2)

    [(code, message)] = errors(response)
    assert code == "60115"
    assert B2 in message
    assert B1 not in message
    assert alma.members() == [B2]


def test_alma_without_fail_on_invalid_id_adds_the_valid_ones(
    alma_sim: AlmaSimulator, alma: AlmaControl
) -> None:
    alma.mark_missing(B2)
    alma.add_members(B3)

    response = add(alma_sim, B1, B2, B3, params={**ADD, "fail_on_invalid_id": "false"})

    assert response.status_code == 200
    assert alma.members() == [B3, B1]


def test_alma_barcodes_exist_by_default_and_can_be_marked(
    alma_sim: AlmaSimulator, alma: AlmaControl
) -> None:
    odd = "uc1.b000001"
    assert errors(add(alma_sim, odd))[0][0] == "60120"

    alma.mark_present(odd)
    alma.mark_missing(B1)

    assert add(alma_sim, odd).status_code == 200
    assert errors(add(alma_sim, B1))[0][0] == "60120"


def test_alma_answers_errors_in_xml_when_json_is_not_asked_for(
    alma_sim: AlmaSimulator, alma: AlmaControl
) -> None:
    response = add(alma_sim, B1, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    root = xml_root(response.text)
    ns = "{http://com/exlibris/urm/general/xmlbeans}"
    assert root.tag == f"{ns}web_service_result"
    assert root.findtext(f"{ns}errorsExist") == "true"
    assert root.findtext(f"{ns}errorList/{ns}error/{ns}errorCode") == "UNAUTHORIZED"
    assert root.findtext(f"{ns}errorList/{ns}error/{ns}trackingId")


# -- Alma: faults


@pytest.mark.parametrize(
    ("shape", "check"),
    [
        ("json", lambda r: r.json()["errorList"]["error"][0]["errorCode"] == "60119"),
        ("json_single", lambda r: r.json()["errorList"]["error"]["errorCode"] == "60119"),
        (
            "wrapped",
            lambda r: (
                r.json()["web_service_result"]["errorList"]["error"][0]["errorCode"] == "60119"
            ),
        ),
        ("xml", lambda r: "<errorCode>60119</errorCode>" in r.text),
        ("html", lambda r: r.text.startswith("<html>")),
        ("empty", lambda r: r.content == b""),
    ],
)
def test_alma_fault_renders_each_body_shape(
    alma_sim: AlmaSimulator, alma: AlmaControl, shape: str, check: Any
) -> None:
    alma.fault(status=400, code="60119", shape=shape)

    response = add(alma_sim, B1)

    assert response.status_code == 400
    assert check(response)
    assert alma.members() == []
    assert add(alma_sim, B1).status_code == 200


@pytest.mark.parametrize(
    ("spec", "check"),
    [
        ({"shape": "html"}, lambda r: r.text.startswith("<html>")),
        ({"shape": "empty"}, lambda r: r.content == b""),
        ({"body": "OK", "content_type": "text/plain"}, lambda r: r.text == "OK"),
    ],
)
def test_alma_fault_can_answer_200_with_something_other_than_the_set(
    alma_sim: AlmaSimulator, alma: AlmaControl, spec: dict[str, Any], check: Any
) -> None:
    # A proxy or login page answering 200 in Alma's place; nothing is added.
    alma.fault(status=200, **spec)

    response = add(alma_sim, B1)

    assert response.status_code == 200
    assert check(response)
    assert alma.members() == []


def test_alma_fault_for_a_barcode_spares_the_others(
    alma_sim: AlmaSimulator, alma: AlmaControl
) -> None:
    alma.fault(status=400, code="60120", barcode=B2, count=None)

    assert add(alma_sim, B1).status_code == 200
    response = add(alma_sim, B2, B3)

    [(code, message)] = errors(response)
    assert code == "60120"
    assert B2 in message
    assert alma.members() == [B1]
    assert [r["fault"] for r in alma.requests()] == [None, 400]


def test_alma_fault_for_the_next_n_requests_then_normal(
    alma_sim: AlmaSimulator, alma: AlmaControl
) -> None:
    alma.fault(status=429, code="PER_SECOND_THRESHOLD", retry_after="2", count=2)

    first, second, third = (add(alma_sim, B1) for _ in range(3))

    assert [r.status_code for r in (first, second, third)] == [429, 429, 200]
    assert first.headers["Retry-After"] == "2"
    assert errors(first)[0][0] == "PER_SECOND_THRESHOLD"
    assert alma.faults() == []


def test_alma_fault_drops_the_connection(alma_sim: AlmaSimulator, alma: AlmaControl) -> None:
    alma.fault(drop=True)

    with pytest.raises(requests.ConnectionError):
        add(alma_sim, B1)
    assert alma.members() == []


def test_alma_fault_latency_delays_the_normal_answer(
    alma_sim: AlmaSimulator, alma: AlmaControl
) -> None:
    alma.fault(latency=0.3)

    started = time.monotonic()
    response = add(alma_sim, B1)

    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200
    assert alma.members() == [B1]


def test_alma_fault_echoing_the_authorization_header(
    alma_sim: AlmaSimulator, alma: AlmaControl
) -> None:
    alma.fault(status=502, shape="html", echo_authorization=True)

    response = add(alma_sim, B1)

    assert response.status_code == 502
    assert API_KEY in response.text
    assert API_KEY not in json.dumps(alma.requests())


def test_alma_reset_restores_the_starting_state(alma_sim: AlmaSimulator, alma: AlmaControl) -> None:
    alma.mark_missing(B1)
    alma.add_members(B2)
    alma.fault(status=500, count=None)
    alma.set_remaining(3)

    alma.reset()

    assert alma.members() == []
    assert alma.faults() == []
    assert alma.requests() == []
    assert alma.remaining() == 50
    assert add(alma_sim, B1).status_code == 200


def test_alma_control_refuses_bad_requests(alma: AlmaControl) -> None:
    with pytest.raises(RuntimeError, match="400"):
        alma.call("POST", "faults", {"stauts": 500})
    with pytest.raises(RuntimeError, match="400"):
        alma.call("POST", "faults", {"status": 500, "shape": "yaml"})
    with pytest.raises(RuntimeError, match="404"):
        alma.call("GET", "nothing")


# -- Zephir


def item(sim: ZephirSimulator, identifier: str, json_wanted: bool = False) -> requests.Response:
    headers = {"Accept": "application/json"} if json_wanted else {}
    return requests.get(f"{sim.url}/item/{identifier}", headers=headers, timeout=5)


def test_zephir_answers_marc_xml_by_default(
    zephir_sim: ZephirSimulator, zephir: ZephirControl
) -> None:
    response = item(zephir_sim, f"mdp.{B1}")

    assert response.status_code == 200
    assert "xml" in response.headers["Content-Type"]
    root = xml_root(response.text)
    assert root.tag == f"{MDP}collection"
    assert root.find(f"{MDP}record/{MDP}datafield[@tag='974']") is not None
    assert f"mdp.{B1}" in response.text


def test_zephir_answers_json_when_asked(zephir_sim: ZephirSimulator, zephir: ZephirControl) -> None:
    zephir.mark_present(B1, appeared_at=datetime(2024, 5, 1, 12, tzinfo=UTC))

    response = item(zephir_sim, f"mdp.{B1}", json_wanted=True)

    assert response.status_code == 200
    body = response.json()
    assert body["leader"]
    assert body["appeared_at"].startswith("2024-05-01T12:00:00")
    assert {"u": f"mdp.{B1}"} in body["fields"][-1]["974"]["subfields"]


def test_zephir_says_not_found_for_an_absent_record(
    zephir_sim: ZephirSimulator, zephir: ZephirControl
) -> None:
    zephir.mark_absent(B1)

    response = item(zephir_sim, f"mdp.{B1}")

    assert response.status_code == 404
    assert response.json() == {"status": 404, "message": "Not Found"}
    assert item(zephir_sim, f"mdp.{B2}").status_code == 200


def test_zephir_default_absent_until_marked_present(
    zephir_sim: ZephirSimulator, zephir: ZephirControl
) -> None:
    zephir.set_default_present(False)
    assert item(zephir_sim, f"mdp.{B1}").status_code == 404

    zephir.mark_present(B1)

    assert item(zephir_sim, f"mdp.{B1}").status_code == 200
    records = zephir.records()
    assert records["default_present"] is False
    assert B1 in records["present"]


def test_zephir_default_can_be_set_at_construction() -> None:
    with ZephirSimulator(default_present=False, present=[B2]) as sim:
        assert item(sim, f"mdp.{B1}").status_code == 404
        assert item(sim, f"mdp.{B2}").status_code == 200


@pytest.mark.parametrize("identifier", ["mdp.123", "uc1.b000001", f"mdp.{B1}x", B1, "mdp."])
def test_zephir_refuses_a_malformed_identifier(
    zephir_sim: ZephirSimulator, zephir: ZephirControl, identifier: str
) -> None:
    response = item(zephir_sim, identifier)

    assert response.status_code == 422
    assert response.json()["status"] == 422


@pytest.mark.parametrize(
    ("spec", "status", "body"),
    [
        ({"status": 500}, 500, '{"status": 500, "message": "Internal Server Error"}'),
        ({"status": 503, "shape": "html"}, 503, "<html>"),
        ({"status": 502, "shape": "empty"}, 502, ""),
        ({"status": 500, "body": "oops"}, 500, "oops"),
    ],
)
def test_zephir_fault_answers_then_recovers(
    zephir_sim: ZephirSimulator, zephir: ZephirControl, spec: dict[str, Any], status: int, body: str
) -> None:
    zephir.fault(**spec, barcode=B1)

    assert item(zephir_sim, f"mdp.{B2}").status_code == 200
    response = item(zephir_sim, f"mdp.{B1}")
    assert response.status_code == status
    assert response.text.startswith(body)
    assert item(zephir_sim, f"mdp.{B1}").status_code == 200
    assert [r["fault"] for r in zephir.requests()] == [None, status, None]


def test_zephir_fault_can_answer_200_with_a_page_that_is_not_a_record(
    zephir_sim: ZephirSimulator, zephir: ZephirControl
) -> None:
    zephir.fault(status=200, shape="html", barcode=B1)

    response = item(zephir_sim, f"mdp.{B1}", json_wanted=True)

    assert response.status_code == 200
    assert response.text.startswith("<html>")
    assert f"mdp.{B1}" not in response.text
    assert f"mdp.{B1}" in item(zephir_sim, f"mdp.{B1}", json_wanted=True).text


def test_zephir_fault_drops_the_connection(
    zephir_sim: ZephirSimulator, zephir: ZephirControl
) -> None:
    zephir.fault(drop=True)

    with pytest.raises(requests.ConnectionError):
        item(zephir_sim, f"mdp.{B1}")
    assert item(zephir_sim, f"mdp.{B1}").status_code == 200


def test_zephir_fault_latency_outlasts_a_short_timeout(
    zephir_sim: ZephirSimulator, zephir: ZephirControl
) -> None:
    zephir.fault(latency=0.5)

    with pytest.raises(requests.Timeout):
        requests.get(f"{zephir_sim.url}/item/mdp.{B1}", timeout=0.1)


# -- command lines


def _serve(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", *args, "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    return process, line.rsplit(" ", 1)[-1].strip()


def test_alma_simulator_command_line_serves_until_killed(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    process, url = _serve(["sandbox.alma_sim", "--api-key-file", str(key_file), "--set-id", "5"])
    try:
        response = requests.post(
            f"{url}/conf/sets/5",
            params=ADD,
            json={"members": {"member": [{"id": B1}]}},
            headers={**JSON, **AUTH},
            timeout=5,
        )
        assert response.status_code == 200
        assert AlmaControl(url).members("5") == [B1]
    finally:
        process.terminate()
        process.wait(timeout=5)


def test_zephir_simulator_command_line_serves_until_killed() -> None:
    process, url = _serve(["sandbox.zephir_sim", "--default-absent"])
    try:
        assert requests.get(f"{url}/item/mdp.{B1}", timeout=5).status_code == 404
        ZephirControl(url).mark_present(B1)
        assert requests.get(f"{url}/item/mdp.{B1}", timeout=5).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=5)
