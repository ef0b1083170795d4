"""The sandbox launcher refuses ports that something else holds."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from sandbox.services import HOST, Ports, Sandbox


def test_a_sandbox_does_not_start_on_a_port_another_listener_holds(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind((HOST, 0))
        other.listen()
        held = other.getsockname()[1]
        box = Sandbox(tmp_path, dataclasses.replace(Ports.free(), luigid=held))

        with pytest.raises(RuntimeError, match=rf"ports in use .*luigid \({HOST}:{held}\)"):
            box.start()

    assert box.running() == {}
