"""PickupClient against a real OpenSSH server on loopback (sandbox.sshd)."""

from __future__ import annotations

import base64
import io
import logging
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from pipeline.barcodes import with_check_digit
from pipeline.errors import ConfigurationError, HostKeyError, InvalidBarcodeError, PickupError
from pipeline.pickup import PickupClient
from sandbox.sshd import SshdServer

BARCODE = with_check_digit("3901500000001")
OTHER_BARCODE = with_check_digit("3901500000002")
MiB = 1024 * 1024


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdServer]:
    server = SshdServer(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pickup(sshd: SshdServer) -> Path:
    """The server's pickup directory, emptied before the test."""
    for entry in sshd.pickup_dir.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return sshd.pickup_dir


def make_client(sshd: SshdServer, **overrides: Any) -> PickupClient:
    settings: dict[str, Any] = {
        "host": sshd.host,
        "port": sshd.port,
        "username": sshd.username,
        "directory": str(sshd.pickup_dir),
        "known_hosts": sshd.known_hosts,
        "key_file": sshd.client_key,
        "timeout": 10.0,
    }
    settings.update(overrides)
    return PickupClient(**settings)


def make_zip(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def names(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


def other_key(tmp_path: Path) -> Path:
    key = tmp_path / "other_host_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
        check=True,
        capture_output=True,
    )
    return key.with_suffix(".pub")


class Unreadable(io.RawIOBase):
    """A source that fails if anything tries to read it."""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        raise AssertionError("the source was read")


class FailsAfter(io.RawIOBase):
    """A source that hands out ``limit`` bytes of ``data`` and then raises OSError."""

    def __init__(self, data: bytes, limit: int) -> None:
        self.data = data
        self.limit = limit
        self.position = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.position >= self.limit:
            raise OSError("disk went away while reading the zip")
        block = self.data[self.position : min(self.position + size, self.limit)]
        self.position += len(block)
        return block


def test_delivery_lands_as_barcode_zip_with_identical_bytes(
    sshd: SshdServer, pickup: Path, tmp_path: Path
) -> None:
    source = make_zip(tmp_path / "volume.zip", 3 * MiB + 123)
    seen: list[tuple[int, int]] = []

    with make_client(sshd) as client:
        client.deliver_file(
            source, BARCODE, progress=lambda sent, total: seen.append((sent, total))
        )

    assert names(pickup) == [f"{BARCODE}.zip"]
    assert (pickup / f"{BARCODE}.zip").read_bytes() == source.read_bytes()
    assert seen[-1] == (source.stat().st_size, source.stat().st_size)
    assert [sent for sent, _ in seen] == sorted(sent for sent, _ in seen)


def test_one_client_delivers_many_zips_over_one_connection(
    sshd: SshdServer, pickup: Path, tmp_path: Path
) -> None:
    first = make_zip(tmp_path / "first.zip", 100_000)
    second = make_zip(tmp_path / "second.zip", 200_000)

    with make_client(sshd) as client:
        client.deliver_file(first, BARCODE)
        connection = client._ssh
        client.deliver(io.BytesIO(second.read_bytes()), 200_000, OTHER_BARCODE)
        assert client._ssh is connection

    assert names(pickup) == [f"{BARCODE}.zip", f"{OTHER_BARCODE}.zip"]
    assert (pickup / f"{OTHER_BARCODE}.zip").read_bytes() == second.read_bytes()


def test_empty_zip_is_delivered(sshd: SshdServer, pickup: Path) -> None:
    with make_client(sshd) as client:
        client.deliver(io.BytesIO(b""), 0, BARCODE)

    assert names(pickup) == [f"{BARCODE}.zip"]
    assert (pickup / f"{BARCODE}.zip").stat().st_size == 0


def test_complete_earlier_delivery_is_left_alone_and_nothing_is_uploaded(
    sshd: SshdServer, pickup: Path
) -> None:
    delivered = pickup / f"{BARCODE}.zip"
    delivered.write_bytes(b"x" * 5000)
    before = delivered.stat()

    with make_client(sshd) as client:
        client.deliver(Unreadable(), 5000, BARCODE)

    after = delivered.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert names(pickup) == [f"{BARCODE}.zip"]


def test_earlier_file_of_another_size_is_refused_not_overwritten(
    sshd: SshdServer, pickup: Path
) -> None:
    delivered = pickup / f"{BARCODE}.zip"
    delivered.write_bytes(b"x" * 10)

    with make_client(sshd) as client, pytest.raises(PickupError, match="refusing to overwrite"):
        client.deliver(Unreadable(), 5000, BARCODE)

    assert delivered.read_bytes() == b"x" * 10
    assert names(pickup) == [f"{BARCODE}.zip"]


@pytest.mark.parametrize("held", [5000, 10, 0], ids=["same-size", "other-size", "empty"])
def test_existing_file_is_refused_when_existing_is_not_ok(
    sshd: SshdServer, pickup: Path, held: int
) -> None:
    delivered = pickup / f"{BARCODE}.zip"
    delivered.write_bytes(b"x" * held)
    before = delivered.stat()

    with (
        make_client(sshd) as client,
        pytest.raises(PickupError, match="did not write; a person must check it") as raised,
    ):
        client.deliver(Unreadable(), 5000, BARCODE, existing_ok=False)

    assert raised.value.barcode == BARCODE
    assert f"{pickup}/{BARCODE}.zip" in str(raised.value)
    assert str(raised.value).startswith(f"{BARCODE}: ")
    after = delivered.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        held,
    )
    assert names(pickup) == [f"{BARCODE}.zip"]


def test_deliver_file_passes_existing_ok_on(sshd: SshdServer, pickup: Path, tmp_path: Path) -> None:
    source = make_zip(tmp_path / "volume.zip", 5000)
    delivered = pickup / f"{BARCODE}.zip"
    delivered.write_bytes(source.read_bytes())

    with make_client(sshd) as client:
        with pytest.raises(PickupError, match="a person must check it"):
            client.deliver_file(source, BARCODE, existing_ok=False)
        client.deliver_file(source, BARCODE, existing_ok=True)

    assert names(pickup) == [f"{BARCODE}.zip"]


def test_first_delivery_with_existing_not_ok_lands_when_nothing_is_there(
    sshd: SshdServer, pickup: Path
) -> None:
    data = os.urandom(100_000)

    with make_client(sshd) as client:
        client.deliver(io.BytesIO(data), len(data), BARCODE, existing_ok=False)

    assert names(pickup) == [f"{BARCODE}.zip"]
    assert (pickup / f"{BARCODE}.zip").read_bytes() == data


def test_file_appearing_during_upload_is_refused_when_existing_is_not_ok(
    sshd: SshdServer, pickup: Path
) -> None:
    data = os.urandom(3 * MiB)
    intruder = pickup / f"{BARCODE}.zip"

    def appear_once(sent: int, total: int) -> None:
        if not intruder.exists():
            intruder.write_bytes(data)  # even identical bytes are not this delivery's

    with (
        make_client(sshd) as client,
        pytest.raises(PickupError, match="a person must check it"),
    ):
        client.deliver(
            io.BytesIO(data), len(data), BARCODE, existing_ok=False, progress=appear_once
        )

    assert names(pickup) == [f"{BARCODE}.zip"]
    assert intruder.read_bytes() == data


def test_stale_temporary_files_of_the_barcode_are_removed(
    sshd: SshdServer, pickup: Path, tmp_path: Path
) -> None:
    stale = pickup / f".{BARCODE}.zip.0123456789abcdef.part"
    stale.write_bytes(b"half a zip")
    others = [
        pickup / f".{OTHER_BARCODE}.zip.0123456789abcdef.part",  # another barcode's
        pickup / f".{BARCODE}.zip.notours.part",  # not a name this client makes
    ]
    for path in others:
        path.write_bytes(b"leave me")
    source = make_zip(tmp_path / "volume.zip", 50_000)

    with make_client(sshd) as client:
        client.deliver_file(source, BARCODE)

    assert not stale.exists()
    assert all(path.exists() for path in others)
    assert (pickup / f"{BARCODE}.zip").read_bytes() == source.read_bytes()


def test_a_first_attempt_does_not_list_the_pickup_directory(
    sshd: SshdServer, pickup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pickup holds every earlier delivery; listing it on each delivery made a run
    # quadratic in the number of barcodes. Only a resumed attempt looks for leftovers.
    listed: list[str] = []
    original = paramiko.SFTPClient.listdir

    def listdir(self: paramiko.SFTPClient, path: str = ".") -> list[str]:
        listed.append(path)
        return original(self, path)

    monkeypatch.setattr(paramiko.SFTPClient, "listdir", listdir)
    source = make_zip(tmp_path / "volume.zip", 50_000)
    with make_client(sshd) as client:
        client.deliver_file(source, BARCODE, existing_ok=False)
        assert listed == []
        client.deliver_file(source, BARCODE, existing_ok=True)
    assert len(listed) == 0  # already delivered: nothing to upload, nothing to clean

    (pickup / f"{BARCODE}.zip").unlink()
    with make_client(sshd) as client:
        client.deliver_file(source, BARCODE, existing_ok=True)
    assert len(listed) == 1
    assert (pickup / f"{BARCODE}.zip").read_bytes() == source.read_bytes()


def test_changed_host_key_is_refused_and_nothing_uploaded(
    sshd: SshdServer, pickup: Path, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    key_type, key_data = other_key(tmp_path).read_text().split()[:2]
    known_hosts.write_text(f"[{sshd.host}]:{sshd.port} {key_type} {key_data}\n")

    with (
        make_client(sshd, known_hosts=known_hosts) as client,
        pytest.raises(HostKeyError, match="has changed") as raised,
    ):
        client.deliver(Unreadable(), 10, BARCODE)

    assert f"{sshd.host}:{sshd.port}" in str(raised.value)
    assert raised.value.barcode == BARCODE
    assert names(pickup) == []


@pytest.mark.parametrize(
    "known_hosts_text",
    [
        pytest.param("", id="empty"),
        pytest.param("# nothing pinned\n", id="comment-only"),
        pytest.param(None, id="pinned-for-another-port"),
    ],
)
def test_unpinned_host_key_is_refused(
    sshd: SshdServer, pickup: Path, tmp_path: Path, known_hosts_text: str | None
) -> None:
    known_hosts = tmp_path / "known_hosts"
    if known_hosts_text is None:
        key_type, key_data = sshd.host_key.with_suffix(".pub").read_text().split()[:2]
        known_hosts_text = f"[{sshd.host}]:{sshd.port + 1} {key_type} {key_data}\n"
    known_hosts.write_text(known_hosts_text)

    with (
        make_client(sshd, known_hosts=known_hosts) as client,
        pytest.raises(HostKeyError, match="not pinned") as raised,
    ):
        client.deliver(Unreadable(), 10, BARCODE)

    assert f"{sshd.host}:{sshd.port}" in str(raised.value)
    assert BARCODE in str(raised.value)
    assert names(pickup) == []


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _corrupt_known_hosts(sshd: SshdServer, corruption: str) -> bytes:
    """Return the pinned known_hosts line for ``sshd``, corrupted as ``corruption`` says."""
    key_type, key_data = sshd.host_key.with_suffix(".pub").read_text().split()[:2]
    name = f"[{sshd.host}]:{sshd.port}"
    raw = base64.b64decode(key_data)
    if corruption == "altered-base64":
        # One character changed inside the encoded key-type name: it decodes to bytes
        # that are not UTF-8 (paramiko raises UnicodeDecodeError).
        altered = key_data[:5] + ("Z" if key_data[5] != "Z" else "Y") + key_data[6:]
        return f"{name} {key_type} {altered}\n".encode()
    if corruption == "invalid-base64-characters":
        return f"{name} {key_type} {key_data[:10]}!!!{key_data[13:]}\n".encode()
    if corruption == "truncated-line":
        # Cut mid-key, so the base64 padding is wrong (paramiko's InvalidHostKey).
        return f"{name} {key_type} {key_data[: len(key_data) // 2 - 1]}".encode()
    if corruption == "short-ed25519-key":
        # Well-formed, but the ed25519 key has 31 bytes (nacl's ValueError).
        blob = _ssh_string(b"ssh-ed25519") + _ssh_string(raw[-32:-1])
        return f"{name} ssh-ed25519 {base64.b64encode(blob).decode()}\n".encode()
    if corruption == "negative-rsa-modulus":
        # An RSA modulus with its sign bit set (OverflowError from cryptography).
        blob = _ssh_string(b"ssh-rsa") + _ssh_string(b"\x01\x00\x01")
        blob += _ssh_string(b"\x80" + bytes(255))
        return f"{name} ssh-rsa {base64.b64encode(blob).decode()}\n".encode()
    if corruption == "tiny-rsa-modulus":
        # An RSA modulus of 1 (ValueError from cryptography).
        blob = _ssh_string(b"ssh-rsa") + _ssh_string(b"\x01\x00\x01") + _ssh_string(b"\x01")
        return f"{name} ssh-rsa {base64.b64encode(blob).decode()}\n".encode()
    if corruption == "binary-junk":
        return bytes(range(256)) * 4
    if corruption == "hashed-name-with-bad-salt":
        # Loads, but paramiko fails (binascii.Error) when it hashes the host to look it up.
        return f"|1|notbase64|alsonot {key_type} {key_data}\n".encode()
    raise AssertionError(corruption)


@pytest.mark.parametrize(
    "corruption",
    [
        "altered-base64",
        "invalid-base64-characters",
        "truncated-line",
        "short-ed25519-key",
        "negative-rsa-modulus",
        "tiny-rsa-modulus",
        "binary-junk",
        "hashed-name-with-bad-salt",
    ],
)
def test_corrupt_known_hosts_file_is_a_host_key_error(
    sshd: SshdServer, pickup: Path, tmp_path: Path, corruption: str
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_bytes(_corrupt_known_hosts(sshd, corruption))

    with (
        make_client(sshd, known_hosts=known_hosts) as client,
        pytest.raises(HostKeyError, match="cannot read the pinned known_hosts file") as raised,
    ):
        client.deliver(Unreadable(), 10, BARCODE)

    assert str(known_hosts) in str(raised.value)
    assert raised.value.barcode == BARCODE
    assert raised.value.__cause__ is not None
    assert client._ssh is None
    assert names(pickup) == []


def test_missing_known_hosts_file_is_a_host_key_error(sshd: SshdServer, tmp_path: Path) -> None:
    with (
        make_client(sshd, known_hosts=tmp_path / "absent") as client,
        pytest.raises(HostKeyError, match="known_hosts"),
    ):
        client.deliver(Unreadable(), 10, BARCODE)


def test_wrong_client_key_is_a_pickup_error(sshd: SshdServer, pickup: Path, tmp_path: Path) -> None:
    stranger = other_key(tmp_path).with_suffix("")

    with (
        make_client(sshd, key_file=stranger) as client,
        pytest.raises(PickupError, match="refused to authenticate") as raised,
    ):
        client.deliver(Unreadable(), 10, BARCODE)

    assert not isinstance(raised.value, HostKeyError)
    assert raised.value.barcode == BARCODE
    assert names(pickup) == []


def test_wrong_password_is_refused_and_never_shown(
    sshd: SshdServer, pickup: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Tr0ub4dor&3-not-the-password"
    caplog.set_level(logging.DEBUG)

    client = make_client(sshd, key_file=None, password=secret)
    with client, pytest.raises(PickupError, match="refused to authenticate") as raised:
        client.deliver(Unreadable(), 10, BARCODE)

    shown = [str(raised.value), repr(raised.value), repr(raised.value.__cause__), repr(client)]
    assert not any(secret in text for text in shown)
    assert secret not in caplog.text
    assert names(pickup) == []


def test_dropped_connection_mid_upload_then_rerun_delivers_one_complete_zip(
    sshd: SshdServer, pickup: Path, tmp_path: Path
) -> None:
    source = make_zip(tmp_path / "volume.zip", 24 * MiB)
    dropped: list[int] = []

    def drop_once(sent: int, total: int) -> None:
        if not dropped:
            dropped.append(sshd.drop_connections())

    with make_client(sshd) as client:
        with pytest.raises(PickupError, match="uploading") as raised:
            client.deliver_file(source, BARCODE, progress=drop_once)
        assert dropped and dropped[0] > 0
        assert raised.value.barcode == BARCODE
        assert not (pickup / f"{BARCODE}.zip").exists()

        # The same client reconnects, removes what the broken upload left, delivers.
        client.deliver_file(source, BARCODE)

    assert names(pickup) == [f"{BARCODE}.zip"]
    assert (pickup / f"{BARCODE}.zip").read_bytes() == source.read_bytes()


def test_source_failing_mid_upload_leaves_no_temporary_file(sshd: SshdServer, pickup: Path) -> None:
    data = os.urandom(3 * MiB)

    with make_client(sshd) as client:
        with pytest.raises(PickupError, match="could not read the zip"):
            client.deliver(FailsAfter(data, 2 * MiB), len(data), BARCODE)
        assert names(pickup) == []

        # The connection is still good for the next delivery.
        client.deliver(io.BytesIO(data), len(data), BARCODE)

    assert (pickup / f"{BARCODE}.zip").read_bytes() == data


def test_write_refused_mid_upload_is_a_pickup_error_not_a_delivery(
    sshd: SshdServer, pickup: Path
) -> None:
    # Making the half-written file immutable (chattr +i) makes the server fail every
    # later write to it, even as root: the failures must be noticed, though the
    # writes are pipelined and answered after the client has moved on.
    data = os.urandom(8 * MiB)
    locked: list[Path] = []

    def lock_once(sent: int, total: int) -> None:
        if not locked:
            locked.extend(pickup.glob(f".{BARCODE}.zip.*.part"))
            for path in locked:
                subprocess.run(["chattr", "+i", str(path)], check=True)

    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    try:
        with (
            make_client(sshd) as client,
            pytest.raises(PickupError, match=r"uploading .* Permission denied"),
        ):
            client.deliver(io.BytesIO(data), len(data), BARCODE, progress=lock_once)
    finally:
        for path in locked:
            subprocess.run(["chattr", "-i", str(path)], check=True)

    assert locked
    assert not (pickup / f"{BARCODE}.zip").exists()


def test_failing_progress_callback_leaves_no_temporary_file(sshd: SshdServer, pickup: Path) -> None:
    def interrupt(sent: int, total: int) -> None:
        raise KeyboardInterrupt

    with make_client(sshd) as client, pytest.raises(KeyboardInterrupt):
        client.deliver(io.BytesIO(os.urandom(3 * MiB)), 3 * MiB, BARCODE, progress=interrupt)

    assert names(pickup) == []


@pytest.mark.parametrize(
    ("actual", "claimed", "match"),
    [
        pytest.param(1000, 2000, "ended after 1000 of 2000 bytes", id="shorter"),
        pytest.param(2000, 1000, "longer than 1000 bytes", id="longer"),
    ],
)
def test_source_of_the_wrong_length_is_refused(
    sshd: SshdServer, pickup: Path, actual: int, claimed: int, match: str
) -> None:
    with make_client(sshd) as client, pytest.raises(PickupError, match=match):
        client.deliver(io.BytesIO(b"z" * actual), claimed, BARCODE)

    assert names(pickup) == []


def test_missing_pickup_directory_is_a_pickup_error(sshd: SshdServer, pickup: Path) -> None:
    with (
        make_client(sshd, directory=str(pickup / "absent")) as client,
        pytest.raises(PickupError, match="No such file") as raised,
    ):
        client.deliver(io.BytesIO(b"zip"), 3, BARCODE)

    assert raised.value.barcode == BARCODE


def test_pickup_directory_that_is_a_file_is_a_pickup_error(sshd: SshdServer, pickup: Path) -> None:
    (pickup / "not-a-directory").write_bytes(b"")

    with (
        make_client(sshd, directory=str(pickup / "not-a-directory")) as client,
        pytest.raises(PickupError) as raised,
    ):
        client.deliver(io.BytesIO(b"zip"), 3, BARCODE)

    assert raised.value.barcode == BARCODE
    assert names(pickup) == ["not-a-directory"]


def test_pickup_directory_refusing_new_files_is_a_pickup_error(
    sshd: SshdServer, pickup: Path
) -> None:
    # sshd runs as root here, so file modes do not stop it; an immutable directory
    # (chattr +i) refuses new files even to root, as a read-only pickup would.
    locked = pickup / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        with (
            make_client(sshd, directory=str(locked)) as client,
            pytest.raises(PickupError, match="Permission denied"),
        ):
            client.deliver(io.BytesIO(b"zip"), 3, BARCODE)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)

    assert names(locked) == []


@pytest.mark.parametrize(
    "barcode",
    ["", "39015", "3901501234567x", "../39015012345", "390150123456789", "49015012345678", 39015],
)
def test_invalid_barcode_is_refused_before_connecting(tmp_path: Path, barcode: Any) -> None:
    # Nothing listens on this port: any connection attempt would be a PickupError.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = PickupClient(
        "127.0.0.1", port, "nobody", "/pickup", tmp_path / "known_hosts", password="x"
    )

    with pytest.raises(InvalidBarcodeError):
        client.deliver(Unreadable(), 10, barcode)

    assert client._ssh is None


def test_silent_server_times_out_as_a_pickup_error(tmp_path: Path) -> None:
    (tmp_path / "known_hosts").write_text("")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        client = PickupClient(
            "127.0.0.1", port, "nobody", "/pickup", tmp_path / "known_hosts", password="x",
            timeout=0.5,
        )  # fmt: skip

        started = time.monotonic()
        with pytest.raises(PickupError, match="connecting"):
            client.deliver(io.BytesIO(b"zip"), 3, BARCODE)

    assert time.monotonic() - started < 5


def test_refused_connection_is_a_pickup_error(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = PickupClient(
        "127.0.0.1", port, "nobody", "/pickup", tmp_path / "known_hosts", password="x"
    )
    (tmp_path / "known_hosts").write_text("")

    with pytest.raises(PickupError, match=f"127.0.0.1:{port}") as raised:
        client.deliver(io.BytesIO(b"zip"), 3, BARCODE)

    assert raised.value.barcode == BARCODE


def test_client_needs_a_key_or_a_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        PickupClient("127.0.0.1", 22, "nobody", "/pickup", tmp_path / "known_hosts")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs inside the test's folder, as a pickup disk that fills up."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_delivery_cleanly_and_a_rerun_delivers(
    sshd: SshdServer, small_disk: Path, tmp_path: Path
) -> None:
    source = tmp_path / "big.zip"
    source.write_bytes(os.urandom(512 * 1024))
    client = make_client(sshd, directory=str(small_disk))

    with client, pytest.raises(PickupError) as raised:
        client.deliver_file(source, BARCODE)

    assert BARCODE in str(raised.value)
    assert "a full disk or a quota" in str(raised.value)
    assert list(small_disk.iterdir()) == []

    # Room is made (a person clears the disk); the next run delivers the zip whole.
    source.write_bytes(os.urandom(100 * 1024))
    with make_client(sshd, directory=str(small_disk)) as again:
        again.deliver_file(source, BARCODE)
    assert (small_disk / f"{BARCODE}.zip").read_bytes() == source.read_bytes()
    assert [p.name for p in small_disk.iterdir()] == [f"{BARCODE}.zip"]
