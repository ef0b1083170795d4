"""The test sandbox: every outside system as a real local process, on free loopback ports.

One sandbox serves the whole session; ``clean`` empties it between tests that need
a blank slate.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import luigi.configuration
import pytest
from helpers import REPO, s3_client

from pipeline import context
from sandbox.alma_sim import AlmaControl
from sandbox.services import BUCKET, Ports, Sandbox
from sandbox.zephir_sim import ZephirControl


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The running sandbox, configured for in-process and subprocess use."""
    root = tmp_path_factory.mktemp("sandbox")
    box = Sandbox(root, Ports.free())
    box.start()
    config_file = root / "luigi-test.cfg"
    config_file.write_text(box.luigi_config())
    os.environ["LUIGI_CONFIG_PATH"] = str(config_file)
    luigi.configuration.get_config().add_config_path(str(REPO / "luigi.cfg"))
    luigi.configuration.get_config().add_config_path(str(config_file))
    context.reset()
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture
def clean(sandbox: Sandbox) -> Sandbox:
    """The sandbox with an empty bucket, input, pickup and processed folders."""
    client = s3_client(sandbox)
    keys = [
        {"Key": o["Key"]}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for o in page.get("Contents", [])
    ]
    for start in range(0, len(keys), 1000):
        client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys[start : start + 1000]})
    for folder in (sandbox.input, sandbox.working, sandbox.processed, sandbox.pickup):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    context.reset()
    return sandbox


@pytest.fixture
def alma(clean: Sandbox) -> AlmaControl:
    """The sandbox's Alma simulator, reset: every barcode known, the set empty, no faults."""
    control = AlmaControl(clean.url("alma"))
    control.reset()
    return control


@pytest.fixture
def zephir(clean: Sandbox) -> ZephirControl:
    """The sandbox's Zephir simulator, reset: every record present, no faults."""
    control = ZephirControl(clean.url("zephir"))
    control.reset()
    return control
