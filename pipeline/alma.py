"""Alma client: adds item barcodes to the Digifeeds set through the Alma REST API."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import InvalidHeader, MaxRetryError
from urllib3.util.retry import Retry

from pipeline.barcodes import validate as validate_barcode
from pipeline.errors import (
    AlmaConfigurationError,
    AlmaError,
    AlmaQuotaError,
    ConfigurationError,
)

logger = logging.getLogger(__name__)

MAX_MEMBERS_PER_CALL = 1000


class AlmaCode(StrEnum):
    """Error codes Alma and its API gateway put in ``errorCode``."""

    NOT_VALID_MEMBER_ID = "60120"
    ALREADY_IN_SET = "60115"
    ALREADY_IN_SET_BY_ID_TYPE = "60176"
    INVALID_SET = "60107"
    TOO_MANY_MEMBERS = "60118"
    DUPLICATE_MEMBER = "60119"
    UNAUTHORIZED = "UNAUTHORIZED"
    PER_SECOND_THRESHOLD = "PER_SECOND_THRESHOLD"
    DAILY_THRESHOLD = "DAILY_THRESHOLD"
    FORBIDDEN = "FORBIDDEN"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    GENERAL_ERROR = "GENERAL_ERROR"


# Codes that name the barcodes they concern; those barcodes leave the call and it is retried.
_NOT_FOUND_CODES = frozenset({AlmaCode.NOT_VALID_MEMBER_ID})
_ALREADY_IN_SET_CODES = frozenset({AlmaCode.ALREADY_IN_SET, AlmaCode.ALREADY_IN_SET_BY_ID_TYPE})
_CONFIGURATION_CODES = frozenset({AlmaCode.UNAUTHORIZED, AlmaCode.FORBIDDEN, AlmaCode.INVALID_SET})
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_EXCERPT_CHARS = 200
# Only this much of a body is read for an excerpt (a proxy page can be megabytes).
_SCAN_CHARS = 65_536
# A run of this many characters of the key is masked wherever it appears; a shorter
# prefix of the key is masked where it ends a text.
_KEY_FRAGMENT_CHARS = 8
_KEY_PREFIX_CHARS = 4
_TAG = re.compile(r"<[^>]*>")
# "apikey <key>", "apikey=<key>", "api_key: <key>": the value is masked whatever it is.
_KEY_FORM = re.compile(r"(?i)(?:\bapikey[\s:=]+|\bapi[-_]key\s*[:=]\s*)([^\s\"',;]+)")


@dataclass
class AddResult:
    """What one :meth:`AlmaClient.add_members` call did with each barcode."""

    added: list[str] = field(default_factory=list)
    already_in_set: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AlmaErrorDetail:
    """One entry of an Alma ``errorList``."""

    code: str
    message: str
    tracking_id: str = ""


class RateLimiter:
    """Spaces calls at least ``1 / calls_per_second`` apart across processes.

    The next allowed call time is kept in a file under an exclusive ``fcntl`` lock,
    so forked Luigi workers sharing the file share one budget.
    """

    def __init__(self, path: Path, calls_per_second: float) -> None:
        if calls_per_second <= 0:
            raise ValueError(f"calls_per_second must be positive, not {calls_per_second!r}")
        self.path = Path(path)
        self.interval = 1.0 / calls_per_second

    def __repr__(self) -> str:
        return f"RateLimiter({str(self.path)!r}, {1.0 / self.interval!r})"

    def acquire(self) -> float:
        """Wait until a call is allowed; return the seconds waited."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            try:
                next_allowed = float(raw) if raw else 0.0
            except ValueError:
                next_allowed = 0.0
            now = time.time()
            slot = max(now, next_allowed)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{slot + self.interval:.6f}".encode("ascii"), 0)
        finally:
            os.close(fd)  # closing the descriptor releases the lock

        wait = slot - now
        if wait > 0:
            time.sleep(wait)
        return wait


