"""Barcode validation: only Michigan item barcodes, in ASCII digits, are accepted."""

from __future__ import annotations

import logging

import pytest

from pipeline.barcodes import check_digit_ok, is_valid, validate, with_check_digit
from pipeline.errors import InvalidBarcodeError

REAL = ["39015004074095", "39015012078393", "39015039746220", "39015048895836", "39015058510069"]


@pytest.mark.parametrize("barcode", REAL)
def test_real_barcodes_are_valid_and_pass_their_check_digit(barcode: str) -> None:
    assert validate(barcode) == barcode
    assert check_digit_ok(barcode)


@pytest.mark.parametrize(
    "barcode",
    [
        "",
        "3901501207839",  # 13 digits
        "390150120783930",  # 15 digits
        "49015012078393",  # not an item of this institution
        "39015 12078393",
        "39015.12078393",
        "39015/12078393",
        "../39015012078",
        "3901501207839a",
        "39015012078393\n",
        "39015" + "\u0660" * 8 + "\u0663",  # Arabic-Indic digits
        "39015" + "\uff10" * 9,  # full-width digits
    ],
)
def test_anything_else_is_refused_with_a_clear_error(barcode: str) -> None:
    assert not is_valid(barcode)
    with pytest.raises(InvalidBarcodeError, match="not a valid barcode"):
        validate(barcode)


def test_a_failed_check_digit_is_a_warning_not_a_rejection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    barcode = "39015012078390"

    with caplog.at_level(logging.WARNING):
        assert validate(barcode) == barcode

    assert not check_digit_ok(barcode)
    assert f"{barcode}: check digit does not match" in caplog.text


def test_with_check_digit_completes_a_barcode() -> None:
    assert with_check_digit("3901501207839") == "39015012078393"
