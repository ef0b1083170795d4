"""Deliver zips to Google's SFTP pickup server, never showing a partial file.

Google picks a file up as soon as it appears under its final name, so a zip is
written under a temporary name in the pickup directory and renamed to
``<barcode>.zip`` only once the server holds every byte. The temporary name is
``.<barcode>.zip.<16 hex digits>.part``: hidden, not ending in ``.zip``, and
recognisable, so a later delivery of the same barcode can remove what a crashed
one left behind.

The server's host key must be pinned in a known_hosts file given to the client;
an unknown or changed key is refused with :class:`~pipeline.errors.HostKeyError`.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Protocol

import paramiko
from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY, CMD_STATUS, CMD_WRITE, int64

from pipeline.barcodes import validate
from pipeline.errors import ConfigurationError, DigifeedsError, HostKeyError, PickupError

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called with (bytes sent so far, total bytes) as an upload goes on."""


class ZipSource(Protocol):
    """Where a zip's bytes come from: an open file, a BytesIO, an S3 body."""

    def read(self, size: int, /) -> bytes:
        """Return up to ``size`` bytes; fewer only at the end."""
        ...


# How much of the source is read at a time.
READ_SIZE = 1024 * 1024

# Every SFTP server must accept writes of 32 KiB. OpenSSH (8.7 and later) announces
# a larger limit through its "limits@openssh.com" extension; larger writes mean
# fewer, cheaper round trips through paramiko, which is where its time goes.
SAFE_WRITE_SIZE = 32 * 1024
MAX_WRITE_SIZE = 255 * 1024

# Write requests kept in flight before waiting for the oldest answer, as OpenSSH's
# sftp does (its -R option).
MAX_REQUESTS_IN_FLIGHT = 64

# AES-GCM encrypts and authenticates in one call into OpenSSL; with paramiko's
# default (AES-CTR plus a separate HMAC) uploads take about half as long again.
# Servers without it fall back to paramiko's usual order.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")

# What paramiko and the socket beneath it raise when the server or network fails.
_NETWORK_ERRORS = (paramiko.SSHException, OSError, EOFError)


