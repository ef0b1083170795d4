"""What operators see: the run lock, pushed metrics, the report, alert rules, the dashboard."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests
from helpers import REPO, count_requests, digifeeds, new_barcodes, s3_client
from prometheus_client.parser import text_string_to_metric_families

from pipeline.metrics import RunFigures, build_registry
from pipeline.report import Report
from pipeline.storage import Storage
from sandbox.alma_sim import AlmaControl
from sandbox.services import BUCKET, Sandbox
from sandbox.volumes import make_volume
from sandbox.zephir_sim import ZephirControl
from targets.markers import MarkerStore

MONITORING = REPO / "monitoring"


def pushed(sandbox: Sandbox) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples a run of this host (role all) pushed, by name and labels."""
    text = requests.get(f"{sandbox.url('pushgateway')}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("job") != "digifeeds" or sample.labels.get("role") != "all":
                continue
            labels = tuple(
                sorted(
                    (k, v) for k, v in sample.labels.items() if k not in ("job", "instance", "role")
                )
            )
            samples[(sample.name, labels)] = sample.value
    return samples


def test_a_second_run_on_the_same_host_is_refused_by_the_lock(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    alma.fault(barcode=barcode, latency=4.0)
    first = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = clean.working / "digifeeds.lock"
    deadline = time.monotonic() + 30
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)

    second = digifeeds("run")
    out, err = first.communicate(timeout=120)

    assert second.returncode == 3
    assert f"another digifeeds run holds {lock} (pid {first.pid})" in second.stderr
    assert first.returncode == 0, err
    assert "1 delivered" in out


def test_a_mixed_run_is_reported_and_pushed_truthfully(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    delivered, holding, unseen, unknown, bad = new_barcodes(5)
    make_volume(clean.input, delivered)
    assert digifeeds("run").returncode == 0
    success_before = pushed(clean)[("digifeeds_last_success_timestamp_seconds", ())]
    for barcode in (holding, unseen, unknown, bad):
        make_volume(clean.input, barcode)
    (clean.input / bad / "00000002.jp2").unlink()
    zephir.mark_absent(unseen)
    alma.mark_missing(unknown)

    run = digifeeds("run", "--hold-days", "14")
    report = json.loads(digifeeds("report", "--json", "--waiting-days", "0").stdout)
    metrics = pushed(clean)

    assert run.returncode == 1
    assert "cannot push" not in run.stderr, run.stderr
    counts = report["counts"]
    assert counts["pending_deletion"] == 1
    assert counts["in_zephir"] == 1
    assert counts["added_to_digifeeds_set"] == 1
    assert counts["failed"] == 1  # the bad volume
    assert counts["not_found_in_alma"] == 1  # counted as it is listed
    assert sum(counts.values()) == 5
    assert report["not_found_in_alma"] == [unknown]
    assert {f["barcode"]: f["kind"] for f in report["failed"]} == {
        unknown: "not_found_in_alma",
        bad: "bad_volume",
    }
    assert list(report["waiting"]["zephir"]) == [unseen]
    assert list(report["waiting"]["hold"]) == [holding]

    assert metrics[("digifeeds_failures", (("kind", "any"),))] == 2
    assert metrics[("digifeeds_failures", (("kind", "bad_volume"),))] == 1
    assert metrics[("digifeeds_failures", (("kind", "not_found_in_alma"),))] == 1
    assert metrics[("digifeeds_waiting", (("on", "zephir"),))] == 1
    assert metrics[("digifeeds_waiting", (("on", "hold"),))] == 1
    assert metrics[("digifeeds_delivered", ())] == 0
    assert metrics[("digifeeds_zipped", ())] == 3
    # By status: the barcodes this run worked on, not the one delivered before.
    by_status = {
        labels[0][1]: value
        for (name, labels), value in metrics.items()
        if name == "digifeeds_barcodes" and value
    }
    assert by_status == {
        "in_zephir": 1,
        "added_to_digifeeds_set": 1,
        "not_found_in_alma": 1,
        "failed": 1,
    }
    assert metrics[("digifeeds_alma_api_remaining", ())] > 0
    # A failed run leaves the last success where the good run put it.
    assert metrics[("digifeeds_last_success_timestamp_seconds", ())] == success_before
    assert metrics[("digifeeds_last_run_timestamp_seconds", ())] > success_before


def test_the_report_names_items_on_their_way_whose_zip_was_removed_by_hand(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    delivered, waiting, removed = new_barcodes(3)
    for barcode in (delivered, waiting, removed):
        make_volume(clean.input, barcode)
    zephir.mark_absent(waiting)
    zephir.mark_absent(removed)
    assert digifeeds("run").returncode == 0
    s3_client(clean).delete_object(Bucket=BUCKET, Key=f"input/{removed}.zip")

    report = json.loads(digifeeds("report", "--json").stdout)
    text = digifeeds("report").stdout

    assert report["without_zip"] == [removed]
    assert f"no run finds them (1):\n  {removed}" in text


def test_the_report_reads_the_markers_with_a_bounded_number_of_requests(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    barcodes = new_barcodes(6)
    for barcode in barcodes:
        make_volume(clean.input, barcode)
    alma.mark_missing(barcodes[0])
    digifeeds("run")
    storage = Storage(
        BUCKET, endpoint_url=clean.url("s3"), credentials_file=str(clean.aws_credentials)
    )
    counts = count_requests(storage)

    report = Report.read(MarkerStore(storage, "state/"))

    assert len(report.items) == 6
    # One listing of every marker (under a thousand here), then one read per failure.
    assert counts == {"ListObjectsV2": 1, "GetObject": 1}


def test_the_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by scripts/install-system-packages"

    checked = subprocess.run(
        [promtool, "check", "rules", str(MONITORING / "digifeeds-alerts.yml")],
        capture_output=True,
        text=True,
        check=False,
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 4 rules found" in checked.stdout


def test_the_alerts_and_the_dashboard_only_use_metrics_the_runs_push() -> None:
    figures = RunFigures(
        role="all",
        started=0,
        finished=1,
        succeeded=True,
        by_status={"zipped": 1},
        delivered=1,
        zipped=1,
        failures_by_kind={"bad_volume": 1},
        waiting={"zephir": 1},
        oldest_waiting_seconds={"zephir": 5.0},
        alma_remaining=10,
    )
    names = {m.name for m in build_registry(figures).collect()}
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    expressions.append((MONITORING / "digifeeds-alerts.yml").read_text())

    used = {word for text in expressions for word in _metric_names(text)}

    assert used
    assert used <= names, used - names


def _metric_names(text: str) -> set[str]:
    import re

    return set(re.findall(r"\bdigifeeds_[a-z_]+\b", text)) - {"digifeeds_"}


def test_cron_wrapper_and_crontabs_name_existing_paths() -> None:
    wrapper = REPO / "cron" / "digifeeds-cron"
    assert wrapper.stat().st_mode & 0o111
    checked = subprocess.run(["bash", "-n", str(wrapper)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    for crontab in (REPO / "cron").glob("*.crontab"):
        assert "/opt/digifeeds/cron/digifeeds-cron" in crontab.read_text()
    assert Path(REPO / "cron" / "luigid.service").exists()
