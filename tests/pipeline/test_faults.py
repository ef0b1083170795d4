"""Every Alma and Zephir answer DOMAIN.md lists, end to end: statuses, messages, exit codes.

The clients' own tests count retries and parse every body shape; these show what the
whole run does with each answer, and that no secret leaks on the way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers import DELIVERED, config_with, digifeeds, failure, history, new_barcodes, s3_client

from sandbox.alma_sim import AlmaControl
from sandbox.services import BUCKET, Sandbox
from sandbox.volumes import make_volume
from sandbox.zephir_sim import ZephirControl


def alma_calls(alma: AlmaControl, barcode: str) -> int:
    return sum(1 for r in alma.requests() if barcode in r.get("barcodes", []))


@pytest.mark.parametrize(
    ("fault", "calls"),
    [
        ({"status": 429, "code": "PER_SECOND_THRESHOLD", "count": 2, "retry_after": "0"}, 3),
        ({"status": 500, "code": "GENERAL_ERROR", "count": 1}, 2),
        ({"status": 503, "shape": "html", "count": 1}, 2),
        ({"drop": True, "count": 1}, 2),
    ],
    ids=["per-second-429", "500", "html-503", "dropped"],
)
def test_passing_alma_faults_are_retried_and_the_barcode_goes_through(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl, fault: dict[str, Any], calls: int
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    alma.fault(barcode=barcode, **fault)

    result = digifeeds("run")

    assert result.returncode == 0, result.stderr
    assert history(barcode) == DELIVERED
    assert alma_calls(alma, barcode) == calls


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ({"status": 500, "code": "GENERAL_ERROR"}, ["GENERAL_ERROR", "500"]),
        ({"status": 502, "shape": "html"}, ["502"]),
        ({"status": 400, "shape": "empty"}, ["400"]),
        ({"drop": True}, ["Alma"]),
        ({"status": 400, "code": "60119"}, ["60119"]),
    ],
    ids=["general-error", "html-502", "empty-400", "dropped", "duplicate-member"],
)
def test_lasting_alma_faults_fail_that_barcode_and_the_others_go_on(
    clean: Sandbox,
    alma: AlmaControl,
    zephir: ZephirControl,
    fault: dict[str, Any],
    words: list[str],
) -> None:
    broken, fine = new_barcodes(2)
    make_volume(clean.input, broken)
    make_volume(clean.input, fine)
    alma.fault(barcode=broken, count=None, **fault)

    result = digifeeds("run")

    assert result.returncode == 1
    assert history(broken) == ["zipped"]
    assert history(fine) == DELIVERED
    recorded = failure(broken)
    assert recorded is not None and recorded["kind"] == "alma"
    assert recorded["task"] == "InAlmaSet"
    assert broken in recorded["message"]
    for word in words:
        assert word in recorded["message"]
    assert f"{broken}: failed (alma)" in result.stderr


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ({"status": 422}, ["422"]),
        ({"status": 500}, ["500", "tried"]),
        ({"drop": True}, ["Zephir"]),
    ],
    ids=["422", "500", "dropped"],
)
def test_zephir_errors_fail_the_barcode_and_are_never_taken_for_not_found(
    clean: Sandbox,
    alma: AlmaControl,
    zephir: ZephirControl,
    fault: dict[str, Any],
    words: list[str],
) -> None:
    broken, fine = new_barcodes(2)
    make_volume(clean.input, broken)
    make_volume(clean.input, fine)
    zephir.fault(barcode=broken, count=None, **fault)

    result = digifeeds("run")

    assert result.returncode == 1
    assert "waiting: none" in result.stdout
    assert history(broken) == ["zipped", "added_to_digifeeds_set"]
    assert history(fine) == DELIVERED
    recorded = failure(broken)
    assert recorded is not None and recorded["kind"] == "zephir"
    for word in [broken, *words]:
        assert word in recorded["message"]


def test_a_zephir_failure_is_over_once_zephir_answers_and_the_item_waits_on_it(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    zephir.fault(barcode=barcode, count=None, status=503)
    assert digifeeds("run").returncode == 1
    assert (failure(barcode) or {}).get("kind") == "zephir"
    zephir.clear_faults()
    zephir.mark_absent(barcode)

    result = digifeeds("run", "--local-scheduler")

    assert result.returncode == 0, result.stderr
    assert "waiting: 1 on zephir" in result.stdout
    assert failure(barcode) is None
    report = json.loads(digifeeds("report", "--json", "--waiting-days", "0").stdout)
    assert list(report["waiting"]["zephir"]) == [barcode]


def test_secrets_never_reach_logs_markers_metrics_or_the_luigi_ui(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl, tmp_path: Path
) -> None:
    alma_key = clean.alma_key_file.read_text().strip()
    password = "pickup-secret-7f3a9c"  # the secret under test
    refused, unlucky = new_barcodes(2)
    make_volume(clean.input, refused)
    make_volume(clean.input, unlucky)
    # Alma echoes the Authorization header back in an HTML error page for one barcode.
    alma.fault(barcode=refused, status=502, shape="html", echo_authorization=True, count=None)
    # The pickup is configured for a password that the server refuses.
    env = config_with(tmp_path / "luigi.cfg", {"pickup": {"key_file": "", "password_env": "PW"}})
    env["PW"] = password
    log_file = tmp_path / "digifeeds.log"

    result = digifeeds("--log-file", str(log_file), "-v", "run", env=env)

    assert result.returncode == 1
    assert (failure(refused) or {})["kind"] == "alma"
    assert (failure(unlucky) or {})["kind"] == "pickup"
    seen = {"stdout": result.stdout, "stderr": result.stderr, "log": log_file.read_text()}
    client = s3_client(clean)
    for item in client.list_objects_v2(Bucket=BUCKET, Prefix="state/")["Contents"]:
        body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        seen[item["Key"]] = body.decode()
    seen["metrics"] = requests.get(f"{clean.url('pushgateway')}/metrics", timeout=10).text
    assert "digifeeds_failures" in seen["metrics"]
    luigid = clean.url("luigid")
    for status in ("FAILED", "DONE", "PENDING"):
        tasks = requests.get(
            f"{luigid}/api/task_list",
            params={"data": json.dumps({"status": status, "upstream_status": "", "search": ""})},
            timeout=10,
        ).json()["response"]
        seen[f"luigid {status}"] = json.dumps(tasks)
        for task_id in tasks if status == "FAILED" else ():
            error = requests.get(
                f"{luigid}/api/fetch_error",
                params={"data": json.dumps({"task_id": task_id})},
                timeout=10,
            ).json()["response"]
            seen[f"luigid error {task_id}"] = json.dumps(error)
    assert any("InAlmaSet" in text for name, text in seen.items() if name.startswith("luigid"))
    assert any("502" in text for name, text in seen.items() if name.startswith("luigid error"))

    for name, text in seen.items():
        assert alma_key not in text, f"the Alma key leaked into {name}"
        assert password not in text, f"the pickup password leaked into {name}"
