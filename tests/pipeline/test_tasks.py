"""Pieces of the tasks that the end-to-end tests cannot reach without a broken disk."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest

from pipeline.errors import VolumeError
from pipeline.tasks import Progress, ZipVolume, hold_over
from pipeline.volume import md5_of_file
from sandbox.volumes import make_volume

BARCODE = "39015012078393"


def kept_copy(tmp_path: Path) -> tuple[Path, Path, str]:
    folder = make_volume(tmp_path / "input", BARCODE)
    kept = tmp_path / "processed" / f"{BARCODE}_20261203T000000Z"
    shutil.copytree(folder, kept / BARCODE)
    zip_copy = kept / f"{BARCODE}.zip"
    zip_copy.write_bytes(b"PK zip bytes")
    return folder, kept, md5_of_file(zip_copy)


def test_a_good_processed_copy_passes(tmp_path: Path) -> None:
    folder, kept, md5 = kept_copy(tmp_path)

    ZipVolume(barcode=BARCODE).check_kept_copy(folder, kept, md5)


def test_a_processed_copy_with_a_damaged_zip_is_refused(tmp_path: Path) -> None:
    folder, kept, md5 = kept_copy(tmp_path)
    (kept / f"{BARCODE}.zip").write_bytes(b"PK zip byteS")

    with pytest.raises(VolumeError, match=f"{BARCODE}: the copy of the zip"):
        ZipVolume(barcode=BARCODE).check_kept_copy(folder, kept, md5)


@pytest.mark.parametrize("damage", ["missing", "short"])
def test_a_processed_copy_missing_or_short_a_file_is_refused(tmp_path: Path, damage: str) -> None:
    folder, kept, md5 = kept_copy(tmp_path)
    page = kept / BARCODE / "00000002.jp2"
    if damage == "missing":
        page.unlink()
    else:
        page.write_bytes(page.read_bytes()[:-1])

    with pytest.raises(VolumeError, match=r"the copy of 00000002\.jp2 .* is missing or incomplete"):
        ZipVolume(barcode=BARCODE).check_kept_copy(folder, kept, md5)


@pytest.mark.parametrize(
    ("age_days", "hold_days", "over"),
    [(0, 14, False), (13.99, 14, False), (14, 14, True), (30, 14, True), (0, 0, True)],
)
def test_the_hold_is_over_after_hold_days(age_days: float, hold_days: float, over: bool) -> None:
    now = dt.datetime(2026, 12, 3, tzinfo=dt.UTC)

    assert hold_over(now - dt.timedelta(days=age_days), hold_days, now) is over


class ShownTask:
    """What a Luigi worker gives a running task: the two web UI callbacks."""

    def __init__(self) -> None:
        self.shown: list[tuple[str, int | None]] = []

    def set_status_message(self, message: str) -> None:
        self.shown.append((message, None))

    def set_progress_percentage(self, percent: int) -> None:
        self.shown[-1] = (self.shown[-1][0], percent)


def test_progress_names_the_step_at_once_and_counts_only_after_a_second() -> None:
    now = [100.0]
    task = ShownTask()
    progress = Progress(task, "copying", clock=lambda: now[0])  # type: ignore[arg-type]
    assert task.shown == [("copying", None)]

    progress(10, 100)
    now[0] += 0.5
    progress(50, 100)
    assert len(task.shown) == 1  # under a second: nothing more

    now[0] += 0.6
    progress(60, 100)
    now[0] += 0.2
    progress(70, 100)  # inside the next second: held back
    progress(100, 100)  # but the end of a counted step is always shown
    assert task.shown[1:] == [("copying: 60 of 100 bytes", 60), ("copying: 100 of 100 bytes", 100)]


def test_a_short_step_shows_only_its_name() -> None:
    now = [0.0]
    task = ShownTask()
    progress = Progress(task, "zipping", clock=lambda: now[0])  # type: ignore[arg-type]
    for done in (1, 2, 3):
        now[0] += 0.1
        progress(done, 3)
    assert task.shown == [("zipping", None)]
