"""The S3 client: zips in, zips moved on, markers written and read."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import boto3
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.errors import ObjectChangedError, StorageError

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

_MISSING = {"404", "NoSuchKey", "NotFound"}
# A condition on the object (If-Match, CopySourceIfMatch) did not hold.
_CHANGED = {"412", "PreconditionFailed"}


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class Storage:
    """Typed verbs over one S3 bucket, on one shared boto3 client.

    Every failure is raised as :class:`StorageError` carrying the key; a missing
    object is an answer (``None`` or ``False``), not an error.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        credentials_file: str | None = None,
        max_attempts: int = 5,
        timeout: float = 60.0,
        chunk_size: int = 64 * 1024 * 1024,
    ) -> None:
        self.bucket = bucket
        self.chunk_size = chunk_size
        core = botocore.session.Session()
        if credentials_file:
            core.set_config_variable("credentials_file", credentials_file)
        session = boto3.Session(botocore_session=core, region_name=region)
        self.client = session.client(
            "s3",
            endpoint_url=endpoint_url or None,
            config=Config(
                retries={"mode": "standard", "max_attempts": max_attempts},
                connect_timeout=timeout,
                read_timeout=timeout,
                max_pool_connections=16,
            ),
        )
        self.transfer = TransferConfig(
            multipart_threshold=chunk_size, multipart_chunksize=chunk_size, use_threads=True
        )

    def __repr__(self) -> str:
        return f"Storage(bucket={self.bucket!r})"

    def url(self, key: str) -> str:
        """Name an object the way operators read it in logs."""
        return f"s3://{self.bucket}/{key}"

    def head(self, key: str) -> dict[str, Any] | None:
        """Return an object's metadata, or None when there is no object at exactly ``key``."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                return None
            raise StorageError(f"cannot read {self.url(key)}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot read {self.url(key)}: {exc}") from exc

    def exists(self, key: str) -> bool:
        """Tell whether an object is stored at exactly ``key`` (one HEAD request)."""
        return self.head(key) is not None

    def get_json(self, key: str) -> dict[str, Any] | None:
        """Return the JSON object stored at ``key``, or None when there is none."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in _MISSING:
                return None
            raise StorageError(f"cannot read {self.url(key)}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot read {self.url(key)}: {exc}") from exc
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise StorageError(f"{self.url(key)} does not hold JSON") from exc
        if not isinstance(data, dict):
            raise StorageError(f"{self.url(key)} does not hold a JSON object")
        return data

    def put_json(self, key: str, data: dict[str, Any], *, only_if_absent: bool = False) -> bool:
        """Store ``data`` at ``key``; with ``only_if_absent``, never replace an object.

        Returns False when ``only_if_absent`` was asked and an object was already there.
        """
        body = json.dumps(data, sort_keys=True).encode("utf-8")
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if only_if_absent else {}
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType="application/json",
                ChecksumAlgorithm="SHA256",
                **extra,
            )
        except ClientError as exc:
            if only_if_absent and _error_code(exc) in _CHANGED:
                return False
            raise StorageError(f"cannot write {self.url(key)}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot write {self.url(key)}: {exc}") from exc
        return True

    def delete(self, key: str) -> None:
        """Delete the object at ``key``; deleting a missing object is not an error."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot delete {self.url(key)}: {exc}") from exc

    def list(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Yield every object under ``prefix`` (one request per thousand objects)."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Contents", [])
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot list {self.url(prefix)}: {exc}") from exc

    def upload_verified(self, path: Path, key: str, *, progress: Progress | None = None) -> None:
        """Upload a file with a SHA-256 checksum S3 verifies, then confirm the stored object.

        Multipart for files of ``chunk_size`` and more; each part is checked by the
        server as it arrives. The stored size and checksum are compared with the local
        file before this returns, so the caller may delete its copy afterwards.
        """
        size = path.stat().st_size
        expected = self._expected_checksum(path, size)
        done = 0

        def on_bytes(count: int) -> None:
            nonlocal done
            done += count
            if progress:
                progress(done, size)

        try:
            self.client.upload_file(
                str(path),
                self.bucket,
                key,
                ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                Config=self.transfer,
                Callback=on_bytes,
            )
        except (ClientError, BotoCoreError, OSError) as exc:
            raise StorageError(f"cannot upload {path} to {self.url(key)}: {exc}") from exc

        stored = self.head(key)
        if stored is None:
            raise StorageError(f"{self.url(key)} is missing right after its upload")
        stored_sum = str(stored.get("ChecksumSHA256", "")).split("-")[0]
        if stored["ContentLength"] != size or stored_sum != expected:
            raise StorageError(
                f"{self.url(key)} does not match {path}: {stored['ContentLength']} bytes, "
                f"SHA-256 {stored_sum or 'absent'}; expected {size} bytes, {expected}"
            )

    def _expected_checksum(self, path: Path, size: int) -> str:
        """Return the SHA-256 S3 reports for this file uploaded with our part size.

        For a multipart upload S3 reports the SHA-256 of the parts' digests.
        """
        digests = []
        whole = hashlib.sha256()
        with path.open("rb") as source:
            while chunk := source.read(self.chunk_size):
                digests.append(hashlib.sha256(chunk).digest())
                whole.update(chunk)
        if size < self.transfer.multipart_threshold:
            digest = whole.digest()
        else:
            digest = hashlib.sha256(b"".join(digests)).digest()
        return base64.b64encode(digest).decode("ascii")

    @contextlib.contextmanager
    def open(self, *keys: str) -> Iterator[StoredObject]:
        """Open the first of ``keys`` that holds an object, for streaming (one GET each).

        Raises :class:`StorageError` when none of them does.
        """
        for key in keys:
            try:
                answer = self.client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _error_code(exc) in _MISSING:
                    continue
                raise StorageError(f"cannot read {self.url(key)}: {exc}") from exc
            except BotoCoreError as exc:
                raise StorageError(f"cannot read {self.url(key)}: {exc}") from exc
            stored = StoredObject(key, answer["Body"], answer["ContentLength"], answer["ETag"])
            try:
                yield stored
            finally:
                stored.body.close()
            return
        raise StorageError(f"cannot read {' or '.join(map(self.url, keys))}: no such object")

    def copy_checked(
        self, source: str, destination: str, *, etag: str, size: int | None = None
    ) -> None:
        """Copy the object at ``source``, if it is the object ``etag`` names; confirm the copy.

        Safe to repeat. A source that is another object now (another ETag) is refused
        with :class:`ObjectChangedError`, and nothing is copied. Given its ``size``,
        an object under the multipart threshold is copied in one request, which is all
        when the copy's ETag is the source's. Otherwise the source is looked at first;
        a destination that already holds an object of that ETag is kept; else the
        object is copied, only if it is still that object, and the copy's size is
        confirmed by HEAD. A source that is gone while the destination is there was
        copied (and deleted) before.
        """
        small = size is not None and size < self.transfer.multipart_threshold
        if small and self._copy_if_match(source, etag, destination) == etag:
            return
        # Large, or the source is gone, or the copy's ETag differs (as under KMS).
        stored = self.head(source)
        if stored is None:
            if self.exists(destination):
                logger.info("%s was already copied to %s", self.url(source), destination)
                return
            raise StorageError(
                f"cannot copy {self.url(source)}: neither it nor {destination} exists"
            )
        if stored["ETag"] != etag:
            raise ObjectChangedError(
                f"{self.url(source)} is not the object expected: its ETag is "
                f"{stored['ETag']}, not {etag}; not copying it"
            )
        earlier = self.head(destination)
        if earlier is not None and earlier["ETag"] == etag:
            return
        try:
            self.client.copy(
                {"Bucket": self.bucket, "Key": source},
                self.bucket,
                destination,
                ExtraArgs={"ChecksumAlgorithm": "SHA256", "CopySourceIfMatch": etag},
                Config=self.transfer,
            )
        except ClientError as exc:
            if _error_code(exc) in _CHANGED:
                raise ObjectChangedError(
                    f"{self.url(source)} changed while it was copied; not copying it"
                ) from exc
            raise StorageError(f"cannot copy {self.url(source)} to {destination}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot copy {self.url(source)} to {destination}: {exc}") from exc
        copied_head = self.head(destination)
        if copied_head is None or copied_head["ContentLength"] != stored["ContentLength"]:
            raise StorageError(f"copy of {self.url(source)} to {destination} is incomplete")

    def _copy_if_match(self, source: str, etag: str, destination: str) -> str | None:
        """Copy ``source`` in one request if its ETag is ``etag``; return the copy's ETag.

        None when the source is gone.
        """
        try:
            answer = self.client.copy_object(
                Bucket=self.bucket,
                Key=destination,
                CopySource={"Bucket": self.bucket, "Key": source},
                CopySourceIfMatch=etag,
                ChecksumAlgorithm="SHA256",
            )
        except ClientError as exc:
            code = _error_code(exc)
            if code in _MISSING:
                return None
            if code in _CHANGED:
                raise ObjectChangedError(
                    f"{self.url(source)} is not the object expected (ETag {etag}); not copying it"
                ) from exc
            raise StorageError(f"cannot copy {self.url(source)} to {destination}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot copy {self.url(source)} to {destination}: {exc}") from exc
        return str(answer.get("CopyObjectResult", {}).get("ETag", ""))


@dataclasses.dataclass
class StoredObject:
    """An object opened for reading: its key, its streaming body, its size and ETag."""

    key: str
    body: IO[bytes]
    size: int
    etag: str
