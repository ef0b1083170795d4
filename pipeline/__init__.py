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
    """Log one of our errors by its message alone, without the traceback Luigi adds.

    A Digifeeds error names the barcode and the cause in its message; the traceback
    of a bad volume or a bad barcode only buries it. The message is kept on the
    record, as Luigi's own line ("Uncaught exception in luigi") does not carry it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, DigifeedsError):
            message = record.getMessage()
            if str(error) not in message:
                message = f"{message}: {error}"
            record.msg, record.args = message, None
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
