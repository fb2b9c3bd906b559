"""The client's exceptions: one class per gRPC status the server uses, each keeping the status and message."""

from __future__ import annotations

import grpc


class LstmServeError(Exception):
    """A call to the server failed; base class of every error the client raises for a gRPC status.

    Args:
        code: the gRPC status code.
        details: the server's (or gRPC's) message.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidRequest(LstmServeError, ValueError):
    """INVALID_ARGUMENT: a request field has a bad value; the message names it. The session is unchanged."""


class SessionNotFound(LstmServeError):
    """NOT_FOUND: the session id is unknown, closed or expired (idle past the server's TTL)."""


class ServerBusy(LstmServeError):
    """RESOURCE_EXHAUSTED: a server limit is reached (max sessions, the request queue); try again later."""


class FailedPrecondition(LstmServeError):
    """FAILED_PRECONDITION: the request cannot run in the current state of the model or session."""


class NotSteppable(FailedPrecondition):
    """FAILED_PRECONDITION: the model (bidirectional) cannot be stepped; whole sequences only."""


class StepMismatch(FailedPrecondition):
    """FAILED_PRECONDITION: the session is not at the step the client expected (another client stepped it)."""


class Unavailable(LstmServeError):
    """UNAVAILABLE: the server cannot be reached or is shutting down (retried before this is raised)."""


class DeadlineExceeded(LstmServeError):
    """DEADLINE_EXCEEDED: the call took longer than the client's `timeout`."""


class Unauthenticated(LstmServeError):
    """UNAUTHENTICATED: the call carries no valid credentials."""


class PermissionDenied(LstmServeError):
    """PERMISSION_DENIED: the credentials do not allow this call."""


class Cancelled(LstmServeError):
    """CANCELLED: the call was cancelled (retried for steps before this is raised)."""


_BY_CODE: dict[grpc.StatusCode, type[LstmServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: SessionNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServerBusy,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def error_for(code: grpc.StatusCode, details: str) -> LstmServeError:
    """The exception for a status; FAILED_PRECONDITION is refined by the server's message."""
    cls = _BY_CODE.get(code, LstmServeError)
    if cls is FailedPrecondition:
        if "cannot be stepped" in details or "bidirectional" in details:
            cls = NotSteppable
        elif "expected_step" in details:
            cls = StepMismatch
    return cls(code, details)


def from_rpc_error(error: grpc.RpcError) -> LstmServeError:
    """The exception for a failed gRPC call (a `grpc.Call` or `grpc.aio.AioRpcError`)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "")
