"""Keeps grpcio's log of unparseable requests to one line now and then.

Bytes that are not a protobuf message of the method's type fail in grpcio's own deserializer, before
lstmserve sees the call: grpcio answers UNKNOWN ("Unexpected DecodeError: ...") and logs an ERROR
with a full traceback for every such request, so one client could flood the log. The filter here
turns those records into a single WARNING line without the traceback, and passes at most one per
`window_s` seconds, saying how many it held back since the last.
"""

from __future__ import annotations

import logging
import time

GRPC_LOGGER = "grpc._cython.cygrpc"
DECODE_ERROR_PREFIX = "Unexpected [DecodeError]"
DECODE_ERROR_WINDOW_S = 10.0


class DecodeErrorFilter(logging.Filter):
    """A logging filter for grpcio's logger: shortens and rate-limits its records of unparseable requests."""

    def __init__(self, window_s: float = DECODE_ERROR_WINDOW_S) -> None:
        super().__init__()
        self.window_s = window_s
        self._next_at = 0.0
        self._held_back = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(DECODE_ERROR_PREFIX):
            return True
        now = time.monotonic()
        if now < self._next_at:
            self._held_back += 1
            return False
        error = record.exc_info[1] if record.exc_info else None
        record.msg = "a request could not be parsed, answered UNKNOWN: %s (%s)%s"
        record.args = (
            message[len(DECODE_ERROR_PREFIX) :].strip(),
            error,
            f"; {self._held_back} more such request(s) since the last line" if self._held_back else "",
        )
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        self._next_at = now + self.window_s
        self._held_back = 0
        return True


def quiet_decode_errors() -> None:
    """Installs one DecodeErrorFilter on grpcio's logger (again: no effect)."""
    logger = logging.getLogger(GRPC_LOGGER)
    if not any(isinstance(f, DecodeErrorFilter) for f in logger.filters):
        logger.addFilter(DecodeErrorFilter())