class _Retry(Retry):
    """urllib3's retry policy, capping Retry-After and ignoring one it cannot parse."""

    max_retry_after = 60.0

    def get_retry_after(self, response: Any) -> float | None:
        try:
            seconds = super().get_retry_after(response)
        except InvalidHeader:
            return None
        return None if seconds is None else min(seconds, self.max_retry_after)


class AlmaClient:
    """Adds barcodes to one Alma set, with retries, a shared rate limit and named errors."""

    def __init__(
        self,
        base_url: str,
        set_id: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        rate_limiter: RateLimiter | None = None,
        session: requests.Session | None = None,
    ) -> None:
        if not api_key or not api_key.strip():
            raise AlmaConfigurationError("no Alma API key configured")
        if not set_id or not re.fullmatch(r"[A-Za-z0-9_-]+", set_id):
            raise ConfigurationError(f"{set_id!r} is not an Alma set ID")
        self.base_url = base_url.rstrip("/")
        self.set_id = set_id
        self._api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.rate_limiter = rate_limiter
        self.remaining: int | None = None
        self._retry = _Retry(
            total=retries,
            backoff_factor=backoff,
            backoff_jitter=backoff,
            allowed_methods=None,
            respect_retry_after_header=True,
        )
        if session is None:
            session = requests.Session()
            # Retries happen in _post, which reads the body first: a 429 may be the
            # per-second limit (retry) or the daily quota (do not), and only the body says.
            session.mount("https://", HTTPAdapter(max_retries=Retry(0, read=False)))
            session.mount("http://", HTTPAdapter(max_retries=Retry(0, read=False)))
        self._session = session

    def __repr__(self) -> str:
        return f"AlmaClient({self.base_url!r}, {self.set_id!r}, api_key='***')"

    def add_members(self, barcodes: Sequence[str]) -> AddResult:
        """Add ``barcodes`` to the set; sort out those Alma lacks or the set already holds.

        With ``fail_on_invalid_id=true`` Alma refuses the whole call when one member is
        unknown or already in the set, naming it. Named barcodes leave the call, which is
        sent again with the rest until it succeeds or nothing is left.
        """
        if isinstance(barcodes, str):
            raise TypeError("add_members takes a sequence of barcodes, not one string")
        pending = list(dict.fromkeys(validate_barcode(b) for b in barcodes))
        if len(pending) > MAX_MEMBERS_PER_CALL:
            raise ValueError(
                f"{len(pending)} barcodes given; Alma takes at most {MAX_MEMBERS_PER_CALL} per call"
            )
        result = AddResult()
        single = pending[0] if len(pending) == 1 else None

        while pending:
            logger.info("adding %s barcode(s) to Alma set %s", len(pending), self.set_id)
            response = self._post(pending, single)
            if 200 <= response.status_code < 300:
                self._check_set_object(response, single, len(pending))
                result.added.extend(pending)
                break

            errors = self._errors(response, single)
            not_found = _named(errors, _NOT_FOUND_CODES, pending)
            already = _named(errors, _ALREADY_IN_SET_CODES, pending)
            if not (not_found or already):
                self._raise(errors, response.status_code, single, len(pending))
            result.not_found.extend(not_found)
            result.already_in_set.extend(already)
            pending = [b for b in pending if b not in not_found and b not in already]

        for barcode in result.added:
            logger.info("%s: added to Alma set %s", barcode, self.set_id)
        for barcode in result.already_in_set:
            logger.info("%s: already in Alma set %s", barcode, self.set_id)
        for barcode in result.not_found:
            logger.warning("%s: not found in Alma", barcode)
        return result

    def _post(self, members: Sequence[str], barcode: str | None) -> requests.Response:
        """Send one add_members call, retrying faults; return the final answer."""
        url = f"{self.base_url}/conf/sets/{self.set_id}"
        params = {"op": "add_members", "id_type": "BARCODE", "fail_on_invalid_id": "true"}
        body = {"members": {"member": [{"id": member} for member in members]}}
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/json",
            "Authorization": f"apikey {self._api_key}",
        }
        retry: Retry = self._retry
        label = barcode or f"{len(members)} barcodes"

        while True:
            if self.rate_limiter is not None:
                self.rate_limiter.acquire()
            try:
                response = self._session.post(
                    url, params=params, json=body, headers=headers, timeout=self.timeout
                )
            except requests.RequestException as exc:
                retry = self._next_try(retry, url, barcode, label, error=exc)
                retry.sleep()
                continue

            self._note_remaining(response)
            if not self._is_transient(response):
                return response
            retry = self._next_try(retry, url, barcode, label, response=response)
            retry.sleep(response.raw)

    def _check_set_object(
        self, response: requests.Response, barcode: str | None, members: int
    ) -> None:
        """Raise AlmaError unless a 2xx answer's body is this set's object.

        Alma answers a successful add_members with the set (JSON with its ``id``, or
        XML whose root is ``<set>``); a proxy's page or an empty body proves nothing.
        """
        problem = _set_object_problem(response.text, self.set_id)
        if problem is None:
            return
        problem = self._scrub(problem)
        excerpt = self._excerpt(response.text) or "empty body"
        call = f" (call of {members} barcodes)" if barcode is None else ""
        raise AlmaError(
            f"Alma set {self.set_id}: HTTP {response.status_code} answer is not the set"
            f" object ({problem}){call}, so nothing counts as added: {excerpt}",
            barcode=barcode,
            http_status=response.status_code,
        )

    def _is_transient(self, response: requests.Response) -> bool:
        """Tell whether an answer is worth retrying: a 5xx, or a 429 that is not the quota."""
        if response.status_code not in _RETRY_STATUSES:
            return False
        if response.status_code == 429:
            codes = {error.code for error in _parse_errors(response.text)}
            return AlmaCode.DAILY_THRESHOLD not in codes
        return True

    def _next_try(
        self,
        retry: Retry,
        url: str,
        barcode: str | None,
        label: str,
        *,
        response: requests.Response | None = None,
        error: Exception | None = None,
    ) -> Retry:
        """Count one failed try; raise AlmaError when the retries are spent."""
        if response is not None:
            what = f"HTTP {response.status_code}"
            codes = [e.code for e in _parse_errors(response.text)]
            if codes:
                what += f" {codes[0]}"
        else:
            what = self._scrub(f"{type(error).__name__}: {error}", markup=False)

        try:
            # urllib3 counts a response with a status it was told to retry as a status
            # retry; a requests exception counts as an "other" error.
            retry = retry.increment(
                method="POST",
                url=url,
                response=response.raw if response is not None else None,
                error=error if response is None else None,
            )
        except MaxRetryError:
            attempts = len(retry.history) + 1
            if response is not None:
                errors = self._errors(response, barcode, attempts)
                self._raise(errors, response.status_code, barcode, None, attempts)
            raise AlmaError(
                f"Alma did not answer after {attempts} tries: {what}", barcode=barcode
            ) from error

        logger.warning(
            "%s: Alma set %s: %s; retry %s of %s",
            label,
            self.set_id,
            what,
            len(retry.history),
            self.retries,
        )
        return retry

    def _note_remaining(self, response: requests.Response) -> None:
        value = response.headers.get("X-Exl-Api-Remaining")
        if value is None:
            return
        try:
            self.remaining = int(value.strip())
        except ValueError:
            logger.debug("ignoring an unreadable X-Exl-Api-Remaining header")

    def _errors(
        self, response: requests.Response, barcode: str | None, attempts: int = 1
    ) -> list[AlmaErrorDetail]:
        """Return the errors in an answer's body, or raise AlmaError if it holds none."""
        errors = _parse_errors(response.text)
        if errors:
            return [
                AlmaErrorDetail(e.code, self._scrub(e.message), self._scrub(e.tracking_id))
                for e in errors
            ]
        excerpt = self._excerpt(response.text) or "empty body"
        tries = f" after {attempts} tries" if attempts > 1 else ""
        raise AlmaError(
            f"Alma answered HTTP {response.status_code}{tries} without an error list: {excerpt}",
            barcode=barcode,
            http_status=response.status_code,
        )

    def _raise(
        self,
        errors: Sequence[AlmaErrorDetail],
        status: int,
        barcode: str | None,
        members: int | None,
        attempts: int = 1,
    ) -> NoReturn:
        """Raise the error type that matches the first Alma error code."""
        first = errors[0]
        message = f"Alma set {self.set_id}: {first.code} {first.message}".rstrip()
        if members is not None and barcode is None:
            message += f" (call of {members} barcodes)"
        if first.tracking_id:
            message += f" [tracking ID {first.tracking_id}]"
        message += f" (HTTP {status}"
        message += f", after {attempts} tries)" if attempts > 1 else ")"

        error_type: type[AlmaError] = AlmaError
        if first.code in _CONFIGURATION_CODES:
            error_type = AlmaConfigurationError
        elif first.code == AlmaCode.DAILY_THRESHOLD:
            error_type = AlmaQuotaError
        raise error_type(message, barcode=barcode, code=first.code, http_status=status)

    def _scrub(self, text: str, *, markup: bool = True) -> str:
        """Mask the API key in text that may be echoed in a log line or an error.

        With ``markup`` (text from a body), tags are taken out too, so that a key cut
        in two by a tag is still found.
        """
        return _redact(text, self._api_key, markup=markup)

    def _excerpt(self, body: str) -> str:
        """Shorten a body to one line of printable text, without markup or the key.

        The key is masked before the body is cut, so a cut cannot split it; a prefix
        of the key left at the end of the cut text is masked as well.
        """
        text = _redact(body[:_SCAN_CHARS], self._api_key)
        if len(text) <= _EXCERPT_CHARS:
            return text
        return _mask_key_prefix_at_end(text[:_EXCERPT_CHARS], self._api_key) + "..."


