"""What every part of the suite shares: constants, logging, ports, HTTP and waiting."""

from http.client import HTTPException
import json
import os
import socket
import time
import urllib.error
import urllib.request

# The repository (this file is scripts/chaoslib/common.py).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JWT_SECRET = "chaos-suite-jwt-secret-0123456789abcdef"
PASSWORD = "chaos-password-1"

# Products: plentiful ones, scarce ones (a few orders get 409 for stock), and one unknown id.
PLENTIFUL = {1: ("19.99", 1_000_000), 2: ("5.00", 1_000_000), 3: ("120.50", 1_000_000), 4: ("0.99", 1_000_000)}
SCARCE = {7: ("49.00", 25), 8: ("7.25", 15)}
UNKNOWN_PRODUCT = 999
# Least time between two SIGKILLs of tracking consumers (more than Tansu's session timeout, 45 s).
CONSUMER_KILL_SPACING = 60


def log(msg):
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



# --------------------------------------------------------------------------------------------
# HTTP


class ConnError(Exception):
    """The request did not get an HTTP answer (refused, reset, timed out)."""


def http(method, url, body=None, headers=None, timeout=20.0):
    """Returns (status, headers, parsed JSON or text); raises ConnError without an answer."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("content-type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, rh, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        status, rh = e.code, e.headers
        try:
            raw = e.read()
        except Exception as exc:  # the connection died while reading the error body
            raise ConnError(str(exc)) from exc
    except (urllib.error.URLError, OSError, HTTPException, ValueError) as e:
        raise ConnError(str(e)) from e
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return status, rh, parsed
