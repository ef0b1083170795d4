"""Digifeeds: send digitized volumes through Alma and Zephir to Google's SFTP pickup.

The Luigi tasks are importable from here, so that
``luigi --module pipeline Delivered --barcode 39015012345678`` finds them.
"""

from pipeline.runner import DigifeedsBatch, DigifeedsRun
from pipeline.tasks import (
    Delivered,
    HoldOver,
    InAlmaSet,
    InZephir,
    ReadyForPickup,
    VolumeFolder,
    ZephirRecord,
    ZipVolume,
)

__all__ = [
    "Delivered",
    "DigifeedsBatch",
    "DigifeedsRun",
    "HoldOver",
    "InAlmaSet",
    "InZephir",
    "ReadyForPickup",
    "VolumeFolder",
    "ZephirRecord",
    "ZipVolume",
]
