"""Network probes that deploy/smoke.sh runs inside the federation's containers (standard library only):

    docker exec -i CONTAINER python - reach HOST:PORT=ok|fail ... < deploy/smoke_probe.py
    docker exec -i CONTAINER python - http BASE_URL CA_FILE PATH=STATUS|!STATUS ... < deploy/smoke_probe.py

``reach``: a TCP connection to HOST:PORT must succeed (``ok``) or fail (``fail``: no such name, no route,
refused or timed out).  ``http``: a POST with an empty body to BASE_URL+PATH (sent as written, so ``..``
and ``%2e`` stay in the request line) must answer STATUS, or anything but STATUS with ``!``.  Every
probe prints one line; the exit code is the number of probes whose expectation did not hold.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import sys
from urllib.parse import urlsplit

TIMEOUT = 5.0


def reach(target: str, expected: str) -> bool:
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT):
            outcome, detail = "ok", "connected"
    except OSError as err:
        outcome, detail = "fail", f"{type(err).__name__}: {err}"
    held = outcome == expected
    print(f"{'PASS' if held else 'FAIL'} reach {target}: expected {expected}, got {outcome} ({detail})", flush=True)
    return held


def post(base: str, ca: str, path: str, expected: str) -> bool:
    url = urlsplit(base)
    if url.scheme == "https":
        context = ssl.create_default_context(cafile=ca)
        connection = http.client.HTTPSConnection(url.hostname, url.port, timeout=TIMEOUT, context=context)
    else:
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    try:
        connection.request("POST", path, body=b"", headers={"Content-Type": "application/protobuf"})
        response = connection.getresponse()
        status, server = response.status, response.getheader("Server", "?")
        response.read()
    except OSError as err:
        status, server = None, f"{type(err).__name__}: {err}"
    finally:
        connection.close()
    negate = expected.startswith("!")
    want = int(expected.lstrip("!"))
    held = status is not None and ((status != want) if negate else (status == want))
    print(f"{'PASS' if held else 'FAIL'} POST {path}: expected {expected}, got {status} (server {server})", flush=True)
    return held


def main(argv: list[str]) -> int:
    if argv and argv[0] == "reach":
        results = [reach(*item.split("=", 1)) for item in argv[1:]]
    elif argv and argv[0] == "http" and len(argv) >= 3:
        base, ca = argv[1], argv[2]
        results = [post(base, ca, *item.rsplit("=", 1)) for item in argv[3:]]
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return sum(not held for held in results)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
