"""Zephir client: asks HathiTrust's metadata system whether it has a record for a barcode."""

from __future__ import annotations

import logging

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pipeline.barcodes import validate as validate_barcode
from pipeline.errors import ZephirError

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://zephir.cdlib.org/api"
_RETRY_STATUSES = frozenset({500, 502, 503, 504})


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
            raise ZephirError(
                f"Zephir did not answer for {url} (tried {self.retries + 1} times): "
                f"{type(exc).__name__}",
                barcode=barcode,
            ) from exc

        status = response.status_code
        if status == 200:
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
