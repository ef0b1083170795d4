"""The ``digifeeds`` command: run (what cron calls), status and report."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import logging.handlers
import sys
from collections.abc import Sequence

import luigi.configuration
import luigi.parameter

from pipeline import config, context, metrics, runner
from pipeline.barcodes import validate
from pipeline.errors import ConfigurationError, DigifeedsError
from pipeline.report import Report

logger = logging.getLogger("pipeline.cli")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(log_file: str | None, verbose: bool) -> None:
    """Log to a rotating file under cron, or to the terminal."""
    level = logging.DEBUG if verbose else logging.INFO
    handler: logging.Handler
    if log_file:
        handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=20 * 1024 * 1024, backupCount=10
        )
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "paramiko"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Luigi's own chatter (scheduling details) only when asked for.
    logging.getLogger("luigi-interface").setLevel(level if verbose else logging.WARNING)


def override(section: str, key: str, value: object) -> None:
    """Set one configuration value for this process and the workers it forks."""
    if value is not None:
        luigi.configuration.get_config().set(section, key, str(value))


def command_run(args: argparse.Namespace) -> int:
    override("digifeeds", "host_role", args.role)
    override("digifeeds", "hold_days", args.hold_days)
    override("digifeeds", "batch_size", args.batch_size)
    override("digifeeds", "workers", args.workers)
    try:
        result = runner.run(local_scheduler=args.local_scheduler)
    except runner.RunLocked as exc:
        logger.error("refused: %s", exc)
        print(f"digifeeds run refused: {exc}", file=sys.stderr)
        return runner.EXIT_LOCKED
    cfg = config.metrics()
    metrics.push(
        result.figures(),
        cfg.pushgateway_url,
        cfg.job,
        instance=cfg.instance,
        timeout=cfg.timeout,
    )
    for barcode, kind in sorted(result.failures.items()):
        failure = result.report.items.get(barcode)
        message = (
            failure.failure.message
            if failure and failure.failure
            else result.rejected.get(barcode, "")
        )
        logger.error("%s: failed (%s): %s", barcode, kind, message)
    if args.log_file:
        logger.info("%s", result.summary())
    print(result.summary())
    return result.exit_code


def command_status(args: argparse.Namespace) -> int:
    barcode = validate(args.barcode)
    markers = context.markers()
    history = markers.history(barcode)
    failure = markers.failure(barcode)
    if args.json:
        print(
            json.dumps(
                {
                    "barcode": barcode,
                    "history": [m.to_json() for m in history],
                    "failure": failure.to_json() if failure else None,
                },
                indent=2,
            )
        )
        return 0
    if not history and not failure:
        print(f"{barcode}: no status recorded")
        return 0
    for marker in history:
        extra = f"  {json.dumps(marker.details, sort_keys=True)}" if marker.details else ""
        print(f"{marker.timestamp.isoformat()}  {marker.status.value}{extra}")
    if failure:
        print(
            f"{failure.timestamp.isoformat()}  FAILED in {failure.task} ({failure.kind}): "
            f"{failure.message}"
        )
    return 0


def command_report(args: argparse.Namespace) -> int:
    report = Report.read(context.markers())
    zips, _ = runner.zips_in_input_prefix()
    data = report.to_json(waiting_days=args.waiting_days, zips=zips)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"Digifeeds report, {data['taken_at']}")
    print("\nBarcodes by current status:")
    for status, count in data["counts"].items():
        print(f"  {status:<24} {count:>7}")
    print(f"\nFailed ({len(data['failed'])}):")
    for failure in data["failed"]:
        print(
            f"  {failure['barcode']}  {failure['task']} ({failure['kind']}): {failure['message']}"
        )
    print(f"\nNot found in Alma ({len(data['not_found_in_alma'])}):")
    for barcode in data["not_found_in_alma"]:
        print(f"  {barcode}")
    for on, waits in data["waiting"].items():
        print(f"\nWaiting on {on} for more than {args.waiting_days:g} days ({len(waits)}):")
        for barcode, days in waits.items():
            print(f"  {barcode}  {days:.1f} days")
    print(
        f"\nOn their way, but their zip is not in the input prefix, so no run finds them "
        f"({len(data['without_zip'])}):"
    )
    for barcode in data["without_zip"]:
        print(f"  {barcode}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="digifeeds",
        description="Send digitized volumes through Alma and Zephir to Google's SFTP pickup.",
    )
    top.add_argument("--log-file", help="Append logs to this rotating file instead of stderr.")
    top.add_argument("-v", "--verbose", action="store_true", help="Log debugging detail.")
    commands = top.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="Work on every barcode this host can (what cron calls).",
        description="Discover barcodes, build their chains in batches, print a summary, "
        "push metrics. Exit 0: done or waiting; 1: a barcode failed; 2: bad "
        "configuration; 3: another run holds the lock.",
    )
    run.add_argument("--role", choices=config.HOST_ROLES, help="Override [digifeeds] host_role.")
    run.add_argument("--hold-days", type=float, help="Override [digifeeds] hold_days.")
    run.add_argument("--batch-size", type=int, help="Override [digifeeds] batch_size.")
    run.add_argument("--workers", type=int, help="Override [digifeeds] workers.")
    run.add_argument(
        "--local-scheduler",
        action="store_true",
        help="Schedule in-process instead of through luigid (no web UI, no cross-host locking).",
    )
    run.set_defaults(handler=command_run)

    status = commands.add_parser("status", help="Show one barcode's history.")
    status.add_argument("barcode")
    status.add_argument("--json", action="store_true", help="Print JSON.")
    status.set_defaults(handler=command_status)

    report = commands.add_parser(
        "report", help="Count barcodes by status; list failures and long waits."
    )
    report.add_argument("--json", action="store_true", help="Print JSON.")
    report.add_argument(
        "--waiting-days",
        type=float,
        default=30.0,
        help="List barcodes waiting on Zephir or the hold for more than this many days.",
    )
    report.set_defaults(handler=command_report)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(args.log_file, args.verbose)
    started = dt.datetime.now(dt.UTC)
    try:
        return int(args.handler(args))
    except ConfigurationError as exc:
        logger.error("configuration error: %s", exc)
        print(f"digifeeds {args.command}: configuration error: {exc}", file=sys.stderr)
        return runner.EXIT_CONFIGURATION
    except (ValueError, luigi.parameter.ParameterException) as exc:
        # A setting Luigi could not parse, met outside config.check().
        logger.error("configuration error: %s", exc)
        print(f"digifeeds {args.command}: configuration error: {exc}", file=sys.stderr)
        return runner.EXIT_CONFIGURATION
    except DigifeedsError as exc:
        logger.error("%s", exc)
        print(f"digifeeds {args.command}: {exc}", file=sys.stderr)
        return runner.EXIT_FAILED
    finally:
        logger.debug("digifeeds %s took %s", args.command, dt.datetime.now(dt.UTC) - started)


if __name__ == "__main__":
    sys.exit(main())
