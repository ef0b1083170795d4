"""The statuses an item goes through, in the order they are normally recorded."""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """One step of an item's history; each is recorded once, as a marker in S3."""

    ZIPPED = "zipped"
    NOT_FOUND_IN_ALMA = "not_found_in_alma"
    ADDED_TO_DIGIFEEDS_SET = "added_to_digifeeds_set"
    IN_ZEPHIR = "in_zephir"
    READY_FOR_PICKUP = "ready_for_pickup"
    COPYING_START = "copying_start"
    COPYING_END = "copying_end"
    PENDING_DELETION = "pending_deletion"

    def __str__(self) -> str:
        return self.value
