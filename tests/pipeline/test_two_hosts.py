"""Two hosts, one luigid: the zipping host zips, the workflow host does the rest, once each."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from helpers import REPO, config_with, history, new_barcodes

from sandbox.alma_sim import AlmaControl
from sandbox.services import BUCKET, Sandbox
from sandbox.volumes import make_volume
from sandbox.zephir_sim import ZephirControl

WORKFLOW_TASKS = ("InAlmaSet", "InZephir", "ReadyForPickup", "Delivered")


@pytest.fixture
def hosts(clean: Sandbox, tmp_path: Path) -> dict[str, dict[str, str]]:
    """The environment of each host: its role, its worker id, its view of the input folder."""
    AlmaControl(clean.url("alma")).reset()
    ZephirControl(clean.url("zephir")).reset()
    zip_host = config_with(
        tmp_path / "zip.cfg",
        {
            "digifeeds": {"host_role": "zip", "lock_file": str(tmp_path / "zip.lock")},
            "worker": {"id": "zip-host"},
        },
    )
    workflow_host = config_with(
        tmp_path / "workflow.cfg",
        {
            "digifeeds": {
                "host_role": "workflow",
                "input_folder": "",
                "lock_file": str(tmp_path / "workflow.lock"),
            },
            "worker": {"id": "workflow-host"},
        },
    )
    return {"zip": zip_host, "workflow": workflow_host}


def run_both(hosts: dict[str, dict[str, str]]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Start `digifeeds run` on both hosts at once; wait for both."""
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "-v", "run"],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, env in hosts.items()
    }
    done = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


def luigid_tasks(sandbox: Sandbox, status: str) -> dict[str, dict[str, object]]:
    answer = requests.get(
        f"{sandbox.url('luigid')}/api/task_list",
        params={"data": json.dumps({"status": status, "upstream_status": "", "search": ""})},
        timeout=10,
    )
    tasks: dict[str, dict[str, object]] = answer.json()["response"]
    return tasks


def test_each_host_runs_only_its_tasks_each_exactly_once(
    clean: Sandbox, hosts: dict[str, dict[str, str]]
) -> None:
    barcodes = new_barcodes(3)
    for barcode in barcodes:
        make_volume(clean.input, barcode)

    rounds = [run_both(hosts) for _ in range(3)]

    for results in rounds:
        for name, result in results.items():
            assert result.returncode == 0, f"{name}: {result.stderr}"
            assert "Traceback" not in result.stderr
    for barcode in barcodes:
        assert history(barcode)[-1] == "pending_deletion"
        assert (clean.pickup / f"{barcode}.zip").exists()

    # luigid's own record of which worker ran each task.
    done = luigid_tasks(clean, "DONE")
    # A batch task (InAlmaSet) lists its barcodes, comma-separated.
    ran_by = {
        (task["name"], barcode): task["worker_running"]
        for task in done.values()
        for barcode in str(task["params"].get("barcode", "")).split(",")  # type: ignore[attr-defined]
        if task["worker_running"]
    }
    for barcode in barcodes:
        assert ran_by[("ZipVolume", barcode)] == "zip-host"
        for family in WORKFLOW_TASKS:
            assert ran_by[(family, barcode)] == "workflow-host", family

    # Each worker logs every task it starts: every task started exactly once, in all.
    started: dict[tuple[str, str], list[str]] = {}
    for results in rounds:
        for name, result in results.items():
            for family, listed in re.findall(r" running +(\w+)\(barcode=([\d,]+)\)", result.stderr):
                for barcode in listed.split(","):
                    started.setdefault((family, barcode), []).append(name)
    for barcode in barcodes:
        assert started[("ZipVolume", barcode)] == ["zip"]
        for family in WORKFLOW_TASKS:
            assert started[(family, barcode)] == ["workflow"], family
    # The workflow host never zipped; the zipping host never touched Alma and the rest.
    assert all(host == ["zip"] for (family, _), host in started.items() if family == "ZipVolume")

    # Each host pushed its own group; the last push matches its last summary.
    pushed = pushed_by_role(clean)
    delivered = sum(summary_count(r["workflow"].stdout, "delivered") for r in rounds)
    zipped = sum(summary_count(r["zip"].stdout, "zipped") for r in rounds)
    assert (delivered, zipped) == (3, 3)
    last = rounds[-1]
    for role in ("zip", "workflow"):
        assert pushed[role]["digifeeds_zipped"] == summary_count(last[role].stdout, "zipped")
        assert pushed[role]["digifeeds_delivered"] == summary_count(last[role].stdout, "delivered")
        assert pushed[role]["digifeeds_last_success_timestamp_seconds"] > 0


def summary_count(summary: str, what: str) -> int:
    """A count from a run's summary line, e.g. "2 delivered"."""
    found = re.search(rf"(\d+) {what}", summary)
    assert found, summary
    return int(found.group(1))


def pushed_by_role(sandbox: Sandbox) -> dict[str, dict[str, float]]:
    """The Pushgateway's digifeeds samples, by role, keyed by name and other labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{sandbox.url('pushgateway')}/metrics", timeout=10).text
    by_role: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("job", None) != "digifeeds":
                continue
            role = labels.pop("role")
            labels.pop("instance")
            extra = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            by_role.setdefault(role, {})[sample.name + (f"{{{extra}}}" if extra else "")] = (
                sample.value
            )
    return by_role


def test_a_volume_not_on_this_host_waits_on_the_workflow_host(
    clean: Sandbox, hosts: dict[str, dict[str, str]]
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    # An unmarked zip in S3 that the zipping host has not recorded yet.
    from helpers import s3_client

    from sandbox.services import BUCKET

    s3_client(clean).put_object(Bucket=BUCKET, Key=f"input/{barcode}.zip", Body=b"PK")

    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run"],
        cwd=REPO,
        env={**os.environ, **hosts["workflow"]},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "1 on zip" in result.stdout
    assert "failed: none" in result.stdout
    assert (clean.input / barcode).exists()


def test_long_tasks_show_a_status_message_and_progress_in_the_web_ui(
    clean: Sandbox, hosts: dict[str, dict[str, str]]
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)

    for results in [run_both(hosts) for _ in range(2)]:
        assert all(r.returncode == 0 for r in results.values())

    shown = {
        task["name"]: (task["status_message"], task["progress_percentage"])
        for task in luigid_tasks(clean, "DONE").values()
        if task["params"].get("barcode") == barcode  # type: ignore[attr-defined]
    }
    # Each step is named at once; these small volumes finish every step well inside the
    # second after which bytes and a percentage are shown (test_tasks.py covers those).
    message, _ = shown["ZipVolume"]
    assert message == "copying to the processed folder"
    message, _ = shown["Delivered"]
    assert message == f"copying s3://{BUCKET}/input/{barcode}.zip"
