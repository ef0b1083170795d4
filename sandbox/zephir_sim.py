"""Zephir simulator: ``GET /api/item/mdp.<barcode>`` as DOMAIN.md describes it, over real HTTP.

Run ``python -m sandbox.zephir_sim --port 8483`` to serve until killed.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import escape

from sandbox.alma_sim import (
    Fault,
    SimRequest,
    SimResponse,
    Simulator,
    SimulatorControl,
    html_page,
    json_response,
)

logger = logging.getLogger(__name__)

_ITEM_PATH = re.compile(r"/item/(?P<identifier>[^/]*)")
_IDENTIFIER = re.compile(r"mdp\.(?P<barcode>\d{14})")
_NOT_FOUND = {"status": 404, "message": "Not Found"}


class ZephirSimulator(Simulator):
    """Zephir's item lookup, with records that appear at a known time.

    Every well-formed ``mdp.<14 digits>`` has a record unless marked absent, or, with
    ``default_present=False``, none has one unless marked present.
    """

    api_prefix = "/api"
    name = "zephir-sim"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        default_present: bool = True,
        present: Iterable[str] = (),
        absent: Iterable[str] = (),
        appeared_at: datetime | None = None,
    ) -> None:
        super().__init__(host, port)
        self._initial = (default_present, tuple(present), tuple(absent))
        self._default_appeared_at = appeared_at or datetime.now(UTC)
        self._restore()

    def __repr__(self) -> str:
        return f"ZephirSimulator({self.url!r})"

    def _restore(self) -> None:
        default_present, present, absent = self._initial
        with self._lock:
            self._default_present = default_present
            self._present: dict[str, datetime] = dict.fromkeys(present, self._default_appeared_at)
            self._absent: set[str] = set(absent)

    def reset(self) -> None:
        super().reset()
        self._restore()

    def appeared_at(self, barcode: str) -> datetime | None:
        """When the record for ``barcode`` appeared, or None if there is none."""
        with self._lock:
            if barcode in self._present:
                return self._present[barcode]
            if self._default_present and barcode not in self._absent:
                return self._default_appeared_at
            return None

    # -- request handling

    def barcodes_of(self, request: SimRequest) -> list[str]:
        match = _ITEM_PATH.fullmatch(request.path.removeprefix(self.api_prefix))
        if match is None:
            return []
        identifier = match.group("identifier")
        return [identifier.removeprefix("mdp.")]

    def log_fields(self, request: SimRequest) -> dict[str, Any]:
        return {"accept": request.header("Accept")}

    def fault_response(self, fault: Fault, request: SimRequest) -> SimResponse:
        status = fault.status or 500
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        if fault.body is not None:
            content_type = fault.content_type or "text/plain"
            return SimResponse(status, fault.body.encode(), content_type, headers)
        if fault.shape == "html":
            return SimResponse(status, html_page(status), "text/html", headers)
        if fault.shape == "empty":
            return SimResponse(status, b"", "text/plain", headers)
        message = fault.message or _reason(status)
        return json_response(status, {"status": status, "message": message}, headers)

    def respond(self, request: SimRequest) -> SimResponse:
        match = _ITEM_PATH.fullmatch(request.path.removeprefix(self.api_prefix))
        if request.method != "GET" or not request.path.startswith(self.api_prefix) or not match:
            return json_response(404, _NOT_FOUND)
        identifier = match.group("identifier")
        valid = _IDENTIFIER.fullmatch(identifier)
        if valid is None:
            return json_response(
                422, {"status": 422, "message": f"Unacceptable identifier: {identifier}"}
            )
        barcode = valid.group("barcode")
        appeared = self.appeared_at(barcode)
        if appeared is None:
            return json_response(404, _NOT_FOUND)
        if "application/json" in request.header("Accept"):
            return json_response(200, _marc_json(identifier, appeared))
        return SimResponse(200, _marc_xml(identifier, appeared), "application/xml")

    # -- control

    def control(self, method: str, path: str, query: dict[str, str], payload: Any) -> Any:
        if (method, path) == ("POST", "/_sim/records"):
            when = payload.get("appeared_at")
            appeared = datetime.fromisoformat(when) if when else datetime.now(UTC)
            if appeared.tzinfo is None:
                appeared = appeared.replace(tzinfo=UTC)
            with self._lock:
                if "default_present" in payload:
                    self._default_present = bool(payload["default_present"])
                for barcode in _strings(payload.get("absent", [])):
                    self._present.pop(barcode, None)
                    self._absent.add(barcode)
                for barcode in _strings(payload.get("present", [])):
                    self._absent.discard(barcode)
                    self._present[barcode] = appeared
            return self._records()
        if (method, path) == ("GET", "/_sim/records"):
            return self._records()
        raise LookupError(path)

    def _records(self) -> dict[str, Any]:
        with self._lock:
            return {
                "default_present": self._default_present,
                "default_appeared_at": self._default_appeared_at.isoformat(),
                "present": {b: t.isoformat() for b, t in sorted(self._present.items())},
                "absent": sorted(self._absent),
            }


def _strings(values: Any) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError("expected a list of strings")
    return values


def _reason(status: int) -> str:
    return {500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")


def _marc_json(identifier: str, appeared: datetime) -> dict[str, Any]:
    """A small MARC-in-JSON record whose 974 names the item and when it appeared."""
    return {
        "leader": "00000nam a2200000 a 4500",
        "fields": [
            {"001": f"sim{identifier.removeprefix('mdp.')}"},
            {"245": {"ind1": "0", "ind2": "0", "subfields": [{"a": "Simulated volume"}]}},
            {
                "974": {
                    "ind1": " ",
                    "ind2": " ",
                    "subfields": [{"u": identifier}, {"d": appeared.strftime("%Y%m%d")}],
                }
            },
        ],
        "appeared_at": appeared.isoformat(),
    }


def _marc_xml(identifier: str, appeared: datetime) -> bytes:
    """The MARC-XML form of :func:`_marc_json`."""
    item = escape(identifier)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<collection xmlns="http://www.loc.gov/MARC21/slim"><record>'
        "<leader>00000nam a2200000 a 4500</leader>"
        f'<controlfield tag="001">sim{item.removeprefix("mdp.")}</controlfield>'
        '<datafield tag="245" ind1="0" ind2="0"><subfield code="a">Simulated volume</subfield>'
        "</datafield>"
        f'<datafield tag="974" ind1=" " ind2=" "><subfield code="u">{item}</subfield>'
        f'<subfield code="d">{appeared.strftime("%Y%m%d")}</subfield></datafield>'
        "</record></collection>"
    ).encode()


class ZephirControl(SimulatorControl):
    """Drives a :class:`ZephirSimulator` over HTTP."""

    def mark_present(self, *barcodes: str, appeared_at: datetime | None = None) -> None:
        payload: dict[str, Any] = {"present": list(barcodes)}
        if appeared_at is not None:
            payload["appeared_at"] = appeared_at.isoformat()
        self.call("POST", "records", payload)

    def mark_absent(self, *barcodes: str) -> None:
        self.call("POST", "records", {"absent": list(barcodes)})

    def set_default_present(self, present: bool) -> None:
        self.call("POST", "records", {"default_present": present})

    def records(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.call("GET", "records")
        return answer


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a Zephir simulator until killed."""
    parser = argparse.ArgumentParser(prog="python -m sandbox.zephir_sim", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--default-absent",
        action="store_true",
        help="no barcode has a record until marked present (default: every one has)",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO)
    ZephirSimulator(args.host, args.port, default_present=not args.default_absent).serve_forever()


if __name__ == "__main__":
    main()
