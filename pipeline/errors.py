"""The exception family of Digifeeds: one base error, one branch per concern."""

from __future__ import annotations

from collections.abc import Sequence


class DigifeedsError(Exception):
    """Base of every error Digifeeds raises; carries the barcode it concerns, if any.

    ``kind`` is a short, stable name for the failure, used as a metric label and in
    failure markers; subclasses set their own.
    """

    kind = "error"

    def __init__(self, message: str, *, barcode: str | None = None) -> None:
        self.barcode = barcode
        self.message = message
        super().__init__(f"{barcode}: {message}" if barcode else message)


class ConfigurationError(DigifeedsError):
    """A setting is missing or wrong; retrying will not help until someone fixes it."""

    kind = "configuration"


class InvalidBarcodeError(DigifeedsError):
    """A string is not a barcode that is safe to use as an S3 key, file name or SFTP name."""

    kind = "invalid_barcode"


class VolumeError(DigifeedsError):
    """A volume folder cannot be packaged; ``problems`` lists every reason found."""

    kind = "bad_volume"

    def __init__(self, barcode: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems), barcode=barcode)


class ZipError(DigifeedsError):
    """A written zip failed its re-read check."""

    kind = "bad_zip"


class StorageError(DigifeedsError):
    """An S3 request failed or an object is not what it should be."""

    kind = "s3"


class ObjectChangedError(StorageError):
    """An object is not the one meant: it was replaced, or changed, since."""

    kind = "zip_changed"


class AlmaError(DigifeedsError):
    """Alma answered with an error, or did not answer."""

    kind = "alma"

    def __init__(
        self,
        message: str,
        *,
        barcode: str | None = None,
        code: str | None = None,
        http_status: int | None = None,
    ) -> None:
        self.code = code
        self.http_status = http_status
        super().__init__(message, barcode=barcode)


class BarcodeNotInAlmaError(AlmaError):
    """Alma does not know the barcode (error 60120)."""

    kind = "not_found_in_alma"


class AlmaConfigurationError(AlmaError):
    """Alma refused the key or the set (UNAUTHORIZED, FORBIDDEN, 60107)."""

    kind = "alma_configuration"


class AlmaQuotaError(AlmaError):
    """Alma's daily call quota is spent (DAILY_THRESHOLD)."""

    kind = "alma_quota"


class ZephirError(DigifeedsError):
    """Zephir answered with an error other than 'not found', or did not answer."""

    kind = "zephir"


class PickupError(DigifeedsError):
    """Delivery to the SFTP pickup server failed."""

    kind = "pickup"


class HostKeyError(PickupError):
    """The pickup server's host key is unknown or has changed."""

    kind = "pickup_host_key"


class VolumeChangedError(VolumeError):
    """A volume folder changed while it was being zipped; zip it again once it settles."""

    kind = "volume_changed"


class AlmaStoppedError(AlmaError):
    """Alma calls were stopped earlier in this run; the barcode is left for the next run."""

    kind = "alma_stopped"


class SchedulerError(DigifeedsError):
    """The central scheduler (luigid) cannot be reached."""

    kind = "scheduler"


class BuilderError(DigifeedsError):
    """A process building batches of a run died."""

    kind = "builder"
