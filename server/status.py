"""The gRPC status of each refusal (`ServeError`), and how a handler answers with it.

Shared by both services (`service.py`, lstmserve.v1; `oip.py`, the Open Inference Protocol). A refusal
sets the call's status and the handler returns: no `context.abort`, whose exception keeps the handler's
frame, and with it the request, in a reference cycle inside grpcio until the garbage collector runs
(under this server's GC settings that can be never; a client sending near-limit requests that are
refused could then fill the memory, hundreds of MB each).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from lstmserve.server.errors import (
    ComputeFailed,
    Draining,
    InvalidInput,
    ModelNotFound,
    NotSteppable,
    Overloaded,
    ServeError,
    SessionExists,
    SessionMoved,
    SessionNotFound,
    StepMismatch,
)
from lstmserve.server.metrics import Metrics

STATUS_BY_ERROR: dict[type[ServeError], grpc.StatusCode] = {
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotSteppable: grpc.StatusCode.FAILED_PRECONDITION,
    StepMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    Draining: grpc.StatusCode.UNAVAILABLE,
    SessionExists: grpc.StatusCode.ALREADY_EXISTS,
    SessionMoved: grpc.StatusCode.UNAVAILABLE,
    ComputeFailed: grpc.StatusCode.INTERNAL,
}

UnaryHandler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def status_for(error: ServeError) -> grpc.StatusCode:
    """The gRPC status code for a ServeError (that of its nearest listed class; INTERNAL if none)."""
    for cls in type(error).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def refuse(context: grpc.aio.ServicerContext, error: ServeError, metrics: Metrics) -> None:
    """Sets the call's status for a refused request and counts it; the handler then returns (a stream
    handler ends), and gRPC sends the status."""
    code = status_for(error)
    metrics.errors.labels(code=code.name).inc()
    context.set_code(code)
    context.set_details(str(error))


def refusals(response_type: type[Message]) -> Callable[[UnaryHandler], UnaryHandler]:
    """Turns a ServeError raised by a unary handler of a servicer (with a `metrics` attribute) into its status
    (see `refuse`), answering with an empty `response_type` message that the client never sees behind it."""

    def decorate(handler: UnaryHandler) -> UnaryHandler:
        @functools.wraps(handler)
        async def refusing(servicer: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await handler(servicer, request, context)
            except ServeError as error:
                refuse(context, error, servicer.metrics)
                return response_type()

        return refusing

    return decorate