def _named(
    errors: Sequence[AlmaErrorDetail], codes: frozenset[AlmaCode], pending: Sequence[str]
) -> list[str]:
    """Return the pending barcodes that errors with one of ``codes`` name, in call order."""
    words: set[str] = set()
    for error in errors:
        if error.code in codes:
            words.update(re.findall(r"[A-Za-z0-9._-]+", error.message))
    return [barcode for barcode in pending if barcode in words]


def _parse_errors(text: str) -> list[AlmaErrorDetail]:
    """Read Alma's error list from a JSON or XML body; return [] for anything else."""
    stripped = text.strip()
    if stripped.startswith("{"):
        return _json_errors(stripped)
    if stripped.startswith("<"):
        return _xml_errors(stripped)
    return []


def _json_errors(text: str) -> list[AlmaErrorDetail]:
    try:
        document = json.loads(text)
    except ValueError:
        return []
    if isinstance(document, dict) and isinstance(document.get("web_service_result"), dict):
        document = document["web_service_result"]
    if not isinstance(document, dict) or not isinstance(document.get("errorList"), dict):
        return []
    entries = document["errorList"].get("error")
    if isinstance(entries, dict):
        entries = [entries]
    if not isinstance(entries, list):
        return []
    return [
        AlmaErrorDetail(
            code=str(entry.get("errorCode") or "").strip(),
            message=str(entry.get("errorMessage") or "").strip(),
            tracking_id=str(entry.get("trackingId") or "").strip(),
        )
        for entry in entries
        if isinstance(entry, dict) and entry.get("errorCode")
    ]


