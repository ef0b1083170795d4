"""The sandbox launcher refuses ports that something else holds and counts S3 requests."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from sandbox.services import BUCKET, HOST, Ports, Sandbox

REPO = Path(__file__).resolve().parents[2]


def test_a_sandbox_does_not_start_on_a_port_another_listener_holds(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind((HOST, 0))
        other.listen()
        held = other.getsockname()[1]
        box = Sandbox(tmp_path, dataclasses.replace(Ports.free(), luigid=held))

        with pytest.raises(RuntimeError, match=rf"ports in use .*luigid \({HOST}:{held}\)"):
            box.start()

    assert box.running() == {}


def test_the_sandbox_command_names_the_ports_in_use_without_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as other:
        # Hold the default luigid port, unless something (a sandbox) holds it already.
        with contextlib.suppress(OSError):
            other.bind((HOST, Ports().luigid))
            other.listen()
        result = subprocess.run(
            [sys.executable, "-m", "sandbox", "--root", str(tmp_path), "start"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert result.returncode == 1
    assert "ports in use by something else (another sandbox?): " in result.stderr
    assert f"luigid ({HOST}:{Ports().luigid})" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_sandbox_counts_every_s3_request_whatever_its_answer(clean: Sandbox) -> None:
    client = clean.s3_client()
    before = len(clean.s3_requests())

    client.put_object(Bucket=BUCKET, Key="input/counted.zip", Body=b"1")
    with pytest.raises(ClientError):
        client.head_object(Bucket=BUCKET, Key="input/missing.zip")  # 404
    with pytest.raises(ClientError):
        client.get_object(Bucket=BUCKET, Key="input/counted.zip", IfMatch='"0"')  # 412
    client.delete_object(Bucket=BUCKET, Key="input/counted.zip")  # 204

    assert clean.s3_requests()[before:] == [
        f"PUT /{BUCKET}/input/counted.zip",
        f"HEAD /{BUCKET}/input/missing.zip",
        f"GET /{BUCKET}/input/counted.zip",
        f"DELETE /{BUCKET}/input/counted.zip",
    ]
