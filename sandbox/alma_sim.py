"""Alma simulator: the set add_members API as DOMAIN.md describes it, over real HTTP.

It also holds the machinery both simulators share: the server thread, the fault
injection, the request log and the ``/_sim/`` control API with its Python client.

Run ``python -m sandbox.alma_sim --port 8482 --api-key-file key.txt --set-id 123`` to
serve until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs, urlencode, urlsplit
from xml.sax.saxutils import escape

logger = logging.getLogger(__name__)

MAX_MEMBERS = 1000
_LOG_LIMIT = 10_000
_SHAPES = frozenset({"json", "json_single", "wrapped", "xml", "html", "empty"})
_DEFAULT_BARCODE = re.compile(r"39015\d{9}")


# -- shared machinery -----------------------------------------------------------------


@dataclass
class Fault:
    """A wrong answer to give instead of the normal one.

    It matches requests that concern ``barcode`` (or any request when ``barcode`` is
    None) and is used up after ``count`` matches (never, when ``count`` is None).
    ``latency`` delays the answer; ``drop`` closes the socket without answering; a
    ``status`` answers with that status, an error ``code`` and ``message`` in the
    body ``shape`` (json, json_single, wrapped, xml, html, empty) or the raw ``body``.
    A fault with only ``latency`` delays the normal answer.
    """

    status: int | None = None
    code: str | None = None
    message: str | None = None
    barcode: str | None = None
    count: int | None = 1
    retry_after: str | None = None
    latency: float = 0.0
    drop: bool = False
    shape: str | None = None
    body: str | None = None
    content_type: str | None = None
    echo_authorization: bool = False

    @classmethod
    def from_json(cls, data: Any) -> Fault:
        """Build a fault from a control API payload, rejecting unknown keys."""
        if not isinstance(data, dict):
            raise ValueError("a fault is a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        fault = cls(**data)
        if fault.shape is not None and fault.shape not in _SHAPES:
            raise ValueError(f"shape must be one of {sorted(_SHAPES)}")
        if fault.retry_after is not None:
            fault.retry_after = str(fault.retry_after)
        if fault.status is None and not fault.drop and not fault.latency:
            raise ValueError("a fault needs a status, drop or latency")
        return fault


@dataclass
class SimRequest:
    """A request to the simulated API, as the handler read it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw_body: bytes

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