def _xml_errors(text: str) -> list[AlmaErrorDetail]:
    try:
        # NOTE: ElementTree resolves no external entities and the bundled expat refuses
        # entity-expansion bombs, so parsing a body from Alma (or a proxy) is safe here.
        root = ET.fromstring(text)  # noqa: S314
    except ET.ParseError:
        return []
    details = []
    for element in root.iter():
        if _local(element.tag) != "error":
            continue
        parts = {_local(child.tag): (child.text or "").strip() for child in element}
        if parts.get("errorCode"):
            details.append(
                AlmaErrorDetail(
                    parts["errorCode"], parts.get("errorMessage", ""), parts.get("trackingId", "")
                )
            )
    return details


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _set_object_problem(text: str, set_id: str) -> str | None:
    """Say why a success body is not the set object ``set_id``; None when it is."""
    stripped = text.strip().lstrip("\ufeff")
    if not stripped:
        return "empty body"
    found: str | None
    if stripped.startswith("{"):
        try:
            document = json.loads(stripped)
        except ValueError:
            return "unreadable JSON"
        if not isinstance(document, dict) or "id" not in document:
            return "JSON without the set's id"
        found = str(document["id"]).strip()
    elif stripped.startswith("<"):
        try:
            # NOTE: safe for the reasons given in _xml_errors.
            root = ET.fromstring(stripped)  # noqa: S314
        except ET.ParseError:
            return "not XML"
        if _local(root.tag) != "set":
            return f"XML root {_local(root.tag)[:40]!r}, not 'set'"
        element = next((child for child in root if _local(child.tag) == "id"), None)
        found = None if element is None else (element.text or "").strip()
    else:
        return "neither JSON nor XML"
    if found is not None and found != set_id:
        return f"the set's id is {found[:40]!r}"
    return None


