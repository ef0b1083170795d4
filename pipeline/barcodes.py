"""Barcode validation: what may name a volume, a zip, a marker and a pickup file."""

from __future__ import annotations

import functools
import logging
import re

from pipeline.errors import InvalidBarcodeError

logger = logging.getLogger(__name__)

# A Michigan item barcode: "3" (item), "9015" (institution), an 8-digit sequence and a
# check digit. Digits only, so always safe in S3 keys, file names and SFTP paths.
_BARCODE = re.compile(r"39015[0-9]{9}")


def validate(barcode: object) -> str:
    """Return ``barcode`` if it is a Michigan item barcode, else raise.

    A barcode whose check digit fails is accepted with a warning: not every real
    barcode passes the check.
    """
    if not is_valid(barcode):
        raise InvalidBarcodeError(
            f"{barcode!r} is not a valid barcode: expected 14 digits starting with 39015"
        )
    assert isinstance(barcode, str)
    if not check_digit_ok(barcode):
        _warn_check_digit(barcode)
    return barcode


@functools.lru_cache(maxsize=4096)
def _warn_check_digit(barcode: str) -> None:
    """Warn once per process about a barcode whose check digit fails."""
    logger.warning("%s: check digit does not match; accepting the barcode anyway", barcode)


def is_valid(barcode: object) -> bool:
    """Tell whether ``barcode`` passes :func:`validate`, without logging."""
    return isinstance(barcode, str) and _BARCODE.fullmatch(barcode) is not None


def check_digit_ok(barcode: str) -> bool:
    """Tell whether a 14-digit barcode's last digit is its mod-10 ("type 1") check digit.

    From the right of the first 13 digits, every other digit starting with the
    rightmost is doubled (9 subtracted when over 9); the check digit brings the sum
    to a multiple of ten.
    """
    if not re.fullmatch(r"[0-9]{14}", barcode):
        return False
    total = 0
    for position, char in enumerate(reversed(barcode[:13])):
        digit = int(char)
        if position % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return (10 - total % 10) % 10 == int(barcode[13])


def with_check_digit(first13: str) -> str:
    """Return the 14-digit barcode made of ``first13`` and its mod-10 check digit."""
    for digit in "0123456789":
        if check_digit_ok(first13 + digit):
            return first13 + digit
    raise ValueError(f"{first13!r} is not 13 digits")
