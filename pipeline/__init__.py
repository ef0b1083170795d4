"""Digifeeds: send digitized volumes through Alma and Zephir to Google's SFTP pickup.

The Luigi tasks are importable from here, so that
``luigi --module pipeline Delivered --barcode 39015012345678`` finds them.
"""

import logging
import warnings

import luigi.parameter

from pipeline.errors import DigifeedsError
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


class _KnownFailuresWithoutTraceback(logging.Filter):
    """Drop the traceback Luigi logs with a task's failure when it is one of ours.

    A Digifeeds error names the barcode and the cause in its message, which the task
    logs and records; the traceback of a bad volume only buries it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], DigifeedsError):
            record.exc_info = None
            record.exc_text = None
        return True


logging.getLogger("luigi-interface").addFilter(_KnownFailuresWithoutTraceback())
# luigi.cfg's [core] keys read by Luigi's RPC client are not parameters of its `core`
# section class, and Luigi warns of each on every run.
warnings.filterwarnings("ignore", category=luigi.parameter.UnconsumedParameterWarning)

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
