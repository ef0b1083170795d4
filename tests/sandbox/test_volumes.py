"""Tests of the sample volume generator: its volumes must look real and pass the real rules."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers import FIXTURES
from PIL import Image

from pipeline.barcodes import check_digit_ok, is_valid
from pipeline.volume import inspect_volume, write_zip
from sandbox.volumes import (
    PAGE_SIZE,
    SCAN_SIZE_BILEVEL,
    SCAN_SIZE_COLOUR,
    make_scaled_volume,
    make_volume,
    sample_barcodes,
)

REPO = Path(__file__).resolve().parents[2]


def fixture_volume(barcode: str) -> Path:
    if not (FIXTURES / barcode).is_dir():
        pytest.skip(f"fixture volume {FIXTURES / barcode} is not available")
    return FIXTURES / barcode


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_sample_barcodes_are_valid_distinct_and_check_digited() -> None:
    barcodes = sample_barcodes(25, start=1000)

    assert len(barcodes) == len(set(barcodes)) == 25
    assert all(is_valid(b) and check_digit_ok(b) for b in barcodes)
    assert barcodes[0].startswith("3901500001000")
    assert sample_barcodes(3) == ["39015000000003", "39015000000011", "39015000000029"]


def test_generated_volume_passes_inspection_and_zips(tmp_path: Path) -> None:
    barcode = sample_barcodes(1)[0]

    folder = make_volume(tmp_path, barcode, pages=4)
    manifest = inspect_volume(folder, barcode)
    summary = write_zip(manifest, tmp_path / f"{barcode}.zip")

    assert folder == tmp_path / barcode
    assert manifest.zip_members == [
        "00000001.tif",
        "00000002.jp2",
        "00000003.tif",
        "00000004.jp2",
        "checksum.md5",
    ]
    assert manifest.warnings == []
    assert summary.page_count == 4


def test_generated_volume_has_the_companions_of_a_real_one(tmp_path: Path) -> None:
    folder = make_volume(tmp_path, sample_barcodes(1)[0], pages=2)

    names = sorted(p.name for p in folder.iterdir())
    meta = (folder / "meta.yml").read_text()
    checksum_lines = (folder / "checksum.md5").read_text().splitlines()

    assert names == [
        "00000001.tif",
        "00000001.txt",
        "00000002.jp2",
        "00000002.txt",
        "checksum.md5",
        "meta.yml",
    ]
    assert meta.startswith("capture_date: ")
    assert "scanner_user: " in meta
    assert len((folder / "00000001.txt").read_text().split()) > 50
    for line in checksum_lines:
        digest, name = line.split("  ")
        assert (
            hashlib.md5((folder / name).read_bytes(), usedforsecurity=False).hexdigest() == digest
        )
    assert len(checksum_lines) == 5


def test_generated_pages_are_bilevel_g4_tiffs_and_jpeg2000(tmp_path: Path) -> None:
    folder = make_volume(tmp_path, sample_barcodes(1)[0], pages=2)

    with Image.open(folder / "00000001.tif") as tif:
        assert (tif.format, tif.mode, tif.size) == ("TIFF", "1", PAGE_SIZE)
        assert tif.info["compression"] == "group4"
        black = tif.convert("L").histogram()[0]
    with Image.open(folder / "00000002.jp2") as jp2:
        assert jp2.format == "JPEG2000"
        assert jp2.size == PAGE_SIZE
        jp2.load()

    # Text-like marks: a real share of the page is ink, but far from all of it.
    assert 0.05 < black / (PAGE_SIZE[0] * PAGE_SIZE[1]) < 0.6


def test_same_seed_gives_same_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    barcode = sample_barcodes(1)[0]

    first = tree_bytes(make_volume(tmp_path / "a", barcode, pages=2, seed=7))
    again = tree_bytes(make_volume(tmp_path / "b", barcode, pages=2, seed=7))
    other = tree_bytes(make_volume(tmp_path / "c", barcode, pages=2, seed=8))

    assert first == again
    assert first["00000001.tif"] != other["00000001.tif"]


def test_make_volume_refuses_to_overwrite(tmp_path: Path) -> None:
    barcode = sample_barcodes(1)[0]
    make_volume(tmp_path, barcode, pages=1)

    with pytest.raises(FileExistsError):
        make_volume(tmp_path, barcode, pages=1)


@pytest.mark.slow
def test_scaled_volume_has_scan_sized_pages_and_passes_inspection(tmp_path: Path) -> None:
    source = fixture_volume("39015012078393")
    barcode = sample_barcodes(1, start=500)[0]

    folder = make_scaled_volume(tmp_path, barcode, 5, source)
    manifest = inspect_volume(folder, barcode)

    assert [p.name for p in manifest.pages] == [
        "00000001.tif",
        "00000002.jp2",
        "00000003.tif",
        "00000004.jp2",
        "00000005.tif",
    ]
    with Image.open(folder / "00000003.tif") as tif:
        assert (tif.mode, tif.size, tif.info["compression"]) == ("1", SCAN_SIZE_BILEVEL, "group4")
    with Image.open(folder / "00000004.jp2") as jp2:
        assert (jp2.format, jp2.mode, jp2.size) == ("JPEG2000", "RGB", SCAN_SIZE_COLOUR)
    # Scan-sized pages weigh more than the small fixture pages they were made from.
    assert (folder / "00000001.tif").stat().st_size > (source / "00000001.tif").stat().st_size
    assert (folder / "00000002.jp2").stat().st_size > (source / "00000002.jp2").stat().st_size


def test_scaled_volume_needs_page_images(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()

    with pytest.raises(ValueError, match="no page images"):
        make_scaled_volume(tmp_path, sample_barcodes(1)[0], 2, empty)


@pytest.mark.slow
def test_scaled_volume_weighs_what_real_scans_weigh_and_is_repeatable(tmp_path: Path) -> None:
    source = fixture_volume("39015012078393")
    barcode = sample_barcodes(1, start=501)[0]

    first = make_scaled_volume(tmp_path / "a", barcode, 2, source)
    again = make_scaled_volume(tmp_path / "b", barcode, 2, source)
    pages = [first / "00000001.tif", first / "00000002.jp2"]

    # About 2.5 MB per page, so that 400 pages make the 1 GB volume the benchmarks use.
    assert 2_000_000 < sum(page.stat().st_size for page in pages) / 2 < 3_000_000
    assert tree_bytes(first) == tree_bytes(again)
