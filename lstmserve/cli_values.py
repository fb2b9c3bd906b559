"""Option values the client commands share (`generate`, `stream`, `info`, `health`), checked by argparse so that a
bad one is a usage error (exit status 2) before anything is sent."""

from __future__ import annotations

import argparse
import math
import re

# HOST:PORT with a host name, an IPv4 address or a bracketed IPv6 address; other gRPC targets (dns:///, unix:)
# are passed on as they are.
_HOST_PORT = re.compile(r"(\[[^\]]*\]|[^:/\[\]]*):(\d+)")


def seconds(text: str) -> float:
    """A positive, finite number of seconds (a deadline of 0, NaN or -1 would fail every call)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def target(text: str) -> str:
    """A server address: not empty, and a HOST:PORT's port in 1..65535 (gRPC would wrap 99999 to 34463)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the server's address is empty: give HOST:PORT")
    match = _HOST_PORT.fullmatch(text)
    if match and not 1 <= int(match.group(2)) <= 65535:
        raise argparse.ArgumentTypeError(f"port {match.group(2)} of {text!r} is outside 1..65535")
    return text
