"""The Luigi tasks: one chain per barcode, each task completing by writing a marker.

    VolumeFolder ─> ZipVolume ─> InAlmaSet ─┐
                                ZephirRecord ┴> InZephir ─┐
                                              HoldOver ───┴> ReadyForPickup ─> Delivered

VolumeFolder, ZephirRecord and HoldOver are external: they are what the run waits
on (a settled volume folder on this host, Zephir's record, the end of the hold). A
chain that waits on one of them is pending, not failed, and the run exits 0.
"""

from __future__ import annotations

import datetime as dt
import filecmp
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import luigi
from luigi.task import flatten

from pipeline import config, context
from pipeline.alma import MAX_MEMBERS_PER_CALL, AddResult, AlmaClient
from pipeline.barcodes import validate
from pipeline.errors import (
    AlmaConfigurationError,
    AlmaError,
    AlmaQuotaError,
    AlmaStoppedError,
    BarcodeNotInAlmaError,
    DigifeedsError,
    ObjectChangedError,
    StorageError,
    VolumeChangedError,
    VolumeError,
    ZephirError,
    ZipError,
)
from pipeline.status import Status
from pipeline.storage import StoredObject
from pipeline.volume import inspect_volume, last_change, md5_of_file, snapshot, write_zip
from targets.markers import Marker, MarkerTarget, utc_now

logger = logging.getLogger(__name__)


class BarcodeParameter(luigi.Parameter):
    """A barcode, validated before any task uses it as a key or a file name."""

    def normalize(self, x: Any) -> str:
        return validate(str(x))


def zip_key(barcode: str) -> str:
    """The S3 key of a barcode's zip while it waits for delivery."""
    return f"{config.s3().input_prefix}{barcode}.zip"


def processed_key(barcode: str) -> str:
    """The S3 key of a barcode's zip once delivered."""
    return f"{config.s3().processed_prefix}{barcode}.zip"


def volume_folder(barcode: str) -> Path | None:
    """The barcode's volume folder on this host, or None when this host does not zip."""
    cfg = config.digifeeds()
    if cfg.host_role == "workflow" or not cfg.input_folder:
        return None
    return Path(cfg.input_folder) / barcode


def folder_digest(entries: object) -> str:
    """Return a short fingerprint of a folder snapshot, kept in the ``zipped`` marker."""
    return hashlib.sha256(json.dumps(entries, default=str).encode()).hexdigest()