@dataclass
class SimResponse:
    """An answer to write back."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


DROP = SimResponse(status=0)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    simulator: Simulator


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The headers and the body go out in two writes; without TCP_NODELAY the body
    # waits for the client's delayed ACK, tens of milliseconds a request.
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self.server.simulator.dispatch(self)

    do_POST = do_GET
    do_PUT = do_GET
    do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        # The request line may hold a key in its query string; log nothing of it.
        pass


class Simulator:
    """Base of the simulators: a threaded HTTP server, faults, a request log, /_sim/."""

    api_prefix: ClassVar[str] = ""
    name: ClassVar[str] = "simulator"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._faults: list[Fault] = []
        self._log: list[dict[str, Any]] = []
        self._generation = 0

    # -- lifecycle

    def start(self) -> Self:
        """Start serving in a daemon thread; return self."""
        self._bind()
        assert self._server is not None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self.name}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted."""
        self._bind()
        assert self._server is not None
        print(f"{self.name} serving on {self.url}", flush=True)
        try:
            self._server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            self._server.server_close()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _bind(self) -> None:
        self._server = _Server((self.host, self.port), _Handler)
        self._server.simulator = self
        self.port = self._server.server_address[1]

    @property
    def root_url(self) -> str:
        """The server's address; the control API lives under ``/_sim/``."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL of the simulated API, to give to a client."""
        return self.root_url + self.api_prefix

    # -- hooks for the simulators

    def reset(self) -> None:
        """Forget faults and the request log; subclasses also restore their state."""
        with self._lock:
            self._faults.clear()
            self._log.clear()
            self._generation += 1

    def barcodes_of(self, request: SimRequest) -> list[str]:
        """Return the barcodes a request concerns, to match faults against."""
        return []

    def log_fields(self, request: SimRequest) -> dict[str, Any]:
        """Return extra request-log fields (never a secret)."""
        return {}

    def respond(self, request: SimRequest) -> SimResponse:
        """Answer a request to the simulated API normally."""
        raise NotImplementedError

    def fault_response(self, fault: Fault, request: SimRequest) -> SimResponse:
        """Answer a request with an injected fault's status and body."""
        raise NotImplementedError

    def control(self, method: str, path: str, query: dict[str, str], payload: Any) -> Any:
        """Handle a simulator-specific control call; return the JSON answer."""
        raise LookupError(path)

    # -- request handling

    def dispatch(self, handler: _Handler) -> None:
        split = urlsplit(handler.path)
        query = {key: values[-1] for key, values in parse_qs(split.query, True).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length > 0 else b""
        method = handler.command

        if split.path.startswith("/_sim/"):
            response = self._control(method, split.path, query, raw)
        else:
            headers = {key.lower(): value for key, value in handler.headers.items()}
            response = self._answer(SimRequest(method, split.path, query, headers, raw))

        if response is DROP:
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            handler.send_response(response.status)
            handler.send_header("Content-Type", response.content_type)
            handler.send_header("Content-Length", str(len(response.body)))
            for name, value in response.headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(response.body)
        except OSError:
            # The client gave up (a timeout in a test); nothing to tell it.
            handler.close_connection = True

    def _answer(self, request: SimRequest) -> SimResponse:
        barcodes = self.barcodes_of(request)
        entry: dict[str, Any] = {
            "time": time.time(),
            "method": request.method,
            "path": request.path,
            "query": {k: v for k, v in request.query.items() if k.lower() != "apikey"},
            "body": _parsed_body(request),
            "barcodes": barcodes,
            "fault": None,
        }
        entry.update(self.log_fields(request))
        fault = self._take_fault(barcodes)
        if fault is not None:
            entry["fault"] = "drop" if fault.drop else fault.status or "latency"
        with self._lock:
            self._log.append(entry)
            del self._log[:-_LOG_LIMIT]
            generation = self._generation

        if fault is None:
            return self.respond(request)
        if fault.latency:
            time.sleep(fault.latency)
            with self._lock:
                if generation != self._generation:
                    # Reset while this request slept: it belongs to a finished test.
                    return DROP
        if fault.drop:
            return DROP
        if fault.status is None:
            return self.respond(request)
        return self.fault_response(fault, request)

    def _take_fault(self, barcodes: Sequence[str]) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.barcode is not None and fault.barcode not in barcodes:
                    continue
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        self._faults.remove(fault)
                return fault
        return None

    def _control(self, method: str, path: str, query: dict[str, str], raw: bytes) -> SimResponse:
        try:
            payload = json.loads(raw) if raw.strip() else {}
            answer = self._common_control(method, path, query, payload)
        except LookupError:
            return json_response(404, {"error": f"no control endpoint {method} {path}"})
        except (ValueError, TypeError) as exc:
            return json_response(400, {"error": str(exc)})
        return json_response(200, answer)

    def _common_control(self, method: str, path: str, query: dict[str, str], payload: Any) -> Any:
        if (method, path) == ("POST", "/_sim/reset"):
            self.reset()
            return {"ok": True}
        if (method, path) == ("GET", "/_sim/requests"):
            with self._lock:
                return {"requests": [dict(entry) for entry in self._log]}
        if (method, path) == ("DELETE", "/_sim/requests"):
            with self._lock:
                self._log.clear()
            return {"ok": True}
        if (method, path) == ("POST", "/_sim/faults"):
            specs = payload.get("faults", [payload]) if isinstance(payload, dict) else payload
            new = [Fault.from_json(spec) for spec in specs]
            with self._lock:
                self._faults.extend(new)
                return {"faults": len(self._faults)}
        if (method, path) == ("GET", "/_sim/faults"):
            with self._lock:
                return {"faults": [asdict(fault) for fault in self._faults]}
        if (method, path) == ("DELETE", "/_sim/faults"):
            with self._lock:
                self._faults.clear()
            return {"ok": True}
        return self.control(method, path, query, payload)


def json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> SimResponse:
    return SimResponse(status, json.dumps(data).encode(), "application/json", dict(headers or {}))


def _parsed_body(request: SimRequest) -> Any:
    if not request.raw_body:
        return None
    text = request.raw_body.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def html_page(status: int, extra: str = "") -> bytes:
    """A proxy's HTML error page."""
    reason = _reason(status)
    return (
        f"<html><head><title>{status} {reason}</title></head>"
        f"<body><h1>{status} {reason}</h1><p>{escape(extra)}</p></body></html>"
    ).encode()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class SimulatorControl:
    """Drives a simulator's ``/_sim/`` control API over HTTP (stdlib only)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        split = urlsplit(url)
        self.root_url = f"{split.scheme}://{split.netloc}"
        self.timeout = timeout

    def call(self, method: str, path: str, payload: Any = None) -> Any:
        """Send one control request and return its JSON answer."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(  # noqa: S310 (the URL is the simulator's)
            f"{self.root_url}/_sim/{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:  # noqa: S310
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"control {method} {path}: {exc.code} {exc.read()!r}") from exc

    def reset(self) -> None:
        self.call("POST", "reset", {})

    def requests(self) -> list[dict[str, Any]]:
        """The request log: method, path, query, body, barcodes, fault, key_valid."""
        answer: list[dict[str, Any]] = self.call("GET", "requests")["requests"]
        return answer

    def clear_requests(self) -> None:
        self.call("DELETE", "requests")

    def fault(self, **spec: Any) -> None:
        """Add one fault; the keys are those of :class:`Fault`."""
        self.call("POST", "faults", spec)

    def faults(self) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = self.call("GET", "faults")["faults"]
        return answer

    def clear_faults(self) -> None:
        self.call("DELETE", "faults")