class PickupClient:
    """A connection to the SFTP pickup server that delivers zips by barcode.

    Connects on first use and keeps the connection for later deliveries; after a
    network failure the next delivery connects afresh. Use it as a context manager,
    or call :meth:`close`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        directory: str,
        known_hosts: Path,
        *,
        key_file: Path | None = None,
        password: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        if key_file is None and password is None:
            raise ConfigurationError("the pickup server needs a key file or a password")
        self.host = host
        self.port = port
        self.username = username
        self.directory = directory.rstrip("/") or "/"
        self.known_hosts = Path(known_hosts)
        self.key_file = key_file
        self.timeout = timeout
        self.__password = password
        self._ssh: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._write_size = SAFE_WRITE_SIZE

    def __repr__(self) -> str:
        auth = f"key_file={str(self.key_file)!r}" if self.key_file else "password=***"
        return (
            f"PickupClient({self.username}@{self.address}:{self.directory}, "
            f"known_hosts={str(self.known_hosts)!r}, {auth})"
        )

    def __enter__(self) -> PickupClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def address(self) -> str:
        """The server as ``host:port``, as messages name it."""
        return f"{self.host}:{self.port}"

    def final_path(self, barcode: str) -> str:
        """Return the path ``<directory>/<barcode>.zip`` a delivered zip has on the server."""
        return f"{self.directory}/{barcode}.zip"

    def close(self) -> None:
        """Close the connection, if open; the next delivery opens a new one."""
        sftp, ssh = self._sftp, self._ssh
        self._sftp = self._ssh = None
        try:
            if sftp is not None:
                sftp.close()
        except _NETWORK_ERRORS as exc:
            # Closing a connection the server already dropped can fail; it is gone anyway.
            logger.debug("closing the SFTP session to %s: %s", self.address, _describe(exc))
        if ssh is not None:
            ssh.close()

    def deliver_file(
        self,
        path: Path,
        barcode: str,
        *,
        progress: Progress | None = None,
        existing_ok: bool = True,
    ) -> None:
        """Deliver the zip at ``path`` as ``<barcode>.zip``; see :meth:`deliver`."""
        with Path(path).open("rb") as source:
            size = os.fstat(source.fileno()).st_size
            self.deliver(source, size, barcode, progress=progress, existing_ok=existing_ok)

    def deliver(
        self,
        source: ZipSource,
        size: int,
        barcode: str,
        *,
        progress: Progress | None = None,
        existing_ok: bool = True,
        check: Callable[[], None] | None = None,
    ) -> None:
        """Deliver ``size`` bytes read from ``source`` as ``<barcode>.zip``.

        ``check``, when given, is called once every byte is uploaded and before the
        file gets its final name: an error it raises leaves nothing on the pickup.

        With ``existing_ok`` (for resuming a delivery of one's own), a
        ``<barcode>.zip`` already there with exactly ``size`` bytes counts as
        delivered and is left alone; one of any other size is refused with
        :class:`PickupError`, never overwritten. Without it (a first attempt), any
        ``<barcode>.zip`` already there, or appearing during the upload, is refused
        with :class:`PickupError` and left alone, whatever its size. Otherwise the
        bytes go to a temporary name, their size is confirmed, and the file is
        renamed into place. Temporary files of ``barcode`` that an interrupted
        attempt left are removed when resuming (``existing_ok``) only, so that a
        first attempt costs no listing of the pickup directory.
        Raises :class:`~pipeline.errors.InvalidBarcodeError` before connecting for
        a bad barcode, :class:`HostKeyError` for an unpinned or changed host key and
        :class:`PickupError` for every other failure.
        """
        validate(barcode)
        final = self.final_path(barcode)
        temp = f"{self.directory}/.{barcode}.zip.{secrets.token_hex(8)}.part"
        step = "connecting"
        sftp: paramiko.SFTPClient | None = None
        temp_made = False
        try:
            sftp = self._connect(barcode)

            step = f"looking for {final}"
            if self._already_there(sftp, final, size, barcode, existing_ok):
                logger.info("%s: already delivered as %s; nothing to upload", barcode, final)
                if progress is not None:
                    progress(size, size)
                return

            if existing_ok:
                # Only an attempt of our own that was cut short leaves temporary files,
                # and a first attempt has none before it: listing the pickup, which
                # grows with every delivery, is for resuming only.
                step = f"looking in {self.directory} for what an earlier attempt left"
                self._remove_stale(sftp, barcode)

            step = f"uploading {temp}"
            logger.info("%s: uploading %s bytes to %s as %s", barcode, size, self.address, temp)
            temp_made = True
            self._upload(sftp, source, size, temp, barcode, progress)

            step = f"confirming the size of {temp}"
            held = sftp.stat(temp).st_size
            if held != size:
                raise PickupError(
                    f"{self.address} holds {held} of {size} bytes of {temp}", barcode=barcode
                )

            if check is not None:
                step = f"checking what was read for {temp}"
                check()

            step = f"renaming {temp} to {final}"
            if self._already_there(sftp, final, size, barcode, existing_ok):
                logger.info("%s: %s appeared during the upload; keeping it", barcode, final)
                self._remove_quietly(sftp, temp, barcode)
                return
            self._rename(sftp, temp, final)
            temp_made = False
            logger.info("%s: delivered %s bytes as %s on %s", barcode, size, final, self.address)

        except BaseException as exc:
            if temp_made and sftp is not None:
                self._remove_quietly(sftp, temp, barcode)
            if isinstance(exc, DigifeedsError) or not isinstance(exc, _NETWORK_ERRORS):
                raise
            # The connection may be unusable now; the next delivery makes a new one.
            self.close()
            raise PickupError(
                f"{step} on {self.address} failed: {_describe(exc)}", barcode=barcode
            ) from exc

    def _connect(self, barcode: str) -> paramiko.SFTPClient:
        """Return an open SFTP session, connecting and checking the host key if needed."""
        if self._sftp is not None and self._ssh is not None:
            transport = self._ssh.get_transport()
            if transport is not None and transport.is_active():
                return self._sftp
            self.close()

        ssh = paramiko.SSHClient()
        try:
            # Only the pinned file: system and user known_hosts files are never read.
            host_keys = ssh.get_host_keys()
            host_keys.load(str(self.known_hosts))
            # Looking the server up hashes its name with the salt of every hashed
            # entry, so a corrupt salt fails here rather than inside connect().
            host_keys.lookup(self.host if self.port == 22 else f"[{self.host}]:{self.port}")
        except Exception as exc:
            # Besides OSError, paramiko lets whatever its parsers raise escape for a
            # corrupt file: InvalidHostKey (bad base64), UnicodeDecodeError (text or
            # key-type name that is not UTF-8), ValueError (nacl, cryptography,
            # binascii) and OverflowError among them. Each means the file cannot be read.
            ssh.close()
            raise HostKeyError(
                f"cannot read the pinned known_hosts file {self.known_hosts} for "
                f"{self.address}: {_describe(exc)}",
                barcode=barcode,
            ) from exc
        ssh.set_missing_host_key_policy(_PinnedOnly(self.address, self.known_hosts))

        try:
            ssh.connect(
                self.host,
                self.port,
                username=self.username,
                key_filename=str(self.key_file) if self.key_file else None,
                password=self.__password,
                timeout=self.timeout,
                banner_timeout=self.timeout,
                auth_timeout=self.timeout,
                channel_timeout=self.timeout,
                allow_agent=False,
                look_for_keys=False,
                compress=False,
                transport_factory=_fast_transport,
            )
            sftp = ssh.open_sftp()
            channel = sftp.get_channel()
            if channel is not None:
                channel.settimeout(self.timeout)
            self._write_size = _write_size(sftp)
        except HostKeyError as exc:
            ssh.close()
            raise HostKeyError(exc.message, barcode=barcode) from exc
        except paramiko.BadHostKeyException as exc:
            ssh.close()
            raise HostKeyError(
                f"the host key of {self.address} has changed: it offered "
                f"{exc.key.get_name()} {exc.key.fingerprint}, but {self.known_hosts} pins "
                f"{exc.expected_key.get_name()} {exc.expected_key.fingerprint}",
                barcode=barcode,
            ) from exc
        except paramiko.AuthenticationException as exc:
            ssh.close()
            raise PickupError(
                f"{self.address} refused to authenticate {self.username!r}: {_describe(exc)}",
                barcode=barcode,
            ) from exc
        except _NETWORK_ERRORS as exc:
            ssh.close()
            raise PickupError(
                f"connecting to {self.address} failed: {_describe(exc)}", barcode=barcode
            ) from exc

        transport = ssh.get_transport()
        logger.info(
            "connected to %s as %s (cipher %s, writes of %s bytes)",
            self.address,
            self.username,
            transport.local_cipher if transport else "?",
            self._write_size,
        )
        self._ssh, self._sftp = ssh, sftp
        return sftp

    def _already_there(
        self, sftp: paramiko.SFTPClient, final: str, size: int, barcode: str, existing_ok: bool
    ) -> bool:
        """Tell whether ``final`` holds ``size`` bytes; refuse one of another size.

        Unless ``existing_ok``, refuse any ``final`` at all: this delivery did not
        write it, so it cannot be taken as this delivery's.
        """
        try:
            held = sftp.stat(final).st_size
        except FileNotFoundError:
            return False
        if not existing_ok:
            raise PickupError(
                f"a file is already at {final} on {self.address} ({held} bytes) that this "
                "delivery did not write; a person must check it",
                barcode=barcode,
            )
        if held != size:
            raise PickupError(
                f"{final} on {self.address} already exists with {held} bytes, not {size}; "
                "refusing to overwrite it",
                barcode=barcode,
            )
        return True

    def _remove_stale(self, sftp: paramiko.SFTPClient, barcode: str) -> None:
        """Remove temporary files an earlier, interrupted delivery of ``barcode`` left.

        NOTE: two deliveries of the same barcode at once would remove each other's
        temporary files; the pipeline runs one delivery per barcode at a time.
        """
        pattern = re.compile(rf"\.{re.escape(barcode)}\.zip\.[0-9a-f]{{16}}\.part")
        for name in sftp.listdir(self.directory):
            if pattern.fullmatch(name):
                logger.info("%s: removing %s left by an earlier delivery", barcode, name)
                sftp.remove(f"{self.directory}/{name}")

    def _upload(
        self,
        sftp: paramiko.SFTPClient,
        source: ZipSource,
        size: int,
        temp: str,
        barcode: str,
        progress: Progress | None,
    ) -> None:
        """Write ``size`` bytes from ``source`` to the new file ``temp``."""
        write_size = self._write_size
        sent = 0
        with sftp.open(temp, "wx") as remote:
            writer = _PipelinedWriter(sftp, remote, MAX_REQUESTS_IN_FLIGHT)
            while sent < size:
                block = _read(source, min(READ_SIZE, size - sent), barcode)
                if not block:
                    raise PickupError(
                        f"the zip ended after {sent} of {size} bytes", barcode=barcode
                    )
                for start in range(0, len(block), write_size):
                    writer.write(sent + start, block[start : start + write_size])
                sent += len(block)
                if progress is not None:
                    progress(sent, size)
            if _read(source, 1, barcode):
                raise PickupError(f"the zip is longer than {size} bytes", barcode=barcode)
            writer.finish()

    def _rename(self, sftp: paramiko.SFTPClient, temp: str, final: str) -> None:
        """Rename ``temp`` to ``final`` in one step the far side cannot see half-done.

        OpenSSH's "posix-rename@openssh.com" is tried first; a server without it
        gets a plain SFTP rename, which fails rather than replace an existing file.
        """
        try:
            sftp.posix_rename(temp, final)
        except (TimeoutError, ConnectionError):
            raise
        except OSError as exc:
            logger.debug("posix-rename of %s failed (%s); trying rename", temp, exc)
            sftp.rename(temp, final)

    def _remove_quietly(self, sftp: paramiko.SFTPClient, path: str, barcode: str) -> None:
        """Remove ``path`` if the connection still allows it; a failure is only logged."""
        channel = sftp.get_channel()
        if channel is None or channel.closed:
            logger.warning("%s: connection lost; the next delivery will remove %s", barcode, path)
            return
        try:
            sftp.remove(path)
        except _NETWORK_ERRORS as exc:
            logger.warning(
                "%s: could not remove %s (%s); the next delivery will",
                barcode,
                path,
                _describe(exc),
            )


class _PinnedOnly(paramiko.RejectPolicy):
    """Refuse any server whose host key is not in the pinned known_hosts file."""

    def __init__(self, address: str, known_hosts: Path) -> None:
        self.address = address
        self.known_hosts = known_hosts

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise HostKeyError(
            f"the host key of {self.address} ({key.get_name()} {key.fingerprint}) is not "
            f"pinned in {self.known_hosts}; refusing to connect"
        )


class _PipelinedWriter:
    """Keep several SFTP write requests in flight and check the answer to every one.

    NOTE: this talks to paramiko's SFTP internals (``_async_request`` and
    ``_read_response``) because its own pipelined ``SFTPFile.write`` ignores the
    answers to writes still in flight when the file is closed, so a failed write
    there could go unnoticed, and it stops to drain all answers every hundred
    requests. Written and tested against paramiko 5.1: re-check on an upgrade.
    """

    def __init__(self, sftp: paramiko.SFTPClient, remote: paramiko.SFTPFile, depth: int) -> None:
        self._sftp: Any = sftp
        self._handle = remote.handle
        self._depth = depth
        self._in_flight: set[int] = set()
        self._error: BaseException | None = None

    def write(self, offset: int, data: bytes) -> None:
        """Send one write request, first waiting while too many are unanswered."""
        while len(self._in_flight) >= self._depth:
            self._await_one()
        number = self._sftp._async_request(self, CMD_WRITE, self._handle, int64(offset), data)
        self._in_flight.add(number)

    def finish(self) -> None:
        """Wait for every answer; raise the first failure the server reported."""
        while self._in_flight:
            self._await_one()

    def _await_one(self) -> None:
        self._sftp._read_response()
        if self._error is not None:
            raise self._error

    def _async_response(self, kind: int, message: paramiko.Message, number: int) -> None:
        """Take paramiko's hand-over of the answer to request ``number``."""
        self._in_flight.discard(number)
        if self._error is not None:
            return
        if kind != CMD_STATUS:
            self._error = paramiko.SFTPError(f"expected a status answer to a write, got {kind}")
            return
        try:
            self._sftp._convert_status(message)
        except (OSError, EOFError) as exc:
            self._error = exc


