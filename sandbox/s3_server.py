"""moto's S3 alone over HTTP: the sandbox's S3 server.

moto's ``moto_server`` serves every AWS service from one address and, before each
request, works out which service is meant by scanning its own package folder;
that costs about as much as the S3 call. This serves moto's S3 application only,
through the same HTTP server and request handler ``moto_server`` uses::

    python -m sandbox.s3_server --host 127.0.0.1 --port 8481
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    def stop(signum: int, frame: Any) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    app = create_backend_app("s3")
    app.debug = False
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
