"""A throwaway OpenSSH server on loopback that stands in for Google's SFTP pickup.

Everything the server needs lives under one root folder: its config, its own host
key, a client key pair authorized for the current user, a ``known_hosts`` file
that pins the host key, and the pickup directory. Run it from tests through
:class:`SshdServer`, or by hand::

    python -m sandbox.sshd --root .sandbox/sshd --port 2222
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType

logger = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"

# sshd refuses to start unless its privilege-separation directory exists.
PRIVSEP_DIR = Path("/run/sshd")


class SshdError(RuntimeError):
    """The sandbox sshd could not be set up, or did not come up."""


class SshdServer:
    """Run ``/usr/sbin/sshd -D`` with a config, keys and pickup directory of its own.

    Key authentication with :attr:`client_key` is the main path. Password
    authentication is switched on too, but it only succeeds for an account that
    has a password, so tests use it to check that a wrong password is refused.
    """

    def __init__(
        self,
        root: Path,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        pickup_dir: Path | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self._pickup_dir = Path(pickup_dir).absolute() if pickup_dir else self.root / "pickup"
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"SshdServer(root={str(self.root)!r}, host={self.host!r}, port={self._port})"

    def __enter__(self) -> SshdServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port sshd listens on; known once :meth:`start` has run."""
        if self._port is None:
            raise SshdError("sshd has not been started")
        return self._port

    @property
    def known_hosts(self) -> Path:
        """A known_hosts file pinning this server's host key as ``[host]:port``."""
        return self.root / "known_hosts"

    @property
    def host_key(self) -> Path:
        """The server's private ed25519 host key."""
        return self.root / "ssh_host_ed25519_key"

    @property
    def client_key(self) -> Path:
        """The private ed25519 key authorized to log in as :attr:`username`."""
        return self.root / "client_ed25519"

    @property
    def pickup_dir(self) -> Path:
        """The directory deliveries go to, and where SFTP sessions start.

        Relative remote paths (a ``directory`` of ``.``) resolve against it, as on a
        pickup server whose login directory is the pickup.
        """
        return self._pickup_dir

    @property
    def username(self) -> str:
        """The account clients log in as: the user running this process."""
        return pwd.getpwuid(os.getuid()).pw_name

    @property
    def config(self) -> Path:
        """The sshd_config this server runs with."""
        return self.root / "sshd_config"

    @property
    def log_file(self) -> Path:
        """Where sshd's own log (``-e``, on stderr) is written."""
        return self.root / "sshd.log"

    @property
    def running(self) -> bool:
        """Tell whether the listening sshd process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Write keys and config, start sshd and wait until it greets connections."""
        if self.running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.pickup_dir.mkdir(exist_ok=True)
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)

        # Keys are made once per root, so a restarted server keeps its identity.
        _keygen(self.host_key, "digifeeds sandbox host")
        _keygen(self.client_key, "digifeeds sandbox client")
        (self.root / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())

        self._port = self._requested_port or _free_port(self.host)
        self.config.write_text(self._config_text())
        self.pin_host_key(self.host_key.with_suffix(".pub"))

        logger.info("starting sshd on %s:%s under %s", self.host, self._port, self.root)
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._wait_until_ready(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sshd and every connection it is still serving."""
        process, self._process = self._process, None
        if process is None:
            return
        children = _descendants(process.pid)
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
        _kill(children)
        logger.info("stopped sshd on %s:%s", self.host, self._port)

    def sftp_command(self, batch: Path) -> list[str]:
        """OpenSSH's ``sftp`` running ``batch`` against this server, key and pin included."""
        return [
            "sftp",
            "-b",
            str(batch),
            "-i",
            str(self.client_key),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-P",
            str(self.port),
            f"{self.username}@{self.host}",
        ]

    def drop_connections(self) -> int:
        """Kill the processes serving current connections; return how many were killed.

        The listener stays up, so this looks to a client like the network or the far
        side dropping the connection mid-transfer.
        """
        if self._process is None:
            return 0
        return _kill(_descendants(self._process.pid))

    def pin_host_key(self, public_key: Path) -> None:
        """Write :attr:`known_hosts` so that it pins ``public_key`` for this server."""
        key_type, key_data = public_key.read_text().split()[:2]
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {key_type} {key_data}\n")

    def _config_text(self) -> str:
        lines = [
            f"ListenAddress {self.host}:{self._port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.root / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            f"AllowUsers {self.username}",
            "PermitRootLogin yes",
            "PubkeyAuthentication yes",
            "PasswordAuthentication yes",
            "PermitEmptyPasswords no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "MaxStartups 100",
            "MaxAuthTries 3",
            "LogLevel INFO",
            f"Subsystem sftp internal-sftp -d {self.pickup_dir}",
            f"ForceCommand internal-sftp -d {self.pickup_dir}",
        ]
        return "\n".join(lines) + "\n"

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise SshdError(
                    f"sshd exited at start-up; see {self.log_file}:\n{self._log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise SshdError(f"sshd did not answer on {self.host}:{self.port} within {timeout}s")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _keygen(path: Path, comment: str) -> None:
    """Make an ed25519 key pair at ``path`` and ``path.pub`` unless it exists."""
    if path.exists() and path.with_suffix(".pub").exists():
        return
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


def _free_port(host: str) -> int:
    # NOTE: another process may take the port between this check and sshd binding
    # it; start() then fails loudly rather than talking to the wrong server.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    """Return the ids of every live process below ``pid``, read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may hold spaces; the parent id follows it.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found


def _kill(pids: list[int]) -> int:
    killed = 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


def main(argv: list[str] | None = None) -> None:
    """Start the sandbox sshd and keep it in the foreground until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m sandbox.sshd", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path(".sandbox/sshd"), help="state folder")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks one")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--pickup", type=Path, help="pickup folder (default: ROOT/pickup)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = SshdServer(args.root, args.port, host=args.host, pickup_dir=args.pickup)
    server.start()
    print(f"host        {server.host}", flush=True)
    print(f"port        {server.port}")
    print(f"username    {server.username}")
    print(f"client key  {server.client_key}")
    print(f"known_hosts {server.known_hosts}")
    print(f"pickup dir  {server.pickup_dir}", flush=True)
    try:
        while not stopping.wait(0.5):
            if not server.running:
                raise SshdError(f"sshd exited; see {server.log_file}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
