"""Start and stop the local stand-ins for every outside system, on 127.0.0.1.

The sandbox runs moto's S3 server, the Alma and Zephir simulators, OpenSSH's sshd
as the pickup server, luigid and the Prometheus Pushgateway, each as a process of
its own with its log under ``<root>/logs`` and its pid under ``<root>/pids``, so
that ``stop`` works from another shell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
BUCKET = "digifeeds-sandbox"
SET_ID = "9900000000000000001"
NAMES = ("s3", "alma", "zephir", "sftp", "luigid", "pushgateway")


@dataclasses.dataclass(frozen=True)
class Ports:
    """The port of each service."""

    s3: int = 8481
    alma: int = 8482
    zephir: int = 8483
    sftp: int = 8422
    luigid: int = 8082
    pushgateway: int = 8491

    @classmethod
    def free(cls) -> Ports:
        """Ports the system has free right now, for tests that run beside a sandbox."""
        return cls(**{name: free_port() for name in NAMES})


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Tell whether nothing listens on ``port`` of 127.0.0.1 (so that we may bind it)."""
    with socket.socket() as sock:
        # As servers do, so that a connection closing from an earlier run does not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def wait_for_port(
    port: int, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for port {port} exited with {process.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout:.0f}s")


def find_program(*names: str) -> str:
    """Return the path of the first of ``names`` found beside this Python or on PATH."""
    here = Path(sys.executable).parent
    for name in names:
        if (here / name).exists():
            return str(here / name)
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(f"none of {', '.join(names)} is installed")


