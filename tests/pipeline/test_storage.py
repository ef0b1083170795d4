"""The S3 client against moto's S3 server over HTTP."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import count_requests, new_barcodes

from pipeline.errors import ObjectChangedError, StorageError
from pipeline.storage import Storage
from sandbox.services import BUCKET, Sandbox

MIB = 1024 * 1024


@pytest.fixture
def storage(clean: Sandbox) -> Iterator[Storage]:
    yield Storage(
        BUCKET,
        endpoint_url=clean.url("s3"),
        credentials_file=str(clean.aws_credentials),
        chunk_size=5 * MIB,
    )


@pytest.mark.parametrize("size", [1000, 5 * MIB, 12 * MIB + 17], ids=["small", "one-part", "multi"])
def test_upload_verified_stores_the_file_and_confirms_it(
    storage: Storage, tmp_path: Path, size: int
) -> None:
    path = tmp_path / "volume.zip"
    data = os.urandom(size)
    path.write_bytes(data)
    seen: list[tuple[int, int]] = []

    storage.upload_verified(
        path, "input/x.zip", progress=lambda done, total: seen.append((done, total))
    )

    with storage.open("input/x.zip") as stored:
        assert stored.size == size
        assert hashlib.md5(stored.body.read()).digest() == hashlib.md5(data).digest()
    assert seen[-1] == (size, size)


def test_upload_verified_refuses_a_stored_object_that_differs(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "volume.zip"
    path.write_bytes(b"the zip as it was checked")
    # The file changes between its checksum and its upload, as a disk fault would do it.
    checksum = storage._expected_checksum
    monkeypatch.setattr(
        storage,
        "_expected_checksum",
        lambda p, size: (checksum(p, size), path.write_bytes(b"the zip as it was sent!!!"))[0],
    )

    with pytest.raises(StorageError, match="does not match"):
        storage.upload_verified(path, "input/y.zip")


def test_exists_costs_one_head_request_for_a_missing_key(storage: Storage) -> None:
    counts = count_requests(storage)

    assert storage.exists("state/zipped/39015000000000.json") is False
    assert counts == {"HeadObject": 1}


def test_a_key_with_children_does_not_exist(storage: Storage) -> None:
    storage.put_json("state/zipped/child.json", {"a": 1})

    assert storage.exists("state/zipped") is False
    assert storage.exists("state/zipped/") is False


def test_put_json_only_if_absent_never_replaces(storage: Storage) -> None:
    assert storage.put_json("k.json", {"first": True}, only_if_absent=True) is True
    assert storage.put_json("k.json", {"first": False}, only_if_absent=True) is False
    assert storage.get_json("k.json") == {"first": True}


def test_a_checked_copy_is_safe_to_repeat_and_keeps_an_equal_copy(storage: Storage) -> None:
    (barcode,) = new_barcodes(1)
    source, destination = f"input/{barcode}.zip", f"processed/{barcode}.zip"
    etag = storage.client.put_object(Bucket=BUCKET, Key=source, Body=b"zip bytes")["ETag"]

    # A crash after the copy leaves both objects; the copy is checked and kept.
    storage.client.copy_object(
        Bucket=BUCKET, Key=destination, CopySource={"Bucket": BUCKET, "Key": source}
    )
    counts = count_requests(storage)
    storage.copy_checked(source, destination, etag=etag)
    assert counts == {"HeadObject": 2}

    # Once the source is deleted, a repeat finds the copy made before.
    storage.delete(source)
    storage.copy_checked(source, destination, etag=etag)
    with storage.open(destination) as stored:
        assert stored.body.read() == b"zip bytes"


def test_a_checked_copy_replaces_a_destination_that_differs(storage: Storage) -> None:
    (barcode,) = new_barcodes(1)
    source, destination = f"input/{barcode}.zip", f"processed/{barcode}.zip"
    etag = storage.client.put_object(Bucket=BUCKET, Key=source, Body=b"zip bytes")["ETag"]
    storage.client.put_object(Bucket=BUCKET, Key=destination, Body=b"half")

    storage.copy_checked(source, destination, etag=etag)

    with storage.open(destination) as stored:
        assert stored.body.read() == b"zip bytes"
    assert storage.exists(source)


def test_a_checked_copy_of_the_object_read_costs_one_request(storage: Storage) -> None:
    (barcode,) = new_barcodes(1)
    source, destination = f"input/{barcode}.zip", f"processed/{barcode}.zip"
    storage.client.put_object(Bucket=BUCKET, Key=source, Body=b"zip bytes")
    with storage.open(source, destination) as read:
        assert (read.key, read.body.read(), read.size) == (source, b"zip bytes", 9)

    counts = count_requests(storage)
    storage.copy_checked(source, destination, etag=read.etag, size=read.size)

    assert counts == {"CopyObject": 1}
    with storage.open(destination) as copied:
        assert (copied.body.read(), copied.etag) == (b"zip bytes", read.etag)


def test_a_checked_copy_refuses_an_object_that_changed_after_it_was_read(
    storage: Storage,
) -> None:
    (barcode,) = new_barcodes(1)
    source, destination = f"input/{barcode}.zip", f"processed/{barcode}.zip"
    storage.client.put_object(Bucket=BUCKET, Key=source, Body=b"zip bytes")
    with storage.open(source) as read:
        pass
    storage.client.put_object(Bucket=BUCKET, Key=source, Body=b"other bytes")

    # Asked without the size (as when resuming), the source is looked at before
    # anything is copied.
    with pytest.raises(ObjectChangedError, match=rf"input/{barcode}\.zip is not the object"):
        storage.copy_checked(source, destination, etag=read.etag)
    assert not storage.exists(destination)
    # With it, S3 refuses the copy (CopySourceIfMatch); moto copies anyway, and the
    # ETag comparison that follows catches it. Either way the source stays.
    with pytest.raises(ObjectChangedError, match=rf"input/{barcode}\.zip is not the object"):
        storage.copy_checked(source, destination, etag=read.etag, size=read.size)
    with storage.open(source) as stored:
        assert stored.body.read() == b"other bytes"


def test_open_of_no_object_names_every_key(storage: Storage) -> None:
    named = r"input/none\.zip or s3://.*/processed/none\.zip"
    missing = storage.open("input/none.zip", "processed/none.zip")
    with pytest.raises(StorageError, match=named), missing:
        pass


def test_a_checked_copy_of_nothing_is_an_error_naming_the_key(storage: Storage) -> None:
    with pytest.raises(StorageError, match=r"input/nothing\.zip"):
        storage.copy_checked("input/nothing.zip", "processed/nothing.zip", etag='"0"')


def test_errors_carry_the_key_and_wrap_botocore(clean: Sandbox) -> None:
    wrong = Storage(
        "no-such-bucket-here",
        endpoint_url=clean.url("s3"),
        credentials_file=str(clean.aws_credentials),
        max_attempts=1,
    )

    with pytest.raises(StorageError, match=r"s3://no-such-bucket-here/k\.json") as raised:
        wrong.put_json("k.json", {})
    assert raised.value.__cause__ is not None