# -- Alma -----------------------------------------------------------------------------

_GATEWAY_MESSAGES = {
    "UNAUTHORIZED": "API-key not defined or not configured to allow this API.",
    "PER_SECOND_THRESHOLD": "API-Key has exceeded the allowed number of calls per second.",
    "DAILY_THRESHOLD": "Daily API Request Threshold has been reached.",
    "FORBIDDEN": "API-key is not allowed to access this API.",
    "REQUEST_TOO_LARGE": "Request entity is too large.",
    "GENERAL_ERROR": "General Error - An error has occurred while processing the request.",
    "60107": "Set ID is not valid.",
    "60118": f"Number of members exceeds the limit of {MAX_MEMBERS}.",
    "60119": "Duplicate member ID.",
    "60120": "The member ID is not valid for the content and identifier type.",
    "60115": "Member ID already exists in the set.",
    "60176": "Member ID already exists in the set.",
}
_DEFAULT_STATUS_CODES = {429: "PER_SECOND_THRESHOLD", 413: "REQUEST_TOO_LARGE", 403: "FORBIDDEN"}


def alma_error_body(
    errors: Sequence[tuple[str, str]], shape: str, tracking: Iterable[str]
) -> tuple[bytes, str]:
    """Render Alma's error list in one of the body shapes seen in the wild."""
    entries = [
        {"errorCode": code, "errorMessage": message, "trackingId": tracking_id}
        for (code, message), tracking_id in zip(errors, tracking, strict=False)
    ]
    if shape == "empty":
        return b"", "text/plain"
    if shape == "xml":
        items = "".join(
            f"<error><errorCode>{escape(e['errorCode'])}</errorCode>"
            f"<errorMessage>{escape(e['errorMessage'])}</errorMessage>"
            f"<trackingId>{escape(e['trackingId'])}</trackingId></error>"
            for e in entries
        )
        xml = (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<web_service_result xmlns="http://com/exlibris/urm/general/xmlbeans">'
            f"<errorsExist>true</errorsExist><errorList>{items}</errorList></web_service_result>"
        )
        return xml.encode(), "application/xml;charset=UTF-8"
    error: Any = entries[0] if shape == "json_single" else entries
    document: Any = {"errorsExist": True, "errorList": {"error": error}, "result": None}
    if shape == "wrapped":
        document = {"web_service_result": document}
    return json.dumps(document).encode(), "application/json;charset=UTF-8"


