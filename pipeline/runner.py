"""One run, as cron starts it: discover barcodes, build them in batches, summarise, report."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import fcntl
import functools
import logging
import logging.handlers
import multiprocessing
import multiprocessing.queues
import os
import queue
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import IO, Any

import luigi
import luigi.configuration
import luigi.execution_summary
import luigi.rpc
import luigi.scheduler
import luigi.worker
from luigi.execution_summary import LuigiStatusCode
from luigi.rpc import RPCError

from pipeline import config, context, metrics
from pipeline.barcodes import is_valid
from pipeline.errors import (
    BuilderError,
    ConfigurationError,
    DigifeedsError,
    SchedulerError,
    StorageError,
)
from pipeline.report import Item, Report
from pipeline.status import Status
from pipeline.tasks import Delivered, ZipVolume, volume_folder
from targets.markers import Journal, Listing

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIGURATION = 2
EXIT_LOCKED = 3

_FAILED_RUNS = {
    LuigiStatusCode.FAILED,
    LuigiStatusCode.FAILED_AND_SCHEDULING_FAILED,
    LuigiStatusCode.SCHEDULING_FAILED,
}


class DigifeedsBatch(luigi.WrapperTask):
    """A bounded group of barcodes, each built to ``goal``: Delivered or only ZipVolume."""

    barcodes = luigi.ListParameter(description="The barcodes of this batch.")
    goal = luigi.ChoiceParameter(
        default="Delivered",
        choices=("Delivered", "ZipVolume"),
        description="How far to take each barcode.",
    )

    def requires(self) -> list[luigi.Task]:
        if self.goal == "ZipVolume":
            return [ZipVolume(barcode=b) for b in self.barcodes]
        required: list[luigi.Task] = []
        for barcode in self.barcodes:
            required.append(Delivered(barcode=barcode))
            # A folder that is here again after its barcode went on (a rescan, say)
            # is ZipVolume's to retire or refuse, even when Delivered is long done.
            folder = volume_folder(barcode)
            if folder is not None and folder.exists():
                required.append(ZipVolume(barcode=barcode))
        return required


class DigifeedsRun(luigi.WrapperTask):
    """Every barcode this host can work on, in batches of ``[digifeeds] batch_size``.

    Scheduling all batches in one build is convenient by hand; cron's
    ``digifeeds run`` builds one batch at a time, which stays linear in the number
    of barcodes.
    """

    def requires(self) -> list[DigifeedsBatch]:
        cfg = config.digifeeds()
        found = discover(cfg.host_role)
        goal = "ZipVolume" if cfg.host_role == "zip" else "Delivered"
        return [
            DigifeedsBatch(barcodes=batch, goal=goal)
            for batch in batches(found.barcodes, cfg.batch_size)
        ]


@dataclasses.dataclass
class Discovery:
    """What a run found to work on, and what it found and refused."""

    barcodes: list[str]
    rejected: dict[str, str] = dataclasses.field(default_factory=dict)
    # The barcodes found by their folder in the input folder, and by their zip in the
    # S3 input prefix.
    folders: set[str] = dataclasses.field(default_factory=set)
    zips: set[str] = dataclasses.field(default_factory=set)


def discover(role: str) -> Discovery:
    """Find the barcodes this host works on: every one not yet delivered.

    The zipping host: every folder in the input folder. The workflow host: every zip
    in the S3 input prefix, which holds each zip until its delivery has ended (its
    ``pending_deletion`` recorded), and no longer. Delivered items are not looked
    at, so a run costs what is in flight, not the whole history.
    Names that are not barcodes are refused and left where they are.
    """
    folders: set[str] = set()
    rejected: dict[str, str] = {}
    cfg = config.digifeeds()
    if role in ("zip", "all") and cfg.input_folder:
        for entry in sorted(Path(cfg.input_folder).iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_symlink() or not entry.is_dir():
                rejected[entry.name] = "not a volume folder (a plain file or a link)"
            elif not is_valid(entry.name):
                rejected[entry.name] = "folder name is not a barcode (14 digits starting 39015)"
            else:
                folders.add(entry.name)
    in_s3: set[str] = set()
    if role in ("workflow", "all"):
        in_s3, refused = zips_in_input_prefix()
        rejected.update(refused)
    for name, reason in rejected.items():
        logger.error("%s: refused: %s", name, reason)
    return Discovery(sorted(folders | in_s3), rejected, folders, in_s3)


def zips_in_input_prefix() -> tuple[set[str], dict[str, str]]:
    """The barcodes of the zips in the S3 input prefix, and the keys that are not zips.

    One listing request per thousand objects.
    """
    barcodes: set[str] = set()
    refused: dict[str, str] = {}
    prefix = config.s3().input_prefix
    for item in context.storage().list(prefix):
        name = item["Key"][len(prefix) :]
        barcode = name.removesuffix(".zip")
        if name.endswith(".zip") and is_valid(barcode):
            barcodes.add(barcode)
        else:
            refused[item["Key"]] = "not a <barcode>.zip in the input prefix"
    return barcodes, refused


def warn_of_unmarked_zips(found: Discovery, listing: Listing) -> None:
    """Name each zip in the input prefix that no zipped marker, and no folder here, explains."""
    zipped = listing.barcodes_with(Status.ZIPPED)
    for barcode in sorted(found.zips - set(zipped) - found.folders):
        logger.warning(
            "%s: its zip is in the input prefix but has no zipped marker; "
            "it waits until the zipping host records it",
            barcode,
        )


def batches(barcodes: Sequence[str], size: int) -> Iterator[list[str]]:
    """Split barcodes into lists of at most ``size``."""
    for start in range(0, len(barcodes), max(1, size)):
        yield list(barcodes[start : start + size])


@dataclasses.dataclass
class RunResult:
    """What a run did, for its summary, its metrics and its exit code."""

    role: str
    barcodes: list[str]
    rejected: dict[str, str]
    started: float
    finished: float
    luigi_failed: bool
    report: Report
    alma_remaining: int | None = None
    held_batches: int = 0
    lost_batches: int = 0
    markers_unread: str = ""

    def _since_start(self, when: dt.datetime) -> bool:
        return when.timestamp() >= self.started - 1

    @property
    def delivered(self) -> list[str]:
        return [
            b
            for b in self.barcodes
            if (t := self.report.items.get(b))
            and Status.PENDING_DELETION in t.reached
            and self._since_start(t.reached[Status.PENDING_DELETION])
        ]

    @property
    def zipped(self) -> list[str]:
        return [
            b
            for b in self.barcodes
            if (t := self.report.items.get(b))
            and Status.ZIPPED in t.reached
            and self._since_start(t.reached[Status.ZIPPED])
        ]

    @property
    def failures(self) -> dict[str, str]:
        """This run's failures: barcode (or refused name) to kind."""
        failed = {
            f.barcode: f.kind
            for f in self.report.failures(self.barcodes)
            if self._since_start(f.timestamp)
        }
        failed.update({name: "refused" for name in self.rejected})
        return failed

    @functools.cached_property
    def unfinished(self) -> list[str]:
        """This run's barcodes left neither done, waiting nor failed by it.

        Their tasks were another worker's (another host's, or a killed run's that
        luigid has not let go of yet), or an earlier failure stands untried.
        """
        failed = self.failures
        return [
            barcode
            for barcode in self.barcodes
            if barcode not in failed
            and (item := self.report.items.get(barcode) or Item(barcode)).waiting_on is None
            and item.current is not Status.PENDING_DELETION
        ]

    def waiting(self) -> dict[str, dict[str, dt.timedelta]]:
        return {
            on: self.report.waiting(on, barcodes=self.barcodes)
            for on in ("zip", "alma", "zephir", "hold")
        }

    @property
    def succeeded(self) -> bool:
        return not self.failures and not self.luigi_failed and not self.markers_unread

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.succeeded else EXIT_FAILED

    def summary(self) -> str:
        """One line an operator reads in cron mail."""
        waiting = {on: len(ages) for on, ages in self.waiting().items() if ages}
        kinds = collections.Counter(self.failures.values())
        parts = [
            f"{self.role} run: {len(self.barcodes)} barcodes",
            f"{len(self.zipped)} zipped",
            f"{len(self.delivered)} delivered",
            "waiting: " + (", ".join(f"{n} on {on}" for on, n in waiting.items()) or "none"),
            "failed: " + (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"),
            f"in {self.finished - self.started:.1f}s",
        ]
        if self.unfinished:
            parts.insert(-1, f"{len(self.unfinished)} unfinished")
        if self.held_batches:
            parts.insert(-1, f"{self.held_batches} batches held by other workers")
        if self.lost_batches:
            parts.insert(-1, f"{self.lost_batches} batches stopped when their builder died")
        if self.markers_unread:
            parts.insert(-1, "markers unreadable, counts unknown")
        return "; ".join(parts)

    def figures(self) -> metrics.RunFigures:
        waiting = self.waiting()
        oldest = {
            on: max((age.total_seconds() for age in ages.values()), default=0.0)
            for on, ages in waiting.items()
        }
        return metrics.RunFigures(
            role=self.role,
            started=self.started,
            finished=self.finished,
            succeeded=self.succeeded,
            by_status=self.report.counts(self.barcodes),
            delivered=len(self.delivered),
            zipped=len(self.zipped),
            failures_by_kind=collections.Counter(self.failures.values()),
            waiting={on: len(ages) for on, ages in waiting.items()},
            unfinished=len(self.unfinished),
            oldest_waiting_seconds=oldest,
            alma_remaining=self.alma_remaining,
        )


# The statuses whose markers decide whether the tasks of a chain are complete.
CHECKED = (
    Status.ZIPPED,
    Status.ADDED_TO_DIGIFEEDS_SET,
    Status.IN_ZEPHIR,
    Status.READY_FOR_PICKUP,
    Status.PENDING_DELETION,
)


class ListingWorker(luigi.worker.Worker):
    """A Luigi worker that stops trusting the batch listing once tasks start running."""

    def run(self) -> bool:
        context.markers().end_listing()
        return bool(super().run())


class WorkerFactory:
    """Builds the schedulers and the :class:`ListingWorker` that ``luigi.build`` uses."""

    def create_local_scheduler(self) -> luigi.scheduler.Scheduler:
        return luigi.scheduler.Scheduler(prune_on_get_work=True, record_task_history=False)

    def create_remote_scheduler(self, url: str) -> luigi.rpc.RemoteScheduler:
        return luigi.rpc.RemoteScheduler(url)

    def create_worker(
        self, scheduler: luigi.scheduler.Scheduler, worker_processes: int, assistant: bool = False
    ) -> ListingWorker:
        return ListingWorker(
            scheduler=scheduler, worker_processes=worker_processes, assistant=assistant
        )


def build(
    barcodes: list[str], goal: str, *, listing: Listing, local_scheduler: bool
) -> luigi.execution_summary.LuigiRunResult:
    """Build one batch in this process: schedule it against ``listing``, then run it.

    Scheduling checks every task of every chain; the run's listing answers those
    checks without a request each. The listing is dropped before any task runs, so a
    task never takes a stale "not done" for an answer.
    """
    context.markers().use_listing(listing)
    try:
        return luigi.build(
            [DigifeedsBatch(barcodes=barcodes, goal=goal)],
            worker_scheduler_factory=WorkerFactory(),
            workers=1,
            local_scheduler=local_scheduler,
            detailed_summary=True,
        )
    except RPCError as exc:
        url = luigi.configuration.get_config().get("core", "default_scheduler_url", "")
        raise SchedulerError(f"cannot reach the central scheduler {url}: {exc}") from exc
    finally:
        context.markers().end_listing()


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of a run, as a builder takes it."""

    number: int
    barcodes: list[str]
    goal: str
    local_scheduler: bool


@dataclasses.dataclass(frozen=True)
class BatchOutcome:
    """How a batch ended: Luigi's status, or None when Alma's stop left it alone.

    ``journal`` holds what the batch recorded, for the run's summary.
    """

    number: int
    status: LuigiStatusCode | None
    builder_died: bool = False
    journal: Journal = dataclasses.field(default_factory=Journal)


# What a builder process needs besides its batches: the run's listing of the markers.
_builder_listing: Listing | None = None


def start_builder(
    listing: Listing, log_queue: multiprocessing.queues.Queue[logging.LogRecord] | None
) -> None:
    """Prepare this process to build batches: keep the listing; log through the queue.

    A forked builder sends its log records to the run's process, which writes them
    with its own handlers (a rotating file is safe with one writer only).
    """
    global _builder_listing
    _builder_listing = listing
    if log_queue is not None:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(logging.handlers.QueueHandler(log_queue))


def build_batch(batch: Batch) -> BatchOutcome:
    """Build one batch to its goal, then go on with what Alma took in a failed call."""
    if _builder_listing is None:
        raise RuntimeError("build_batch() before start_builder()")
    goal = batch.goal
    if goal == "Delivered" and context.alma_stop_file().exists():
        # Alma refused us: the other barcodes are only zipped, or left alone.
        if config.digifeeds().host_role == "workflow":
            return BatchOutcome(batch.number, None, journal=context.markers().take_journal())
        goal = "ZipVolume"
    logger.info("batch %d: %d barcodes", batch.number, len(batch.barcodes))
    result = build(
        batch.barcodes, goal, listing=_builder_listing, local_scheduler=batch.local_scheduler
    )
    taken = read_alma_retry()
    if taken:
        # Alma took these in a call that failed for another barcode; Luigi failed
        # them all with it. Take them on now, as they would have gone alone.
        logger.info("batch %d: going on with %d barcodes Alma took", batch.number, len(taken))
        result = build(taken, goal, listing=_builder_listing, local_scheduler=batch.local_scheduler)
    logger.info("batch %d: %s", batch.number, result.status.name)
    return BatchOutcome(batch.number, result.status, journal=context.markers().take_journal())


def build_all(batches: list[Batch], workers: int, listing: Listing) -> list[BatchOutcome]:
    """Build every batch: in this process, or in ``workers`` builder processes at once.

    Each builder is one long-lived process that takes batch after batch from a queue
    and runs their tasks itself, so its S3, SFTP and HTTP connections serve every
    task it runs. A builder that dies fails the batch it was building; the others go
    on. An error that stops a builder (luigid out of reach, say) stops the run: the
    batches not yet taken are left, and the error is raised once the builders stop.
    """
    if workers <= 1 or len(batches) <= 1:
        start_builder(listing, None)
        return [_logged(build_batch(batch), len(batches)) for batch in batches]
    fork = multiprocessing.get_context("fork")
    todo: multiprocessing.queues.Queue[Batch | None] = fork.Queue()
    told: multiprocessing.queues.Queue[tuple[str, int, Any]] = fork.Queue()
    log_queue: multiprocessing.queues.Queue[logging.LogRecord] = fork.Queue()
    stop = fork.Event()
    for batch in batches:
        todo.put(batch)
    builders = [
        fork.Process(
            target=_builder,
            args=(todo, told, stop, listing, log_queue),
            name=f"digifeeds-builder-{number}",
            daemon=True,
        )
        for number in range(1, min(workers, len(batches)) + 1)
    ]
    for builder in builders:
        todo.put(None)  # one "no more" for each builder
        builder.start()
    # The listener's thread starts after the forks, so that none copies a held lock.
    listener = logging.handlers.QueueListener(
        log_queue, *logging.getLogger().handlers, respect_handler_level=True
    )
    listener.start()
    outcomes: dict[int, BatchOutcome] = {}
    by_number = {batch.number: batch for batch in batches}
    building: dict[int, int] = {}
    stopped: list[str] = []
    try:
        running = {builder.pid or 0: builder for builder in builders}
        while running:
            try:
                what, pid, value = told.get(timeout=1.0)
            except queue.Empty:
                for gone, builder in list(running.items()):
                    if builder.is_alive():
                        continue
                    del running[gone]
                    if gone in building:
                        number = building.pop(gone)
                        logger.error(
                            "batch %d: its builder (pid %s) died (exit code %s); "
                            "its unfinished tasks are left for the next run",
                            number,
                            gone,
                            builder.exitcode,
                        )
                        died = BatchOutcome(
                            number,
                            LuigiStatusCode.FAILED,
                            builder_died=True,
                            journal=read_back(by_number[number].barcodes),
                        )
                        outcomes[number] = _logged(died, len(batches))
                continue
            if what == "started":
                building[pid] = value
            elif what == "built":
                building.pop(pid, None)
                outcomes[value.number] = _logged(value, len(batches))
            elif what == "stopped":
                building.pop(pid, None)
                stopped.append(value)
                stop.set()
    finally:
        for builder in builders:
            builder.join()
        listener.stop()
    if stopped:
        left = len(batches) - len(outcomes)
        raise BuilderError(f"{stopped[0]} ({left} batches left for the next run)")
    return [outcomes[number] for number in sorted(outcomes)]


def _builder(
    todo: multiprocessing.queues.Queue[Batch | None],
    told: multiprocessing.queues.Queue[tuple[str, int, Any]],
    stop: EventType,
    listing: Listing,
    log_queue: multiprocessing.queues.Queue[logging.LogRecord],
) -> None:
    """A builder process: build batches from ``todo`` until there are no more, or a stop."""
    start_builder(listing, log_queue)
    pid = os.getpid()
    while not stop.is_set() and (batch := todo.get()) is not None:
        told.put(("started", pid, batch.number))
        try:
            told.put(("built", pid, build_batch(batch)))
        except DigifeedsError as exc:
            told.put(("stopped", pid, str(exc)))
            return


def read_back(barcodes: list[str]) -> Journal:
    """Read from the markers what a batch recorded, when its builder died before telling."""
    markers = context.markers()
    try:
        listing = markers.list_barcodes(barcodes)
        journal = Journal({status: dict(found) for status, found in listing.reached.items()})
        for barcode in barcodes:
            journal.failures[barcode] = (
                markers.failure(barcode) if barcode in listing.failed else None
            )
    except StorageError as exc:
        logger.error("cannot read what the batch recorded: %s", exc)
        return Journal()
    return journal


def _logged(outcome: BatchOutcome, total: int) -> BatchOutcome:
    status = outcome.status.name if outcome.status else "left alone: Alma calls stopped"
    logger.info("batch %d of %d: %s", outcome.number, total, status)
    return outcome


class RunLocked(Exception):
    """Another run on this host holds the lock."""


def lock_path() -> Path:
    """The lock file of this host's runs."""
    cfg = config.digifeeds()
    if cfg.lock_file:
        return Path(cfg.lock_file)
    base = cfg.working_folder or tempfile.gettempdir()
    return Path(base) / "digifeeds.lock"


def acquire_lock(path: Path) -> IO[str]:
    """Take the run lock, or raise RunLocked naming the process that holds it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
    except OSError as exc:
        raise ConfigurationError(f"cannot open the lock file {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunLocked(f"another digifeeds run holds {path} (pid {holder})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def run(*, local_scheduler: bool = False) -> RunResult:
    """Discover, read the markers of what was found, build every batch, summarise.

    The markers are listed once, for the barcodes found; the summary is that
    listing with what the builders recorded on top.

    Raises RunLocked when another run holds this host's lock.
    """
    config.check()
    cfg = config.digifeeds()
    role = cfg.host_role
    handle = acquire_lock(lock_path())
    try:
        started = time.time()
        run_folder = Path(tempfile.mkdtemp(prefix="digifeeds-run-"))
        os.environ[context.RUN_FOLDER_VARIABLE] = str(run_folder)
        markers = context.markers()
        found = discover(role)
        listing = markers.list_barcodes(found.barcodes)
        warn_of_unmarked_zips(found, listing)
        logger.info(
            "%s run: %d barcodes to work on (%d marker listing requests)",
            role,
            len(found.barcodes),
            listing.requests,
        )
        goal = "ZipVolume" if role == "zip" else "Delivered"
        # Logging is the command's, configured before the run; Luigi leaves it alone.
        luigi.configuration.get_config().set("core", "no_configure_logging", "true")
        jobs = [
            Batch(number, batch, goal, local_scheduler)
            for number, batch in enumerate(batches(found.barcodes, cfg.batch_size), start=1)
        ]
        outcomes = build_all(jobs, cfg.workers, listing)
        luigi_failed = any(o.status in _FAILED_RUNS for o in outcomes)
        held = sum(1 for o in outcomes if o.status is LuigiStatusCode.NOT_RUN)
        if held:
            logger.warning(
                "%d batches: some tasks are held by another worker (another host, or a "
                "run that was killed and that luigid still counts as running); "
                "they are left for the next run",
                held,
            )
        if context.alma_stop_file().exists():
            left = sum(1 for o in outcomes if o.status is None)
            logger.error(
                "Alma calls stopped for the rest of this run (%d batches left for the next "
                "run): %s",
                left,
                context.alma_stop_file().read_text(),
            )
        journal = markers.take_journal()
        for outcome in outcomes:
            journal.add(outcome.journal)
        try:
            report = Report.from_listing(listing, markers, journal=journal)
            unread = ""
        except StorageError as exc:
            logger.error("cannot read the markers for the summary: %s", exc)
            report, unread = Report({}, dt.datetime.now(dt.UTC)), str(exc)
        result = RunResult(
            role=role,
            barcodes=found.barcodes,
            rejected=found.rejected,
            started=started,
            finished=time.time(),
            luigi_failed=luigi_failed,
            report=report,
            alma_remaining=read_alma_remaining(),
            held_batches=held,
            lost_batches=sum(1 for o in outcomes if o.builder_died),
            markers_unread=unread,
        )
        if result.unfinished and not unread:
            shown = ", ".join(result.unfinished[:10])
            more = len(result.unfinished) - 10
            logger.warning(
                "%d barcodes were left neither done, waiting nor failed: luigid counts "
                "their tasks as another worker's (another host's, or a killed run's, "
                "which it lets go after a few minutes), or an earlier failure of theirs "
                "was not tried again; the next run takes them up: %s%s",
                len(result.unfinished),
                shown,
                f" and {more} more" if more > 0 else "",
            )
        return result
    finally:
        handle.close()
        shutil.rmtree(run_folder, ignore_errors=True)
        os.environ.pop(context.RUN_FOLDER_VARIABLE, None)


def read_alma_retry() -> list[str]:
    """Take the barcodes InAlmaSet asked the run to go on with (and forget them)."""
    path = context.alma_retry_file()
    try:
        taken = sorted(set(path.read_text().split()))
    except OSError:
        return []
    path.unlink()
    return taken


def read_alma_remaining() -> int | None:
    """The last X-Exl-Api-Remaining any worker of this run saw, if any."""
    try:
        return int(context.alma_remaining_file().read_text())
    except (OSError, ValueError):
        return None
