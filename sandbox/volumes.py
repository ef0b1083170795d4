"""Sample volume folders for the demo, tests and benchmarks, generated rather than copied.

:func:`make_volume` draws small pages that look like scanned text; :func:`make_scaled_volume`
re-saves a real fixture's page images at scanning size so that pages weigh what real scans
weigh. Both write the companions a real volume has: OCR text, meta.yml and checksum.md5.
"""

from __future__ import annotations

import hashlib
import logging
import random
from datetime import datetime, timedelta, timezone
from io import BytesIO
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.barcodes import with_check_digit

logger = logging.getLogger(__name__)

PAGE_SIZE = (1000, 1400)
# A letter page scanned at 600 dpi (bilevel) and at 300 dpi (colour).
SCAN_SIZE_BILEVEL = (5100, 6600)
SCAN_SIZE_COLOUR = (2550, 3300)
# Colour pages get a faint sensor grain and are kept at 1/5 of their raw size, as a
# high-quality archival JPEG 2000 is: about 5 MB each. With the bilevel pages (about
# 45 KB) between them, a scaled volume weighs about 2.5 MB per page.
_GRAIN = 0.04
_COLOUR_RATE = 5

_VOCABULARY = (
    "the of and to in that is was for with as his on by be at from this which or "
    "library volume chapter history university michigan state report annual page"
)
_WORDS = tuple(_VOCABULARY.split())
_SCANNER_USERS = ("University of Michigan", "UM Digital Conversion Services", "Bentley Library")


def sample_barcodes(n: int, start: int = 0) -> list[str]:
    """Return ``n`` Michigan barcodes with correct check digits, sequences from ``start`` on."""
    return [with_check_digit(f"39015{sequence:08d}") for sequence in range(start, start + n)]


def make_volume(parent: Path, barcode: str, pages: int = 3, *, seed: int = 0) -> Path:
    """Write a valid volume folder ``parent/barcode`` of ``pages`` generated pages.

    Odd pages are bilevel group 4 TIFFs, even pages JPEG 2000; each page has its OCR
    text, and the folder has meta.yml and an md5sum-style checksum.md5. The same
    ``seed`` gives the same bytes.
    """
    rng = random.Random(f"{barcode}:{seed}")
    folder = parent / barcode
    folder.mkdir(parents=True)

    for number in range(1, pages + 1):
        image, text = _draw_page(rng, number)
        if number % 2:
            image.convert("1", dither=Image.Dither.NONE).save(
                folder / f"{number:08d}.tif", compression="group4", dpi=(600, 600)
            )
        else:
            image.save(
                folder / f"{number:08d}.jp2",
                irreversible=True,
                quality_mode="rates",
                quality_layers=[20],
                no_jp2=False,
            )
        (folder / f"{number:08d}.txt").write_text(text, encoding="utf-8")

    _write_meta(folder, rng)
    _write_checksums(folder)
    logger.debug("%s: generated a volume of %d pages in %s", barcode, pages, folder)
    return folder


def make_scaled_volume(parent: Path, barcode: str, pages: int, fixture_folder: Path) -> Path:
    """Write a volume of ``pages`` pages at scanning size, built from a fixture's page images.

    Each ``.tif`` of the fixture becomes a 600 dpi letter bilevel group 4 TIFF, each
    ``.jp2`` a 300 dpi letter colour JPEG 2000 with a scanner's grain; the pages cycle
    through these. Every distinct page is encoded once and its bytes reused, so a large
    volume is quick to make. From a fixture of one page of each kind, a volume weighs
    about 2.5 MB per page (1 GB for 400 pages), as real scans do.
    """
    sources = sorted(path for path in fixture_folder.iterdir() if path.suffix in (".tif", ".jp2"))
    if not sources:
        raise ValueError(f"{fixture_folder} holds no page images")
    encoded = [(source.suffix, _rescale(source)) for source in sources]

    rng = random.Random(barcode)
    folder = parent / barcode
    folder.mkdir(parents=True)
    for number in range(1, pages + 1):
        suffix, data = encoded[(number - 1) % len(encoded)]
        (folder / f"{number:08d}{suffix}").write_bytes(data)
        (folder / f"{number:08d}.txt").write_text(_ocr_text(rng), encoding="utf-8")

    _write_meta(folder, rng)
    _write_checksums(folder)
    logger.debug("%s: generated a scaled volume of %d pages in %s", barcode, pages, folder)
    return folder