class AlmaSimulator(Simulator):
    """Alma's ``POST /conf/sets/{id}?op=add_members`` with its errors, quota and gateway.

    Every barcode of the Michigan form (39015 and nine digits) exists unless marked
    missing; barcodes marked present exist whatever their form.
    """

    api_prefix = "/almaws/v1"
    name = "alma-sim"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str,
        set_id: str | Sequence[str],
        daily_quota: int = 1000,
        missing: Iterable[str] = (),
    ) -> None:
        super().__init__(host, port)
        if not api_key:
            raise ValueError("the simulator needs an API key to accept")
        self._api_key = api_key
        self._set_ids = [set_id] if isinstance(set_id, str) else list(set_id)
        self._daily_quota = daily_quota
        self._initial_missing = set(missing)
        self._tracking = (f"E01-{n:08d}" for n in itertools.count(1))
        self._restore()

    def __repr__(self) -> str:
        return f"AlmaSimulator({self.url!r}, set_ids={self._set_ids!r})"

    def _restore(self) -> None:
        with self._lock:
            self._members: dict[str, list[str]] = {set_id: [] for set_id in self._set_ids}
            self._missing = set(self._initial_missing)
            self._present: set[str] = set()
            self._remaining = self._daily_quota

    def reset(self) -> None:
        super().reset()
        self._restore()

    def exists(self, barcode: str) -> bool:
        """Tell whether Alma knows an item with this barcode."""
        with self._lock:
            if barcode in self._present:
                return True
            return barcode not in self._missing and _DEFAULT_BARCODE.fullmatch(barcode) is not None

    def members(self, set_id: str | None = None) -> list[str]:
        with self._lock:
            return list(self._members[set_id or self._set_ids[0]])

    # -- request handling

    def _key_valid(self, request: SimRequest) -> bool:
        auth = request.header("Authorization").strip()
        scheme, _, key = auth.partition(" ")
        if scheme.lower() == "apikey" and key.strip() == self._api_key:
            return True
        return request.query.get("apikey") == self._api_key

    def log_fields(self, request: SimRequest) -> dict[str, Any]:
        return {
            "key_valid": self._key_valid(request),
            "key_in_query": "apikey" in {k.lower() for k in request.query},
            "accept": request.header("Accept"),
            "content_type": request.header("Content-Type"),
        }

    def barcodes_of(self, request: SimRequest) -> list[str]:
        members = _members_of(request)
        return members if members is not None else []

    def _wants_json(self, request: SimRequest) -> bool:
        return "application/json" in request.header("Accept")

    def _error(
        self,
        request: SimRequest,
        status: int,
        errors: Sequence[tuple[str, str]],
        shape: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> SimResponse:
        shape = shape or ("json" if self._wants_json(request) else "xml")
        with self._lock:
            tracking = [next(self._tracking) for _ in errors]
        body, content_type = alma_error_body(errors, shape, tracking)
        return SimResponse(status, body, content_type, self._headers(headers))

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        with self._lock:
            headers = {"X-Exl-Api-Remaining": str(max(self._remaining, 0))}
        headers.update(extra or {})
        return headers

    def fault_response(self, fault: Fault, request: SimRequest) -> SimResponse:
        status = fault.status or 500
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        if fault.body is not None or fault.shape == "html":
            text = fault.body if fault.body is not None else ""
            body = html_page(status, text) if fault.body is None else text.encode()
            if fault.echo_authorization:
                body += html_page(status, request.header("Authorization"))
            return SimResponse(
                status, body, fault.content_type or "text/html", self._headers(headers)
            )

        code = fault.code or _DEFAULT_STATUS_CODES.get(status, "GENERAL_ERROR")
        message = fault.message
        if message is None:
            message = _GATEWAY_MESSAGES.get(code, "Error.")
            if fault.barcode is not None:
                message = f"{message.rstrip('.')}: {fault.barcode}"
        return self._error(request, status, [(code, message)], fault.shape, headers)

    def respond(self, request: SimRequest) -> SimResponse:
        if not self._key_valid(request):
            return self._error(request, 400, [("UNAUTHORIZED", _GATEWAY_MESSAGES["UNAUTHORIZED"])])
        with self._lock:
            spent = self._remaining <= 0
            if not spent:
                self._remaining -= 1
        if spent:
            return self._error(
                request, 429, [("DAILY_THRESHOLD", _GATEWAY_MESSAGES["DAILY_THRESHOLD"])]
            )

        match = re.fullmatch(re.escape(self.api_prefix) + r"/conf/sets/([^/]+)", request.path)
        if request.method != "POST" or match is None:
            return self._error(
                request,
                400,
                [("GENERAL_ERROR", f"No such API: {request.method} {request.path}")],
            )
        set_id = match.group(1)
        with self._lock:
            known_set = set_id in self._members
        if not known_set:
            return self._error(request, 400, [("60107", f"Set ID {set_id} is not valid.")])
        if request.query.get("op") != "add_members":
            return self._error(
                request, 400, [("GENERAL_ERROR", "The simulator supports only op=add_members.")]
            )
        if request.query.get("id_type", "").upper() != "BARCODE":
            return self._error(
                request, 400, [("GENERAL_ERROR", "The simulator supports only id_type=BARCODE.")]
            )
        members = _members_of(request)
        if members is None:
            return self._error(
                request, 400, [("GENERAL_ERROR", "The request body could not be parsed.")]
            )
        fail_on_invalid = request.query.get("fail_on_invalid_id", "false").lower() == "true"
        return self._add(request, set_id, members, fail_on_invalid)

    def _add(
        self, request: SimRequest, set_id: str, members: list[str], fail_on_invalid: bool
    ) -> SimResponse:
        if len(members) > MAX_MEMBERS:
            return self._error(request, 400, [("60118", _GATEWAY_MESSAGES["60118"])])
        duplicates = sorted({m for m in members if members.count(m) > 1})
        if duplicates:
            return self._error(
                request, 400, [("60119", f"Duplicate member ID(s): {', '.join(duplicates)}")]
            )

        with self._lock:
            current = self._members[set_id]
            invalid = [m for m in members if not self.exists(m)]
            already = [m for m in members if m in current]
            if fail_on_invalid and invalid:
                error = (
                    "60120",
                    "The following member ID(s) are not valid for the content and identifier"
                    f" type: {', '.join(invalid)}",
                )
            elif fail_on_invalid and already:
                error = (
                    "60115",
                    f"The following member ID(s) already exist in the set: {', '.join(already)}",
                )
            else:
                current.extend(m for m in members if m not in invalid and m not in already)
                error = None
            count = len(current)
        if error is not None:
            return self._error(request, 400, [error])
        return self._set_object(request, set_id, count)

    def _set_object(self, request: SimRequest, set_id: str, count: int) -> SimResponse:
        """Alma's answer to a successful add_members: the set itself, members not echoed.

        JSON when the client asked for it, XML (root ``<set>``) otherwise, as Alma does.
        """
        link = f"{self.url}/conf/sets/{set_id}"
        if self._wants_json(request):
            document = {
                "id": set_id,
                "name": "Digifeeds",
                "description": "Items sent to Google by Digifeeds",
                "type": {"value": "ITEMIZED", "desc": "Itemized"},
                "content": {"value": "ITEM", "desc": "Physical items"},
                "private": {"value": "false", "desc": "No"},
                "status": {"value": "ACTIVE", "desc": "Active"},
                "origin": {"value": "API", "desc": "API"},
                "number_of_members": {"value": count, "link": f"{link}/members"},
                "link": link,
            }
            return json_response(200, document, self._headers())
        xml = (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            f'<set link="{escape(link)}"><id>{escape(set_id)}</id><name>Digifeeds</name>'
            "<description>Items sent to Google by Digifeeds</description>"
            '<type desc="Itemized">ITEMIZED</type><content desc="Physical items">ITEM</content>'
            '<private desc="No">false</private><status desc="Active">ACTIVE</status>'
            '<origin desc="API">API</origin>'
            f'<number_of_members link="{escape(link)}/members">{count}</number_of_members></set>'
        )
        return SimResponse(200, xml.encode(), "application/xml;charset=UTF-8", self._headers())

    # -- control

    def control(self, method: str, path: str, query: dict[str, str], payload: Any) -> Any:
        if (method, path) == ("POST", "/_sim/barcodes"):
            missing = _strings(payload.get("missing", []))
            present = _strings(payload.get("present", []))
            with self._lock:
                self._missing.update(missing)
                self._present.difference_update(missing)
                self._present.update(present)
                self._missing.difference_update(present)
                return {"missing": sorted(self._missing), "present": sorted(self._present)}
        if (method, path) == ("GET", "/_sim/members"):
            set_id = query.get("set_id") or self._set_ids[0]
            with self._lock:
                if set_id not in self._members:
                    raise ValueError(f"unknown set {set_id}")
                return {"set_id": set_id, "members": list(self._members[set_id])}
        if (method, path) == ("POST", "/_sim/members"):
            set_id = payload.get("set_id") or self._set_ids[0]
            with self._lock:
                if set_id not in self._members:
                    raise ValueError(f"unknown set {set_id}")
                current = self._members[set_id]
                current.extend(b for b in _strings(payload.get("barcodes", [])) if b not in current)
                return {"set_id": set_id, "members": list(current)}
        if (method, path) == ("POST", "/_sim/sets"):
            set_id = str(payload["set_id"])
            with self._lock:
                self._members.setdefault(set_id, [])
                return {"sets": sorted(self._members)}
        if (method, path) == ("GET", "/_sim/quota"):
            with self._lock:
                return {"remaining": self._remaining, "daily_quota": self._daily_quota}
        if (method, path) == ("POST", "/_sim/quota"):
            remaining = int(payload["remaining"])
            with self._lock:
                self._remaining = remaining
                return {"remaining": self._remaining, "daily_quota": self._daily_quota}
        raise LookupError(path)


def _strings(values: Any) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError("expected a list of strings")
    return values


def _members_of(request: SimRequest) -> list[str] | None:
    """Read the member IDs of an add_members body (JSON or XML); None if unreadable."""
    if not request.raw_body:
        return None
    text = request.raw_body.decode("utf-8", "replace")
    if "xml" in request.header("Content-Type"):
        try:
            root = ET.fromstring(text)  # noqa: S314 (the simulator's own test input)
        except ET.ParseError:
            return None
        return [(m.findtext("id") or "").strip() for m in root.iter("member")]
    try:
        document = json.loads(text)
        member = document["members"]["member"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(member, dict):
        member = [member]
    if not isinstance(member, list):
        return None
    ids = [m.get("id") for m in member if isinstance(m, dict)]
    if len(ids) != len(member) or not all(isinstance(i, str) for i in ids):
        return None
    return [str(i) for i in ids]


class AlmaControl(SimulatorControl):
    """Drives an :class:`AlmaSimulator` over HTTP."""

    def mark_missing(self, *barcodes: str) -> None:
        self.call("POST", "barcodes", {"missing": list(barcodes)})

    def mark_present(self, *barcodes: str) -> None:
        self.call("POST", "barcodes", {"present": list(barcodes)})

    def add_members(self, *barcodes: str, set_id: str | None = None) -> None:
        self.call("POST", "members", {"set_id": set_id, "barcodes": list(barcodes)})

    def members(self, set_id: str | None = None) -> list[str]:
        path = "members" + (f"?{urlencode({'set_id': set_id})}" if set_id else "")
        answer: list[str] = self.call("GET", path)["members"]
        return answer

    def add_set(self, set_id: str) -> None:
        self.call("POST", "sets", {"set_id": set_id})

    def set_remaining(self, remaining: int) -> None:
        self.call("POST", "quota", {"remaining": remaining})

    def remaining(self) -> int:
        return int(self.call("GET", "quota")["remaining"])


def main(argv: Sequence[str] | None = None) -> None:
    """Serve an Alma simulator until killed."""
    parser = argparse.ArgumentParser(prog="python -m sandbox.alma_sim", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key-file", type=Path, required=True, help="file with the key")
    parser.add_argument("--set-id", action="append", required=True, help="a valid set ID")
    parser.add_argument("--daily-quota", type=int, default=1000)
    parser.add_argument("--missing", nargs="*", default=[], help="barcodes Alma lacks")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO)
    api_key = args.api_key_file.read_text().strip()
    AlmaSimulator(
        args.host,
        args.port,
        api_key=api_key,
        set_id=args.set_id,
        daily_quota=args.daily_quota,
        missing=args.missing,
    ).serve_forever()


if __name__ == "__main__":
    main()
