"""The sandbox sshd: a real OpenSSH server that OpenSSH's and paramiko's clients accept."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from sandbox.sshd import SshdError, SshdServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdServer]:
    server = SshdServer(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def sftp_batch(
    server: SshdServer, commands: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    batch = tmp_path / "batch"
    batch.write_text(commands)
    return subprocess.run(
        server.sftp_command(batch),
        capture_output=True,
        text=True,
        timeout=30,
    )


def paramiko_session(server: SshdServer) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.get_host_keys().load(str(server.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        server.host,
        server.port,
        username=server.username,
        key_filename=str(server.client_key),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )
    return client


def test_start_writes_keys_config_and_pickup_directory(sshd: SshdServer) -> None:
    assert sshd.port > 0
    assert sshd.pickup_dir.is_dir()
    assert sshd.client_key.exists()
    assert sshd.config.read_text().count("internal-sftp") == 2
    pinned = sshd.known_hosts.read_text().split()
    assert pinned[0] == f"[127.0.0.1]:{sshd.port}"
    assert pinned[1:3] == sshd.host_key.with_suffix(".pub").read_text().split()[:2]


def test_openssh_sftp_uploads_with_the_client_key_and_pinned_host_key(
    sshd: SshdServer, tmp_path: Path
) -> None:
    local = tmp_path / "hello.txt"
    local.write_text("hello")

    result = sftp_batch(sshd, f"put {local} {sshd.pickup_dir}/hello.txt\n", tmp_path)

    assert result.returncode == 0, result.stderr
    assert (sshd.pickup_dir / "hello.txt").read_text() == "hello"
    (sshd.pickup_dir / "hello.txt").unlink()


def test_paramiko_logs_in_with_the_pinned_host_key(sshd: SshdServer) -> None:
    client = paramiko_session(sshd)
    try:
        sftp = client.open_sftp()
        assert sftp.normalize(str(sshd.pickup_dir)) == str(sshd.pickup_dir)
    finally:
        client.close()


def test_server_offers_password_and_key_authentication(sshd: SshdServer) -> None:
    # Root has no usable password here, so only the offer itself can be checked.
    with socket.create_connection((sshd.host, sshd.port), timeout=10) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=10)
            with pytest.raises(paramiko.BadAuthenticationType) as raised:
                transport.auth_none(sshd.username)
        finally:
            transport.close()

    assert {"password", "publickey"} <= set(raised.value.allowed_types)


def test_drop_connections_cuts_a_live_session_and_keeps_listening(sshd: SshdServer) -> None:
    client = paramiko_session(sshd)
    transport = client.get_transport()
    assert transport is not None and transport.is_active()

    try:
        assert sshd.drop_connections() > 0
        deadline = time.monotonic() + 5
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not transport.is_active()
    finally:
        client.close()

    assert accepts_connections(sshd.port)
    paramiko_session(sshd).close()


def test_restart_on_the_same_root_keeps_host_key_and_port(tmp_path: Path) -> None:
    port = free_port()
    server = SshdServer(tmp_path, port)
    server.start()
    pinned = server.known_hosts.read_text()
    server.stop()
    assert not accepts_connections(port)

    server.start()
    try:
        assert server.port == port
        assert server.known_hosts.read_text() == pinned
        paramiko_session(server).close()
    finally:
        server.stop()
    server.stop()  # a second stop does nothing


def test_stop_ends_open_connections(tmp_path: Path) -> None:
    server = SshdServer(tmp_path)
    server.start()
    client = paramiko_session(server)
    transport = client.get_transport()
    assert transport is not None

    server.stop()

    deadline = time.monotonic() + 5
    while transport.is_active() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not transport.is_active()
    client.close()


def test_port_before_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SshdError):
        _ = SshdServer(tmp_path).port


def test_port_in_use_fails_start_with_the_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        server = SshdServer(tmp_path, taken.getsockname()[1])

        with pytest.raises(SshdError, match="sshd"):
            server.start(timeout=5)

    assert not server.running


def test_command_line_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox.sshd", "--root", str(tmp_path), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(6)]
        assert f"port        {port}\n" in lines
        assert accepts_connections(port)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)

    assert process.returncode == 0
    assert not accepts_connections(port)