class Progress:
    """Shows a long step in the scheduler's web UI.

    The step's name is shown at once; its bytes and percentage only once it has run
    for a second, then at most once a second, so that short steps cost the
    scheduler nothing more.
    """

    interval = 1.0

    def __init__(
        self, task: luigi.Task, step: str, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.task = task
        self.step = step
        self.clock = clock
        self.last = clock()
        self.counting = False
        show(task, step)

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        finished = done >= total
        if now - self.last < self.interval and not (finished and self.counting):
            return
        self.last = now
        self.counting = not finished
        percent = int(100 * done / total) if total else 100
        show(self.task, f"{self.step}: {done:,} of {total:,} bytes", percent)


def show(task: luigi.Task, message: str, percent: int | None = None) -> None:
    """Show a status message (and a percentage) in the web UI, when a worker runs the task.

    Luigi's worker installs these callbacks on the task only while it runs it.
    """
    set_message = getattr(task, "set_status_message", None)
    set_percent = getattr(task, "set_progress_percentage", None)
    if set_message:
        set_message(message)
    if set_percent and percent is not None:
        set_percent(percent)


class MarkerTask(luigi.Task):
    """A task of one barcode's chain; done once its status marker exists."""

    barcode = BarcodeParameter(description="The item's barcode (14 digits).")
    status: ClassVar[Status]

    def output(self) -> MarkerTarget:
        return MarkerTarget(context.markers(), self.barcode, self.status)

    def record(self, status: Status | None = None, /, **details: Any) -> Marker:
        """Record this task's status (or ``status``) for the barcode; return the marker.

        A status already recorded keeps its first marker, which is returned.
        """
        return context.markers().record(self.barcode, status or self.status, **details)

    def on_success(self) -> None:
        # This task and its requirements are done now: any failure of theirs is over.
        families = {self.task_family} | {t.task_family for t in flatten(self.requires())}
        context.markers().clear_failure(self.barcode, families)

    def on_failure(self, exception: BaseException) -> str:
        """Keep the failure in the barcode's failure record; the UI shows the same message."""
        if isinstance(exception, AlmaStoppedError):
            logger.warning("%s: %s", self.barcode, exception.message)
            return str(exception)
        message = exception.message if isinstance(exception, DigifeedsError) else exception
        logger.error("%s: %s failed: %s", self.barcode, self.task_family, message)
        record_failure(self.barcode, self.task_family, exception)
        if isinstance(exception, DigifeedsError):
            return str(exception)
        return f"{type(exception).__name__}: {exception}"


def record_failure(barcode: str, task: str, exception: BaseException) -> None:
    """Keep a failure in the barcode's failure record; a failure to do so is only logged."""
    try:
        context.markers().record_failure(barcode, task, exception)
    except DigifeedsError as exc:
        logger.error("%s: cannot record the failure: %s", barcode, exc)


class SettledFolder(luigi.Target):
    """A volume folder that exists and has not changed for the settling time."""

    def __init__(self, path: Path | None, settle_seconds: float) -> None:
        self.path = path
        self.settle_seconds = settle_seconds

    def exists(self) -> bool:
        if self.path is None or not self.path.is_dir() or self.path.is_symlink():
            return False
        return time.time() - last_change(self.path) >= self.settle_seconds


class VolumeFolder(luigi.ExternalTask):
    """The scanned volume folder, once it has settled in the input folder of this host."""

    barcode = BarcodeParameter(description="The item's barcode (14 digits).")

    def output(self) -> SettledFolder:
        settle = config.digifeeds().settle_minutes * 60
        return SettledFolder(volume_folder(self.barcode), settle)


# The environment variable naming the point where ZipVolume kills its own process.
CRASH_VARIABLE = "DIGIFEEDS_CRASH_AT"


def _crash_point(name: str, barcode: str) -> None:
    """Kill this process with SIGKILL here, when ``DIGIFEEDS_CRASH_AT`` names this point.

    A fault-injection hook for the crash tests, and nothing else: a real ``kill -9``
    (no exception, no ``finally``, no cleanup) at a named step of ZipVolume or
    Delivered, to show that the next run finishes the job and nothing is lost.
    ZipVolume's points, in order: ``zipping`` (some but not all of the zip written),
    ``uploading`` (some but not all of the zip sent to S3; a zip of one upload
    chunk, 256 KiB, has no such moment), ``uploaded`` (the zip verified in S3,
    before the processed copy), ``kept`` (after the processed copy, before the
    ``zipped`` marker), ``zipped`` (after the marker, before the deletion) and
    ``retiring`` (after the first file of the input folder is deleted). Delivered's:
    ``delivered`` (after ``copying_end``, before the processed copy in S3) and
    ``moving`` (after ``pending_deletion``, before the input copy is deleted).
    ``<point>:<barcode>`` kills only at that barcode's point. Unset in production, it
    costs one environment lookup per step.
    """
    if os.environ.get(CRASH_VARIABLE) in (name, f"{name}:{barcode}"):
        logger.warning("%s is %s: killing this process", CRASH_VARIABLE, name)
        os.kill(os.getpid(), signal.SIGKILL)


class ZipVolume(MarkerTask):
    """Zip a verified volume into the S3 input prefix, then retire the volume folder.

    The input folder is only read until the zip is verified in S3, copied with the
    folder to the processed folder and the ``zipped`` marker is written; only then is
    it deleted. A failure at any point leaves it as it was, and a crash during the
    deletion leaves only files that equal their processed copy, which the next run
    deletes.
    """

    status = Status.ZIPPED

    def requires(self) -> VolumeFolder:
        return VolumeFolder(barcode=self.barcode)

    def complete(self) -> bool:
        # Done once zipped, and, on the host that zips, once the input folder is retired.
        folder = volume_folder(self.barcode)
        retired = folder is None or not folder.exists()
        return retired and super().complete()

    def run(self) -> None:
        folder = volume_folder(self.barcode)
        assert folder is not None, "VolumeFolder is complete only where the input folder is"
        # A crash after the marker but before the deletion leaves only the deletion to do.
        zipped = context.markers().read(self.barcode, Status.ZIPPED)
        details = self.zip_and_upload(folder) if zipped is None else zipped.details
        _crash_point("zipped", self.barcode)
        self.retire(folder, details)

    def working_folder(self) -> Path:
        cfg = config.digifeeds()
        return Path(cfg.working_folder) / f"{self.barcode}.working"

    def progress(self, step: str) -> Callable[[int, int], None]:
        """Report a step's progress, passing the crash point named by the step midway."""
        shown = Progress(self, step)

        def report(done: int, total: int) -> None:
            if 0 < done < total:
                _crash_point(step, self.barcode)
            shown(done, total)

        return report

    def zip_and_upload(self, folder: Path) -> dict[str, Any]:
        """Verify and zip the volume, upload the zip, keep copies; return the marker details."""
        cfg = config.digifeeds()
        before = snapshot(folder)
        # A crashed run may have left a working folder: it is only ever scratch.
        work = self.working_folder()
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            # Verify page order and fixity.
            show(self, "verifying page images")
            manifest = inspect_volume(folder, self.barcode)
            logger.info("%s: verified %d page images", self.barcode, len(manifest.pages))

            # Zip, then re-read the zip.
            zip_path = work / f"{self.barcode}.zip"
            summary = write_zip(
                manifest,
                zip_path,
                compression=cfg.compression,
                progress=self.progress("zipping"),
            )
            logger.info("%s: zipped %d bytes", self.barcode, summary.size)
            if snapshot(folder) != before:
                raise VolumeChangedError(
                    self.barcode, ["the volume folder changed while it was being zipped"]
                )

            # Upload, checked by S3 and confirmed afterwards.
            context.storage().upload_verified(
                zip_path, zip_key(self.barcode), progress=self.progress("uploading")
            )
            logger.info("%s: uploaded to %s", self.barcode, zip_key(self.barcode))
            _crash_point("uploaded", self.barcode)

            # Keep the zip and the folder in the processed folder. A copy of the same
            # second can only be a crashed attempt's, as no marker names it: replace it.
            # NOTE: a crashed attempt's copy from an earlier second stays, as a spare
            # beside the copy the marker names; nothing removes it.
            show(self, "copying to the processed folder")
            stamp = utc_now().strftime("%Y%m%dT%H%M%SZ")
            kept = Path(cfg.processed_folder) / f"{self.barcode}_{stamp}"
            shutil.rmtree(kept, ignore_errors=True)
            kept.mkdir(parents=True)
            shutil.copy2(zip_path, kept / zip_path.name)
            shutil.copytree(folder, kept / self.barcode, symlinks=True)
            self.check_kept_copy(folder, kept, summary.md5)
            logger.info("%s: kept a copy in %s", self.barcode, kept)
            _crash_point("kept", self.barcode)

            details = {
                "zip_size": summary.size,
                "zip_md5": summary.md5,
                "pages": summary.page_count,
                "warnings": manifest.warnings,
                "processed_copy": str(kept),
                "folder_digest": folder_digest(before),
            }
            self.record(**details)
            return details
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def check_kept_copy(self, folder: Path, kept: Path, zip_md5: str) -> None:
        """Check the processed copy before anything relies on it.

        Its zip must have the zip's MD5, and every file of the folder must be there
        with its size.
        """
        problems = []
        if md5_of_file(kept / f"{self.barcode}.zip") != zip_md5:
            problems.append(f"the copy of the zip in {kept} differs from the zip")
        for source in sorted(folder.iterdir()):
            copy = kept / self.barcode / source.name
            if not copy.exists() or copy.stat().st_size != source.stat().st_size:
                problems.append(f"the copy of {source.name} in {kept} is missing or incomplete")
        if problems:
            raise VolumeError(self.barcode, problems)

    def retire(self, folder: Path, details: dict[str, Any]) -> None:
        """Delete the input folder, if it holds only what was zipped.

        The folder must be exactly the one zipped, or what an interrupted deletion left
        of it: files whose bytes equal their copies in the processed folder.
        """
        if not folder.exists():
            return
        unchanged = folder_digest(snapshot(folder)) == details.get("folder_digest")
        if not unchanged and not self.partly_retired(folder, details):
            raise VolumeError(
                self.barcode,
                [
                    "the volume was already zipped, but the folder in the input folder "
                    "differs from the one zipped; it is left in place for a person to check"
                ],
            )

        # A zipped volume folder is flat: its files, then the folder itself.
        for path in sorted(folder.iterdir()):
            path.unlink()
            _crash_point("retiring", self.barcode)
        folder.rmdir()
        logger.info("%s: deleted the input folder %s", self.barcode, folder)

    def partly_retired(self, folder: Path, details: dict[str, Any]) -> bool:
        """Tell whether every file left in ``folder`` equals its copy in the processed folder."""
        kept = Path(str(details.get("processed_copy", ""))) / self.barcode
        if not details.get("processed_copy") or not kept.is_dir():
            return False
        with os.scandir(folder) as scan:
            for entry in scan:
                copy = kept / entry.name
                if not entry.is_file(follow_symlinks=False) or copy.is_symlink():
                    return False
                if not copy.is_file() or not filecmp.cmp(entry.path, copy, shallow=False):
                    return False
        logger.info("%s: finishing the deletion of %s, interrupted earlier", self.barcode, folder)
        return True


class BarcodeBatchParameter(BarcodeParameter):
    """A barcode; for a batch the scheduler made, several barcodes joined by commas."""

    def normalize(self, x: Any) -> str:
        return ",".join(validate(part) for part in str(x).split(","))


class InAlmaSet(MarkerTask):
    """Add the barcode to the Digifeeds set in Alma.

    Batchable: the scheduler gives one worker every InAlmaSet pending at once, up to
    ``[alma] batch_size``, as one task whose ``barcode`` lists them all, and they go
    to Alma in one call. Each barcode still gets the marker it would get alone. A
    barcode Alma does not know fails the batch in Luigi's eyes; the others are
    recorded as added, and ``digifeeds run`` takes them on within the same run.
    """

    barcode = BarcodeBatchParameter(
        description="The item's barcode (14 digits); a batch lists several, comma-separated.",
        batch_method=",".join,
    )
    status = Status.ADDED_TO_DIGIFEEDS_SET

    @property
    def max_batch_size(self) -> int:  # type: ignore[override]
        return min(config.alma().batch_size, MAX_MEMBERS_PER_CALL)

    @property
    def barcodes(self) -> list[str]:
        return self.barcode.split(",")

    def output(self) -> list[MarkerTarget]:  # type: ignore[override]
        return [MarkerTarget(context.markers(), b, self.status) for b in self.barcodes]

    def requires(self) -> list[ZipVolume]:
        return [ZipVolume(barcode=b) for b in self.barcodes]

    def run(self) -> None:
        # After a refused key, set or quota, the rest of the run leaves Alma alone.
        stop = context.alma_stop_file()
        if stop.exists():
            raise AlmaStoppedError(
                f"left for the next run: Alma calls were stopped ({stop.read_text()})",
                barcode=self.barcode,
            )
        self._settled.clear()
        client = context.alma()
        result, failed = AddResult(), {}
        try:
            failed = add_alone_where_needed(client, self.barcodes, result)
        except (AlmaConfigurationError, AlmaQuotaError) as exc:
            stop.write_text(str(exc))
            raise
        finally:
            if client.remaining is not None:
                context.alma_remaining_file().write_text(str(client.remaining))

        markers = context.markers()
        for barcode in result.added + result.already_in_set:
            already = barcode in result.already_in_set
            logger.info(
                "%s: %s the Digifeeds set", barcode, "already in" if already else "added to"
            )
            markers.record(barcode, self.status, already_in_set=already)
            self._settled.add(barcode)
        for barcode in result.not_found:
            markers.record(barcode, Status.NOT_FOUND_IN_ALMA)
            failed[barcode] = BarcodeNotInAlmaError("not found in Alma (60120)", barcode=barcode)
        if not failed:
            return
        for barcode, error in failed.items():
            logger.error("%s: InAlmaSet failed: %s", barcode, error)
            record_failure(barcode, self.task_family, error)
            self._settled.add(barcode)
        taken = result.added + result.already_in_set
        if taken:
            # Luigi fails the whole batch; the run goes on with these ones.
            with context.alma_retry_file().open("a") as retry:
                retry.write("".join(f"{b}\n" for b in taken))
        if len(failed) == 1:
            raise next(iter(failed.values()))
        raise AlmaError(
            f"{len(failed)} of {len(self.barcodes)} barcodes failed in Alma: "
            + ", ".join(sorted(failed))
        )

    @functools.cached_property
    def _settled(self) -> set[str]:
        """Barcodes whose outcome run() recorded: added, or failed with their own cause."""
        return set()

    def on_success(self) -> None:
        families = {self.task_family, ZipVolume.task_family}
        for barcode in self.barcodes:
            context.markers().clear_failure(barcode, families)

    def on_failure(self, exception: BaseException) -> str:
        """Record the failure of each barcode not yet recorded; the UI shows one message."""
        if isinstance(exception, AlmaStoppedError):
            logger.warning("%s: %s", self.barcode, exception.message)
        else:
            for barcode in self.barcodes:
                if barcode not in self._settled:
                    logger.error("%s: InAlmaSet failed: %s", barcode, exception)
                    record_failure(barcode, self.task_family, exception)
        if isinstance(exception, DigifeedsError):
            return str(exception)
        return f"{type(exception).__name__}: {exception}"


def add_alone_where_needed(
    client: AlmaClient, barcodes: list[str], result: AddResult
) -> dict[str, AlmaError]:
    """Add ``barcodes`` to the set, each ending as it would alone; return those that failed.

    A call that fails for a reason Alma does not pin on one barcode (a server error,
    a dropped connection) is split in halves and each half tried again, down to
    single barcodes: a barcode that breaks every call it is in fails alone, and the
    others go in with a few more calls. A refused key, set or quota is raised.
    """
    try:
        answer = client.add_members(barcodes)
    except (AlmaConfigurationError, AlmaQuotaError):
        raise
    except AlmaError as exc:
        if len(barcodes) == 1:
            return {barcodes[0]: exc}
        logger.warning(
            "an Alma call for %d barcodes failed (%s); trying them in halves",
            len(barcodes),
            exc,
        )
        middle = len(barcodes) // 2
        failed = add_alone_where_needed(client, barcodes[:middle], result)
        failed.update(add_alone_where_needed(client, barcodes[middle:], result))
        return failed
    result.added.extend(answer.added)
    result.already_in_set.extend(answer.already_in_set)
    result.not_found.extend(answer.not_found)
    return {}


class ZephirRecord(luigi.ExternalTask):
    """Zephir's record ``mdp.<barcode>``; until it appears, the chain waits."""

    barcode = BarcodeParameter(description="The item's barcode (14 digits).")

    def complete(self) -> bool:
        # A record, once found, stays: the answer is kept on the task, which the
        # workers forked after scheduling inherit.
        if getattr(self, "_found", False):
            return True
        if context.markers().exists(self.barcode, Status.IN_ZEPHIR):
            return True
        try:
            found = context.zephir().has_record(self.barcode)
        except ZephirError as exc:
            # Luigi reports a failed check only as a missing dependency: record it here.
            logger.error("%s: cannot check Zephir: %s", self.barcode, exc)
            record_failure(self.barcode, self.task_family, exc)
            raise
        if not found:
            logger.info("%s: not in Zephir yet; waiting", self.barcode)
            # Zephir answered: a failure to ask it is over, and the item waits on it.
            # (Where Zephir has the record, InZephir's success clears it.)
            context.markers().clear_failure(self.barcode, [self.task_family])
        self._found = found
        return found


class InZephir(MarkerTask):
    """Record the first time the barcode was seen in Zephir."""

    status = Status.IN_ZEPHIR

    def requires(self) -> list[luigi.Task]:
        return [InAlmaSet(barcode=self.barcode), ZephirRecord(barcode=self.barcode)]

    def run(self) -> None:
        self.record()


def hold_over(in_zephir_at: dt.datetime, hold_days: float, now: dt.datetime) -> bool:
    """Tell whether an item first seen in Zephir at ``in_zephir_at`` is out of its hold."""
    return now - in_zephir_at >= dt.timedelta(days=hold_days)


class HoldOver(luigi.ExternalTask):
    """The end of the hold: the item has been in Zephir for the hold period.

    The hold is part of the task's identity: luigid remembers a task it saw done for
    a few seconds and takes no other word on it meanwhile, so a run with a longer
    hold right after one with none must not meet the same task.
    """

    barcode = BarcodeParameter(description="The item's barcode (14 digits).")
    hold_days = luigi.FloatParameter(
        description="Days in Zephir before delivery ([digifeeds] hold_days)."
    )

    def complete(self) -> bool:
        hold_days = self.hold_days
        if hold_days <= 0:
            # No hold: over as soon as InZephir, which ReadyForPickup also requires, is done.
            return True
        marker = context.markers().read(self.barcode, Status.IN_ZEPHIR)
        if marker is None:
            return False
        over = hold_over(marker.timestamp, hold_days, utc_now())
        if not over:
            logger.info("%s: in Zephir since %s; holding", self.barcode, marker.timestamp)
        return over


class ReadyForPickup(MarkerTask):
    """Record that the item has been in Zephir for the hold period."""

    status = Status.READY_FOR_PICKUP

    def requires(self) -> list[luigi.Task]:
        hold = HoldOver(barcode=self.barcode, hold_days=config.digifeeds().hold_days)
        return [InZephir(barcode=self.barcode), hold]

    def run(self) -> None:
        self.record(hold_days=config.digifeeds().hold_days)


class Delivered(MarkerTask):
    """Copy the zip to the SFTP pickup, then move it to the processed prefix in S3.

    What goes to the pickup is checked against the zip that was made (its size and
    MD5, kept in the ``zipped`` marker) before it gets its final name there, and the
    ``copying_end`` marker keeps the ETag of the object delivered. The move is a copy
    of exactly that object to the processed prefix, checked, the ``pending_deletion``
    marker, then the deletion of the input copy; the task is done once both are
    behind it. Until then the zip stays in the input prefix, where the next run
    finds it, so a crash at any point is finished by the next run, and a zip that
    is not the one delivered is never moved or deleted.
    """

    status = Status.PENDING_DELETION

    def requires(self) -> ReadyForPickup:
        return ReadyForPickup(barcode=self.barcode)

    def complete(self) -> bool:
        # Done once pending_deletion is recorded and the input prefix no longer holds
        # the zip (asked only of items that reached pending_deletion).
        if not super().complete():
            return False
        return getattr(self, "_input_deleted", False) or not context.storage().exists(
            zip_key(self.barcode)
        )

    def run(self) -> None:
        markers = context.markers()
        storage = context.storage()
        source, destination = zip_key(self.barcode), processed_key(self.barcode)

        if markers.known(self.barcode, Status.PENDING_DELETION):
            # An earlier run delivered and kept the processed copy, then stopped short
            # of deleting the input copy: check the copy again before deleting.
            logger.info("%s: finishing the move of a zip delivered earlier", self.barcode)
            self.keep_processed_copy(source, destination, self.delivered_etag())
        else:
            etag, size = self.deliver(source, destination)
            _crash_point("delivered", self.barcode)
            # Keep the processed copy, checked, before the input copy goes.
            self.keep_processed_copy(source, destination, etag, size)
            self.record()
            _crash_point("moving", self.barcode)
        storage.delete(source)
        self._input_deleted = True
        logger.info("%s: moved the zip to %s", self.barcode, storage.url(destination))

    def keep_processed_copy(
        self, source: str, destination: str, etag: str, size: int | None = None
    ) -> None:
        """Copy the zip delivered (the object of ``etag``) to the processed prefix."""
        try:
            context.storage().copy_checked(source, destination, etag=etag, size=size)
        except ObjectChangedError as exc:
            raise ObjectChangedError(
                f"{exc.message}: the input prefix holds a zip that is not the one delivered "
                "to the pickup, so it is neither delivered nor moved; a person must look",
                barcode=self.barcode,
            ) from exc

    def delivered_etag(self) -> str:
        """The ETag of the object delivered, as the ``copying_end`` marker keeps it."""
        ended = context.markers().read(self.barcode, Status.COPYING_END)
        etag = ended.details.get("etag") if ended else None
        if not etag:
            raise StorageError(
                "the copying_end marker, which names the zip delivered to the pickup, is "
                "missing or does not name it, so the zip in the input prefix is neither "
                "delivered again nor moved; a person must look",
                barcode=self.barcode,
            )
        return str(etag)

    def deliver(self, source: str, destination: str) -> tuple[str, int | None]:
        """Copy the zip to the pickup, unless an earlier run finished the copy.

        Returns the ETag of the object delivered, and its size when it was read now.
        """
        markers = context.markers()
        started, first = markers.record_new(self.barcode, Status.COPYING_START)
        resumed = not first
        # A copy that starts now cannot have ended before.
        if resumed and markers.exists(self.barcode, Status.COPYING_END):
            return self.delivered_etag(), None
        if resumed:
            logger.warning(
                "%s: resuming a copy to the pickup that started at %s and did not end; "
                "if the pickup collected a complete earlier copy, it gets this one too",
                self.barcode,
                started.timestamp.isoformat(),
            )
        read = self.copy_to_pickup(source, destination, resumed=resumed)
        self.record(Status.COPYING_END, key=read.key, etag=read.etag)
        return read.etag, read.size

    def copy_to_pickup(self, source: str, destination: str, *, resumed: bool) -> StoredObject:
        """Stream the zip from S3 to the pickup server; return the object that was read.

        The zip is read from the input prefix, or from the processed prefix where
        someone moved it there by hand. It must be the zip that was made: its size is
        compared before, and its MD5 after the upload, before the file gets its final
        name. A file already at the final name is taken as this zip only when
        resuming an attempt of our own; otherwise it is someone else's, and a person
        must look.
        """
        storage = context.storage()
        made = context.markers().read(self.barcode, Status.ZIPPED)
        size = made.details.get("zip_size") if made else None
        md5 = made.details.get("zip_md5") if made else None
        if not isinstance(size, int) or not isinstance(md5, str):
            raise ZipError(
                "the zipped marker does not give the size and MD5 of the zip made, so "
                "what is in S3 cannot be checked; it is not delivered",
                barcode=self.barcode,
            )
        with storage.open(source, destination) as stored:
            where = storage.url(stored.key)
            if stored.size != size:
                raise ObjectChangedError(
                    f"{where} holds {stored.size} bytes, but the zip made held {size}; "
                    "it is not delivered, and a person must look",
                    barcode=self.barcode,
                )
            reading = _Digesting(stored.body)

            def check() -> None:
                if reading.md5.hexdigest() != md5:
                    raise ObjectChangedError(
                        f"the MD5 of {where} is {reading.md5.hexdigest()}, but the zip made "
                        f"had {md5}; it is not delivered, and a person must look",
                        barcode=self.barcode,
                    )

            context.pickup().deliver(
                reading,
                stored.size,
                self.barcode,
                progress=Progress(self, f"copying {where}"),
                existing_ok=resumed,
                check=check,
            )
        logger.info("%s: delivered to the pickup", self.barcode)
        return stored


class _Digesting:
    """A stream that keeps the MD5 of what was read from it."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.md5 = hashlib.md5(usedforsecurity=False)

    def read(self, size: int, /) -> bytes:
        data: bytes = self.body.read(size)
        self.md5.update(data)
        return data