def _draw_page(rng: random.Random, number: int) -> tuple[Image.Image, str]:
    """Draw a page of text-like marks (word blocks on lines) and return it with its 'OCR'."""
    width, height = PAGE_SIZE
    image = Image.new("L", PAGE_SIZE, color=255)
    draw = ImageDraw.Draw(image)
    margin, line_height = 90, 34
    words: list[str] = []

    y = margin + 40
    draw.text((width // 2 - 10, margin // 2), str(number), fill=0)
    while y < height - margin - line_height:
        x = margin + (40 if rng.random() < 0.15 else 0)
        line_end = width - margin - (rng.randrange(300) if rng.random() < 0.1 else 0)
        while True:
            word = rng.choice(_WORDS)
            word_width = 9 * len(word) + rng.randrange(6)
            if x + word_width > line_end:
                break
            draw.rectangle((x, y, x + word_width, y + 16), fill=rng.randrange(0, 60))
            words.append(word)
            x += word_width + 11
        words.append("\n")
        y += line_height
    return image, " ".join(words).replace(" \n ", "\n").strip() + "\n"


def _ocr_text(rng: random.Random) -> str:
    lines = (" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(40))
    return "\n".join(lines) + "\n"


def _rescale(source: Path) -> bytes:
    """Decode a page image and re-encode it at scanning size, in the same format.

    An upscaled page is smoother than a scan and would compress to a fraction of a real
    page's weight, so colour pages get a faint grain, drawn from a generator seeded by
    the file name so the same fixture always gives the same bytes.
    """
    out = BytesIO()
    with Image.open(source) as image:
        if source.suffix == ".tif":
            page = (
                image.convert("L").resize(SCAN_SIZE_BILEVEL).convert("1", dither=Image.Dither.NONE)
            )
            page.save(out, format="TIFF", compression="group4", dpi=(600, 600))
        else:
            page = image.convert("RGB").resize(SCAN_SIZE_COLOUR)
            width, height = SCAN_SIZE_COLOUR
            noise = random.Random(source.name).randbytes(width * height)
            grain = Image.frombytes("L", SCAN_SIZE_COLOUR, noise).convert("RGB")
            page = Image.blend(page, grain, _GRAIN)
            page.save(
                out,
                format="JPEG2000",
                irreversible=True,
                quality_mode="rates",
                quality_layers=[_COLOUR_RATE],
                no_jp2=False,
            )
    return out.getvalue()


def _write_meta(folder: Path, rng: random.Random) -> None:
    captured = datetime(2016, 1, 4, 9, tzinfo=timezone(timedelta(hours=-5))) + timedelta(
        days=rng.randrange(3000), minutes=rng.randrange(600)
    )
    (folder / "meta.yml").write_text(
        f"capture_date: {captured.isoformat()}\n"
        f"scanner_user: '{rng.choice(_SCANNER_USERS)}'\n"
        "scanning_order: left-to-right\n"
        "reading_order: left-to-right\n",
        encoding="utf-8",
    )


def _write_checksums(folder: Path) -> None:
    """Write checksum.md5 the way md5sum does, for every file in the folder."""
    lines = []
    for path in sorted(folder.iterdir()):
        with path.open("rb") as source:
            digest = hashlib.file_digest(source, "md5").hexdigest()
        lines.append(f"{digest}  {path.name}\n")
    (folder / "checksum.md5").write_text("".join(lines), encoding="utf-8")