def _fast_transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """Make a Transport that prefers the ciphers paramiko runs fastest.

    The window and packet sizes a client announces only limit what the server sends
    it; an upload is paced by the server's window, so they keep paramiko's defaults.
    """
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    offered = [name for name in PREFERRED_CIPHERS if name in options.ciphers]
    options.ciphers = tuple(offered + [name for name in options.ciphers if name not in offered])
    return transport


def _write_size(sftp: paramiko.SFTPClient) -> int:
    """Return the largest write the server says it accepts, capped at MAX_WRITE_SIZE."""
    raw: Any = sftp
    try:
        kind, message = raw._request(CMD_EXTENDED, "limits@openssh.com")
    except (OSError, EOFError):
        # The server does not know the extension: keep to what every server takes.
        return SAFE_WRITE_SIZE
    if kind != CMD_EXTENDED_REPLY:
        return SAFE_WRITE_SIZE
    message.get_int64()  # the largest packet
    message.get_int64()  # the largest read
    largest_write = message.get_int64()
    return max(SAFE_WRITE_SIZE, min(largest_write, MAX_WRITE_SIZE))


def _read(source: ZipSource, size: int, barcode: str) -> bytes:
    try:
        return source.read(size)
    except OSError as exc:
        raise PickupError(f"could not read the zip: {_describe(exc)}", barcode=barcode) from exc


def _describe(exc: BaseException) -> str:
    """Name an exception for a message: its type, and its text when it has one."""
    if isinstance(exc, TimeoutError):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, EOFError):
        return f"the connection was closed ({type(exc).__name__})"
    text = str(exc).strip()
    if text == "Failure":
        # SFTP's generic failure: OpenSSH sends it for a full disk or a quota, too.
        text += " (the server gave no reason; a full disk or a quota are the usual causes)"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