def _redact(text: str, key: str, *, markup: bool = True) -> str:
    """Return ``text`` as one line of printable text, without markup and with the key masked.

    The key is looked for in the text with its markup removed, so that a tag cannot
    split it; masked are the key, the value of any ``apikey <value>`` form, any run
    of the key of ``_KEY_FRAGMENT_CHARS`` characters or more, and a prefix of the
    key that ends the text. Masked characters (and the tags among them) become ``***``.
    """
    # Split into visible characters and tags, keeping where each visible one lies.
    pieces: list[tuple[str, bool]] = []  # (text, is_tag)
    position = 0
    for match in _TAG.finditer(text) if markup else ():
        if match.start() > position:
            pieces.append((text[position : match.start()], False))
        pieces.append((match.group(), True))
        position = match.end()
    if position < len(text):
        pieces.append((text[position:], False))
    visible = "".join(piece for piece, is_tag in pieces if not is_tag)
    masked = _key_mask(visible, key)

    out: list[str] = []
    index = 0
    in_run = False
    for piece, is_tag in pieces:
        if is_tag:
            # A tag inside a masked run vanishes into it; any other tag is a space.
            next_masked = index < len(visible) and masked[index]
            if not (in_run and next_masked):
                out.append(" ")
                in_run = False
            continue
        for char in piece:
            if masked[index]:
                if not in_run:
                    out.append("***")
                    in_run = True
            else:
                out.append(char if char.isprintable() else " ")
                in_run = False
            index += 1
    return " ".join("".join(out).split())


def _key_mask(text: str, key: str) -> list[bool]:
    """Mark the characters of ``text`` that are the key, part of it, or an apikey value."""
    masked = [False] * len(text)

    def mark(start: int, end: int) -> None:
        for index in range(start, end):
            masked[index] = True

    for match in _KEY_FORM.finditer(text):
        mark(match.start(1), match.end(1))
    start = text.find(key)
    while start >= 0:
        mark(start, start + len(key))
        start = text.find(key, start + 1)
    size = min(_KEY_FRAGMENT_CHARS, len(key))
    fragments = {key[i : i + size] for i in range(len(key) - size + 1)}
    for start in range(len(text) - size + 1):
        if text[start : start + size] in fragments:
            mark(start, start + size)
    prefix = _key_prefix_at_end(text, key)
    if prefix:
        mark(len(text) - prefix, len(text))
    return masked


def _key_prefix_at_end(text: str, key: str) -> int:
    """Length of the longest prefix of the key (at least a few characters) ending ``text``."""
    for length in range(min(len(key), len(text)), _KEY_PREFIX_CHARS - 1, -1):
        if text.endswith(key[:length]):
            return length
    return 0


def _mask_key_prefix_at_end(text: str, key: str) -> str:
    length = _key_prefix_at_end(text, key)
    return text[: len(text) - length] + "***" if length else text
