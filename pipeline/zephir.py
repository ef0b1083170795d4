"""Zephir client: asks HathiTrust's metadata system whether it has a record for a barcode."""

from __future__ import annotations

import json
import logging
import re
import socket
import xml.etree.ElementTree as ET
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.retry import Retry

from pipeline.barcodes import validate as validate_barcode
from pipeline.errors import ZephirError

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://zephir.cdlib.org/api"
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
_EXCERPT_CHARS = 120


class ZephirClient:
    """Looks up ``mdp.<barcode>`` in Zephir; only a 200 means the record is there."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            backoff_factor=backoff,
            backoff_jitter=backoff,
            allowed_methods=frozenset({"GET"}),
            status_forcelist=_RETRY_STATUSES,
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        self._session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def __repr__(self) -> str:
        return f"ZephirClient({self.base_url!r})"

    def has_record(self, barcode: str) -> bool:
        """Tell whether Zephir has ``mdp.<barcode>``; raise ZephirError if it cannot say."""
        validate_barcode(barcode)
        url = f"{self.base_url}/item/mdp.{barcode}"
        try:
            response = self._session.get(
                url, headers={"Accept": "application/json"}, timeout=self.timeout
            )
        except requests.RequestException as exc:
            what = f"timed out after {self.timeout:g} s" if _is_timeout(exc) else type(exc).__name__
            raise ZephirError(
                f"Zephir did not answer for {url} (tried {self.retries + 1} times): {what}",
                barcode=barcode,
            ) from exc

        status = response.status_code
        if status == 200:
            if not _is_record_of(response.text, f"mdp.{barcode}"):
                raise ZephirError(
                    f"Zephir's 200 answer is not a Zephir record for mdp.{barcode}"
                    f" ({url}): {_excerpt(response.text) or 'empty body'}",
                    barcode=barcode,
                )
            logger.info("%s: found in Zephir", barcode)
            return True
        if status == 404:
            logger.info("%s: not in Zephir yet", barcode)
            return False
        if status == 422:
            raise ZephirError(
                f"Zephir called mdp.{barcode} an unacceptable identifier (HTTP 422)",
                barcode=barcode,
            )
        if status in _RETRY_STATUSES:
            raise ZephirError(
                f"Zephir failed with HTTP {status} for {url} (tried {self.retries + 1} times)",
                barcode=barcode,
            )
        raise ZephirError(f"Zephir answered HTTP {status} for {url}", barcode=barcode)


def _is_timeout(exc: BaseException) -> bool:
    """Tell whether a requests error is, underneath, a timeout.

    Once urllib3 has spent its read retries on timeouts, requests reports a
    ConnectionError wrapping a MaxRetryError whose reason is the timeout.
    """
    seen: set[int] = set()
    pending: list[Any] = [exc]
    while pending:
        error = pending.pop()
        if not isinstance(error, BaseException) or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, NewConnectionError):
            # urllib3 makes a refused connection a subclass of its connect timeout.
            continue
        if isinstance(error, requests.Timeout | Urllib3Timeout | socket.timeout):
            return True
        if isinstance(error, MaxRetryError):
            pending.append(error.reason)
        pending.extend(error.args)
        pending.extend([error.__cause__, error.__context__])
    return False


def _is_record_of(text: str, item_id: str) -> bool:
    """Tell whether a body is a record (MARC JSON or XML) that holds ``item_id``.

    Zephir's records carry the item ID in field 974 $u; a proxy's or login page,
    even one whose links name the item, is not a record.
    """
    stripped = text.strip().lstrip("\ufeff")
    if stripped.startswith(("{", "[")):
        try:
            document = json.loads(stripped)
        except ValueError:
            return False
        return isinstance(document, dict) and _json_holds(document, item_id)
    if stripped.startswith("<"):
        try:
            # NOTE: ElementTree resolves no external entities and the bundled expat
            # refuses entity-expansion bombs, so parsing this body is safe.
            root = ET.fromstring(stripped)  # noqa: S314
        except ET.ParseError:
            return False
        if root.tag.rsplit("}", 1)[-1].lower() == "html":
            return False
        return any((element.text or "").strip() == item_id for element in root.iter())
    return False


def _json_holds(value: Any, item_id: str) -> bool:
    pending = [value]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if value.strip() == item_id:
                return True
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


def _excerpt(text: str) -> str:
    """Shorten a body to one line of printable text, without markup."""
    text = re.sub(r"<[^>]*>", " ", text[:65_536])
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + "..."
