"""End to end: `digifeeds run` against the sandbox, through every branch of the process."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import signal
import zipfile
from pathlib import Path

import pytest
import requests
from helpers import (
    DELIVERED,
    config_with,
    digifeeds,
    failure,
    fixtures,
    history,
    luigi_command,
    new_barcodes,
    s3_client,
    snapshot,
)

from sandbox.alma_sim import AlmaControl
from sandbox.services import BUCKET, Sandbox
from sandbox.volumes import make_volume
from sandbox.zephir_sim import ZephirControl


def keys(sandbox: Sandbox, prefix: str) -> set[str]:
    listing = s3_client(sandbox).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for o in listing.get("Contents", [])}


def test_generated_volumes_are_delivered_and_a_rerun_runs_nothing(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    barcodes = new_barcodes(3)
    for barcode in barcodes:
        make_volume(clean.input, barcode, pages=3)

    first = digifeeds("run")

    assert first.returncode == 0, first.stderr
    assert "3 zipped; 3 delivered" in first.stdout
    for barcode in barcodes:
        delivered = clean.pickup / f"{barcode}.zip"
        with zipfile.ZipFile(delivered) as archive:
            assert archive.testzip() is None
            assert sorted(archive.namelist()) == [
                "00000001.tif",
                "00000002.jp2",
                "00000003.tif",
                "checksum.md5",
            ]
        assert history(barcode) == DELIVERED
        assert not (clean.input / barcode).exists()
    assert keys(clean, "input/") == set()
    assert keys(clean, "processed/") == {f"processed/{b}.zip" for b in barcodes}
    assert sorted(alma.members()) == sorted(barcodes)

    calls_before = len(alma.requests())
    markers_before = s3_client(clean).list_objects_v2(Bucket=BUCKET, Prefix="state/")["Contents"]
    requests_before = len(clean.s3_requests())
    second = digifeeds("run")

    assert second.returncode == 0, second.stderr
    assert "0 barcodes" in second.stdout
    assert len(alma.requests()) == calls_before
    # Delivered items are history: the rerun lists the input prefix, and reads no marker.
    assert [r.split("?")[0] for r in clean.s3_requests()[requests_before:]] == [f"GET /{BUCKET}"]
    markers_after = s3_client(clean).list_objects_v2(Bucket=BUCKET, Prefix="state/")["Contents"]
    assert markers_after == markers_before


@pytest.mark.parametrize("point", ["delivered", "moving"])
def test_a_kill_during_the_move_is_finished_by_the_next_run_without_a_second_delivery(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl, point: str
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    run = ("run", "--local-scheduler", "--workers", "1")

    crashed = digifeeds(*run, env={"DIGIFEEDS_CRASH_AT": f"{point}:{barcode}"})

    # A real kill -9 with the zip on the pickup and still in the input prefix.
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    delivered = clean.pickup / f"{barcode}.zip"
    first_copy = delivered.stat()
    assert keys(clean, "input/") == {f"input/{barcode}.zip"}
    marked = history(barcode)[-1]
    assert marked == ("copying_end" if point == "delivered" else "pending_deletion")

    rerun = digifeeds(*run)

    assert rerun.returncode == 0, rerun.stderr
    assert history(barcode) == DELIVERED
    assert keys(clean, "input/") == set()
    assert keys(clean, "processed/") == {f"processed/{barcode}.zip"}
    processed = s3_client(clean).get_object(Bucket=BUCKET, Key=f"processed/{barcode}.zip")
    assert processed["Body"].read() == delivered.read_bytes()
    # The pickup got the zip once: the rerun did not write it again.
    again = delivered.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first_copy.st_ino, first_copy.st_mtime_ns)
    assert sorted(p.name for p in clean.pickup.iterdir()) == [f"{barcode}.zip"]


def test_a_rerun_right_after_a_killed_run_names_what_it_left_unfinished(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    crashed = digifeeds("run", env={"DIGIFEEDS_CRASH_AT": f"delivered:{barcode}"})
    assert crashed.returncode != 0

    # luigid still counts the killed worker's Delivered as running, for minutes.
    rerun = digifeeds("run")

    assert rerun.returncode == 0, rerun.stderr
    assert "0 delivered" in rerun.stdout and "1 unfinished" in rerun.stdout
    assert "left neither done, waiting nor failed" in rerun.stderr
    assert barcode in rerun.stderr
    assert history(barcode)[-1] == "copying_end"


@pytest.mark.parametrize("ended", ["delivered", "moving", "done", "copying_end removed"])
def test_a_zip_put_in_the_input_prefix_after_delivery_is_neither_sent_nor_moved(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl, ended: str
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    # The local scheduler: luigid keeps a DONE or killed task for a while.
    run = ("run", "--local-scheduler", "--workers", "1")
    crash = {"DIGIFEEDS_CRASH_AT": f"{ended}:{barcode}"} if ended in ("delivered", "moving") else {}
    digifeeds(*run, env=crash)
    client = s3_client(clean)
    if ended == "copying_end removed":
        client.delete_object(Bucket=BUCKET, Key=f"state/copying_end/{barcode}.json")
    kept = (
        keys(clean, "processed/")
        and client.get_object(Bucket=BUCKET, Key=f"processed/{barcode}.zip")["Body"].read()
    )
    delivered = (clean.pickup / f"{barcode}.zip").stat()
    client.put_object(Bucket=BUCKET, Key=f"input/{barcode}.zip", Body=b"another zip")

    result = digifeeds(*run)

    assert result.returncode == 1
    message = (failure(barcode) or {})["message"]
    assert barcode in result.stderr and "a person must look" in message
    if ended != "copying_end removed":
        assert "not the one delivered" in message
    # Nothing replaced, lost or sent again.
    assert client.get_object(Bucket=BUCKET, Key=f"input/{barcode}.zip")["Body"].read() == (
        b"another zip"
    )
    if kept:
        assert client.get_object(Bucket=BUCKET, Key=f"processed/{barcode}.zip")["Body"].read() == (
            kept
        )
    else:
        assert keys(clean, "processed/") == set()
    again = (clean.pickup / f"{barcode}.zip").stat()
    assert (again.st_ino, again.st_mtime_ns) == (delivered.st_ino, delivered.st_mtime_ns)
    assert sorted(p.name for p in clean.pickup.iterdir()) == [f"{barcode}.zip"]


@pytest.mark.parametrize("change", ["truncated", "same size, other bytes"])
def test_a_zip_that_is_not_the_one_made_is_not_delivered_and_the_others_go_on(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl, change: str
) -> None:
    changed, other = new_barcodes(2)
    for barcode in (changed, other):
        make_volume(clean.input, barcode)
    zephir.mark_absent(changed, other)
    assert digifeeds("run").returncode == 0  # both zipped, waiting on Zephir
    client = s3_client(clean)
    key = f"input/{changed}.zip"
    made = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    if change == "truncated":
        replaced = made[: len(made) // 2]
    else:
        replaced = made[:-1] + bytes([made[-1] ^ 0xFF])
    client.put_object(Bucket=BUCKET, Key=key, Body=replaced)
    zephir.mark_present(changed, other)

    result = digifeeds("run", "--local-scheduler")

    assert result.returncode == 1
    message = (failure(changed) or {})["message"]
    assert changed in result.stderr and "not delivered" in message
    assert ("bytes" if change == "truncated" else "MD5") in message
    # Nothing of it on the pickup, not even a temporary file; its zip stays in S3.
    assert sorted(p.name for p in clean.pickup.iterdir()) == [f"{other}.zip"]
    assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == replaced
    assert history(other) == DELIVERED


def test_real_volumes_deliver_the_valid_four_and_reject_the_bad_checksums(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    for volume in fixtures().iterdir():
        shutil.copytree(volume, clean.input / volume.name)
    bad = clean.input / "39015004074095"
    before = snapshot(bad)

    result = digifeeds("run")

    assert result.returncode == 1
    assert "4 delivered" in result.stdout
    # The bad volume is named with its cause, without a traceback to bury it.
    assert "39015004074095" in result.stderr and "Traceback" not in result.stderr
    for barcode in ("39015012078393", "39015058510069", "39015039746220", "39015048895836"):
        assert (clean.pickup / f"{barcode}.zip").exists()
        assert history(barcode) == DELIVERED
    assert snapshot(bad) == before
    assert not (clean.pickup / "39015004074095.zip").exists()
    assert "input/39015004074095.zip" not in keys(clean, "input/")
    recorded = failure("39015004074095")
    assert recorded is not None
    assert recorded["kind"] == "bad_volume"
    for name in ("00000001.tif", "00000002.jp2"):
        assert name in recorded["message"]
    assert "39015004074095" in result.stderr
    assert "00000002.jp2" in result.stderr


def test_a_barcode_not_in_alma_fails_once_recorded_and_goes_through_when_added(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    missing, present = new_barcodes(2)
    make_volume(clean.input, missing)
    make_volume(clean.input, present)
    alma.mark_missing(missing)

    first = digifeeds("run")
    second = digifeeds("run")

    assert first.returncode == 1 and second.returncode == 1
    assert history(missing) == ["zipped", "not_found_in_alma"]
    assert (failure(missing) or {})["kind"] == "not_found_in_alma"
    assert f"{missing}: failed (not_found_in_alma)" in second.stderr
    assert history(present) == DELIVERED

    alma.mark_present(missing)
    third = digifeeds("run")

    assert third.returncode == 0, third.stderr
    assert history(missing) == ["zipped", "not_found_in_alma", *DELIVERED[1:]]
    assert failure(missing) is None


def test_a_barcode_already_in_the_set_counts_as_added(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    alma.add_members(barcode)

    result = digifeeds("run")

    assert result.returncode == 0, result.stderr
    assert history(barcode) == DELIVERED
    status = json.loads(digifeeds("status", "--json", barcode).stdout)
    added = next(m for m in status["history"] if m["status"] == "added_to_digifeeds_set")
    assert added["details"] == {"already_in_set": True}


def test_a_barcode_not_yet_in_zephir_waits_and_the_run_succeeds(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    zephir.mark_absent(barcode)

    first = digifeeds("run")

    assert first.returncode == 0, first.stderr
    assert "1 on zephir" in first.stdout
    assert history(barcode) == ["zipped", "added_to_digifeeds_set"]
    assert failure(barcode) is None

    zephir.mark_present(barcode)
    second = digifeeds("run")

    assert second.returncode == 0, second.stderr
    assert history(barcode) == DELIVERED


def test_a_barcode_inside_its_hold_waits_and_is_delivered_once_the_hold_is_over(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)

    first = digifeeds("run", "--hold-days", "14")

    assert first.returncode == 0, first.stderr
    assert "1 on hold" in first.stdout
    assert history(barcode) == ["zipped", "added_to_digifeeds_set", "in_zephir"]

    # A hold of a hundredth of a second is over by the next run.
    second = digifeeds("run", "--hold-days", "0.0000001")

    assert second.returncode == 0, second.stderr
    assert history(barcode) == DELIVERED


def test_a_longer_hold_right_after_a_run_without_one_waits_and_does_not_fail(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    zephir.mark_absent(barcode)
    # With no hold, luigid sees the item's hold as over, and remembers that for a while.
    assert digifeeds("run", "--hold-days", "0").returncode == 0
    zephir.mark_present(barcode)

    held = digifeeds("run", "--hold-days", "14")

    assert held.returncode == 0, held.stderr
    assert "waiting: 1 on hold" in held.stdout
    assert history(barcode) == ["zipped", "added_to_digifeeds_set", "in_zephir"]
    assert failure(barcode) is None


def test_the_luigi_command_delivers_one_barcode_through_the_central_scheduler(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    barcode, other = new_barcodes(2)
    make_volume(clean.input, barcode)
    make_volume(clean.input, other)

    result = luigi_command("Delivered", "--barcode", barcode)

    assert result.returncode == 0, result.stderr
    assert (clean.pickup / f"{barcode}.zip").exists()
    assert not (clean.pickup / f"{other}.zip").exists()
    assert history(barcode) == DELIVERED
    answer = requests.get(
        f"{clean.url('luigid')}/api/task_list",
        params={"data": json.dumps({"status": "DONE", "upstream_status": "", "search": barcode})},
        timeout=10,
    ).json()["response"]
    families = {task["name"] for task in answer.values()}
    assert {"ZipVolume", "InAlmaSet", "InZephir", "ReadyForPickup", "Delivered"} <= families


def test_the_luigi_command_fails_with_a_nonzero_exit_when_a_task_fails(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    alma.mark_missing(barcode)

    result = luigi_command("Delivered", "--barcode", barcode)

    assert result.returncode == 30, result.stderr


def test_the_luigi_command_exits_25_while_the_chain_waits_on_zephir(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    zephir.mark_absent(barcode)

    result = luigi_command("Delivered", "--barcode", barcode)

    assert result.returncode == 25, result.stderr
    assert history(barcode) == ["zipped", "added_to_digifeeds_set"]
    assert failure(barcode) is None


def test_an_invalid_barcode_is_refused_before_use(clean: Sandbox) -> None:
    result = luigi_command("Delivered", "--barcode", "../../etc/passwd", "--local-scheduler")

    assert result.returncode != 0
    assert "not a valid barcode" in result.stderr + result.stdout


def test_status_prints_the_history_with_times(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    digifeeds("run")

    shown = digifeeds("status", barcode)

    assert shown.returncode == 0
    lines = shown.stdout.splitlines()
    assert [line.split()[1] for line in lines] == DELIVERED
    times = [dt.datetime.fromisoformat(line.split()[0]) for line in lines]
    assert times == sorted(times)
    assert all(t.tzinfo is not None and t.utcoffset() == dt.timedelta(0) for t in times)


def test_a_plain_file_and_a_bad_folder_name_are_refused_and_left_in_place(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    (clean.input / "notes.txt").write_text("scanner notes")
    make_volume(clean.input, "39015 bad name")

    result = digifeeds("run")

    assert result.returncode == 1
    assert history(barcode) == DELIVERED
    assert (clean.input / "notes.txt").read_text() == "scanner notes"
    assert (clean.input / "39015 bad name" / "checksum.md5").exists()
    assert "39015 bad name: refused" in result.stderr
    assert Path(clean.input / "notes.txt").exists()


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (400, "UNAUTHORIZED", "alma_configuration"),
        (400, "60107", "alma_configuration"),
        (429, "DAILY_THRESHOLD", "alma_quota"),
    ],
)
def test_an_alma_refusal_fails_once_and_leaves_the_other_barcodes_waiting(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl, status: int, code: str, kind: str
) -> None:
    barcodes = new_barcodes(3)
    for barcode in barcodes:
        make_volume(clean.input, barcode)
    alma.fault(status=status, code=code, count=None)

    result = digifeeds("run", "--batch-size", "1", "--workers", "1")

    assert result.returncode == 1
    assert f"failed: 1 {kind}" in result.stdout, result.stderr
    assert "2 on alma" in result.stdout
    assert "Alma calls stopped for the rest of this run" in result.stderr
    calls = [r for r in alma.requests() if "/conf/sets/" in r["path"]]
    assert len({tuple(r["barcodes"]) for r in calls}) == 1
    assert all(history(b) == ["zipped"] for b in barcodes)

    alma.clear_faults()
    again = digifeeds("run")

    assert again.returncode == 0, again.stderr
    assert all(history(b) == DELIVERED for b in barcodes)


def test_a_zephir_outage_is_a_failure_not_a_wait(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    zephir.fault(status=503, count=None)

    result = digifeeds("run")

    assert result.returncode == 1
    assert history(barcode) == ["zipped", "added_to_digifeeds_set"]
    recorded = failure(barcode)
    assert recorded is not None and recorded["kind"] == "zephir"
    assert "503" in recorded["message"]

    zephir.clear_faults()
    again = digifeeds("run")

    assert again.returncode == 0, again.stderr
    assert history(barcode) == DELIVERED
    assert failure(barcode) is None


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"digifeeds": {"batch_size": "0"}}, "batch_size must be at least 1"),
        ({"digifeeds": {"workers": "-3"}}, "workers must be at least 1"),
        ({"digifeeds": {"hold_days": "-1"}}, "hold_days must not be negative"),
        (
            {"digifeeds": {"hold_days": "abc"}},
            "{config}: [digifeeds] hold_days = 'abc' is not a valid value",
        ),
        (
            {"digifeeds": {"host_role": "bogus"}},
            "{config}: [digifeeds] host_role = 'bogus' is not a valid value",
        ),
        (
            {"digifeeds": {"compression": "lzma"}},
            "{config}: [digifeeds] compression = 'lzma' is not a valid value",
        ),
        ({"pickup": {"known_hosts": "/nonexistent/known_hosts"}}, "known_hosts"),
        ({"digifeeds": {"lock_file": "/"}}, "lock file"),
    ],
)
def test_a_bad_setting_stops_the_run_with_exit_2_and_a_clear_message(
    clean: Sandbox, tmp_path: Path, settings: dict[str, dict[str, str]], words: str
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    before = snapshot(clean.input)

    result = digifeeds("run", env=config_with(tmp_path / "bad.cfg", settings))

    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr
    # A value Luigi cannot read is named with the file that sets it.
    assert words.format(config=tmp_path / "bad.cfg") in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(clean.input) == before


def test_an_unreachable_scheduler_fails_the_run_with_a_clear_message(
    clean: Sandbox, tmp_path: Path
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    env = config_with(tmp_path / "c.cfg", {"core": {"default_scheduler_url": "http://127.0.0.1:9"}})

    result = digifeeds("run", env=env)

    assert result.returncode == 1
    assert "cannot reach the central scheduler http://127.0.0.1:9" in result.stderr
    assert (clean.input / barcode).exists()


def test_a_file_already_at_the_pickup_name_is_not_taken_for_the_delivery(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    assert digifeeds("run", "--role", "zip").returncode == 0
    size = s3_client(clean).head_object(Bucket=BUCKET, Key=f"input/{barcode}.zip")["ContentLength"]
    stranger = clean.pickup / f"{barcode}.zip"
    stranger.write_bytes(b"\0" * size)

    result = digifeeds("run")

    assert result.returncode == 1
    assert stranger.read_bytes() == b"\0" * size
    assert history(barcode)[-1] == "copying_start"
    assert f"input/{barcode}.zip" in keys(clean, "input/")
    recorded = failure(barcode)
    assert recorded is not None and recorded["kind"] == "pickup"
    assert str(stranger.name) in recorded["message"]


def test_a_rescanned_folder_of_a_delivered_barcode_is_refused_and_kept(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    make_volume(clean.input, barcode)
    assert digifeeds("run").returncode == 0
    make_volume(clean.input, barcode, pages=4, seed=9)
    before = snapshot(clean.input / barcode)

    # luigid ignores a PENDING claim for 10 s after DONE (stable_done_cooldown_secs);
    # cron's runs are minutes apart, this one is not.
    result = digifeeds("run", "--local-scheduler")

    assert result.returncode == 1
    assert snapshot(clean.input / barcode) == before
    recorded = failure(barcode)
    assert recorded is not None and recorded["kind"] == "bad_volume"
    assert "already zipped" in recorded["message"]


def test_a_zip_without_a_zipped_marker_waits_and_says_why(
    clean: Sandbox, alma: AlmaControl, zephir: ZephirControl
) -> None:
    (barcode,) = new_barcodes(1)
    s3_client(clean).put_object(Bucket=BUCKET, Key=f"input/{barcode}.zip", Body=b"PK")

    result = digifeeds("run", "--role", "workflow")

    assert result.returncode == 0, result.stderr
    assert "1 on zip" in result.stdout
    assert f"{barcode}: its zip is in the input prefix but has no zipped marker" in result.stderr