class Sandbox:
    """The sandbox's services, rooted in one folder."""

    def __init__(self, root: Path, ports: Ports | None = None) -> None:
        self.root = root.resolve()
        self.ports = ports or Ports()
        self.logs = self.root / "logs"
        self.pids = self.root / "pids"
        self.secrets = self.root / "secrets"
        self.sshd_root = self.root / "sshd"
        self.input = self.root / "input"
        self.working = self.root / "working"
        self.processed = self.root / "processed"

    # Paths the configuration points at.
    @property
    def pickup(self) -> Path:
        return self.root / "pickup"

    @property
    def known_hosts(self) -> Path:
        return self.sshd_root / "known_hosts"

    @property
    def client_key(self) -> Path:
        return self.sshd_root / "client_ed25519"

    @property
    def alma_key_file(self) -> Path:
        return self.secrets / "alma_api_key"

    @property
    def aws_credentials(self) -> Path:
        return self.secrets / "aws_credentials"

    def url(self, name: str) -> str:
        return f"http://{HOST}:{getattr(self.ports, name)}"

    def commands(self) -> dict[str, list[str]]:
        """The command line of each service."""
        python = sys.executable
        return {
            "s3": [python, "-m", "sandbox.s3_server", "--host", HOST, "--port", str(self.ports.s3)],
            "alma": [
                python,
                "-m",
                "sandbox.alma_sim",
                "--host",
                HOST,
                "--port",
                str(self.ports.alma),
                "--api-key-file",
                str(self.alma_key_file),
                "--set-id",
                SET_ID,
            ],
            "zephir": [
                python,
                "-m",
                "sandbox.zephir_sim",
                "--host",
                HOST,
                "--port",
                str(self.ports.zephir),
            ],
            "sftp": [
                python,
                "-m",
                "sandbox.sshd",
                "--root",
                str(self.sshd_root),
                "--port",
                str(self.ports.sftp),
                "--pickup",
                str(self.pickup),
            ],
            "luigid": [
                find_program("luigid"),
                "--address",
                HOST,
                "--port",
                str(self.ports.luigid),
                "--state-path",
                str(self.root / "luigid-state.pickle"),
            ],
            "pushgateway": [
                find_program("prometheus-pushgateway", "pushgateway"),
                f"--web.listen-address={HOST}:{self.ports.pushgateway}",
                # Its own state file: Debian's build keeps one under /var/lib otherwise.
                f"--persistence.file={self.root / 'pushgateway.data'}",
            ],
        }

    def running(self) -> dict[str, int]:
        """The services whose recorded process is alive, with their pids."""
        alive = {}
        for name in NAMES:
            pid = self._pid(name)
            if pid is not None:
                alive[name] = pid
        return alive

    def _pid(self, name: str) -> int | None:
        try:
            pid = int((self.pids / f"{name}.pid").read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def prepare(self) -> None:
        """Make the folders and the secrets the services and the pipeline read."""
        for folder in (
            self.logs,
            self.pids,
            self.secrets,
            self.input,
            self.working,
            self.processed,
        ):
            folder.mkdir(parents=True, exist_ok=True)
        self.secrets.chmod(0o700)
        if not self.alma_key_file.exists():
            self.alma_key_file.write_text(secrets.token_urlsafe(24) + "\n")
            self.alma_key_file.chmod(0o600)
        if not self.aws_credentials.exists():
            self.aws_credentials.write_text(
                "[default]\naws_access_key_id = sandbox\naws_secret_access_key = sandbox\n"
            )
            self.aws_credentials.chmod(0o600)

    def start(self, timeout: float = 60.0) -> list[str]:
        """Start every service not already running; return the names of those started."""
        self.prepare()
        started = []
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        commands = self.commands()
        taken = [
            f"{name} ({HOST}:{getattr(self.ports, name)})"
            for name in commands
            if self._pid(name) is None and not port_is_free(getattr(self.ports, name))
        ]
        if taken:
            raise RuntimeError(
                "ports in use by something else (another sandbox?): "
                + ", ".join(taken)
                + "; stop that first (another sandbox: python -m sandbox --root ROOT stop)"
            )
        for name, command in commands.items():
            if self._pid(name) is not None:
                continue
            log = (self.logs / f"{name}.log").open("ab")
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=environment,
                start_new_session=True,
            )
            log.close()
            (self.pids / f"{name}.pid").write_text(str(process.pid))
            started.append((name, process))
        for name, process in started:
            try:
                wait_for_port(getattr(self.ports, name), timeout, process)
            except (RuntimeError, TimeoutError) as exc:
                self.stop()
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the sandbox's {name} did not start: {exc}\n{tail}") from exc
        if any(name == "sftp" for name, _ in started):
            self._wait_for_file(self.known_hosts, timeout)
        self.create_bucket()
        return [name for name, _ in started]

    @staticmethod
    def _wait_for_file(path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not appear")
            time.sleep(0.1)

    def s3_client(self) -> Any:
        """A plain boto3 client on the sandbox's S3 server, to look behind the pipeline."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url("s3"),
            aws_access_key_id="sandbox",
            aws_secret_access_key="sandbox",  # noqa: S106 - moto accepts any key
            region_name="us-east-1",
        )

    def s3_requests(self) -> list[str]:
        """Every request the S3 server has answered so far, as "METHOD /path?query".

        Read from the server's access log, which it writes as it answers; the log
        colours the lines of answers other than 200, so its colour codes go first.
        """
        log = (self.logs / "s3.log").read_text(errors="replace")
        log = re.sub(r"\x1b\[[0-9;]*m", "", log)
        return re.findall(r'"([A-Z]+ \S+) HTTP/[\d.]+" \d{3}', log)

    def create_bucket(self) -> None:
        """Create the sandbox bucket in the S3 server, if it is not there."""
        client = self.s3_client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if BUCKET not in existing:
            client.create_bucket(Bucket=BUCKET)

    def stop(self, timeout: float = 10.0) -> list[str]:
        """Stop every service of this sandbox (started here or from another shell)."""
        stopped = []
        for name in NAMES:
            pid = self._pid(name)
            (self.pids / f"{name}.pid").unlink(missing_ok=True)
            if pid is None:
                continue
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGTERM)
            if not _wait_gone(pid, timeout):
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
                _wait_gone(pid, timeout)
            stopped.append(name)
        return stopped

    def luigi_config(self) -> str:
        """Settings that point the pipeline at this sandbox, over the repository's luigi.cfg."""
        return CONFIG_TEMPLATE.format(sandbox=self, ports=self.ports, bucket=BUCKET, set_id=SET_ID)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait for a process to end (reaping it if it is our child); tell whether it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except OSError:
                return True
        time.sleep(0.05)
    return False


# What differs from the repository's luigi.cfg when the sandbox is not the default one
# (other ports, another root): Luigi reads this after luigi.cfg, via LUIGI_CONFIG_PATH.
CONFIG_TEMPLATE = """\
[core]
default_scheduler_url = http://127.0.0.1:{ports.luigid}

[digifeeds]
input_folder = {sandbox.input}
working_folder = {sandbox.working}
processed_folder = {sandbox.processed}

[s3]
bucket = {bucket}
endpoint_url = http://127.0.0.1:{ports.s3}
credentials_file = {sandbox.aws_credentials}

[alma]
base_url = http://127.0.0.1:{ports.alma}/almaws/v1
set_id = {set_id}
api_key_file = {sandbox.alma_key_file}

[zephir]
base_url = http://127.0.0.1:{ports.zephir}/api

[pickup]
port = {ports.sftp}
known_hosts = {sandbox.known_hosts}
key_file = {sandbox.client_key}

[metrics]
pushgateway_url = http://127.0.0.1:{ports.pushgateway}
"""
