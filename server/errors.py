"""Errors the server raises for bad requests; the gRPC service maps each to a status code."""

from __future__ import annotations


class ServeError(Exception):
    """Base class: a request the server refuses, with a message for the client."""


class SessionNotFound(ServeError):
    """The session id is unknown, closed or expired (NOT_FOUND)."""


class InvalidInput(ServeError):
    """A request field has a bad value (INVALID_ARGUMENT); the message names it."""


class Overloaded(ServeError):
    """A limit is reached: max sessions or the queue (RESOURCE_EXHAUSTED)."""


class NotSteppable(ServeError):
    """The model cannot be stepped, e.g. a bidirectional LSTM (FAILED_PRECONDITION)."""


class StepMismatch(ServeError):
    """The client's expected step counter does not match the session (FAILED_PRECONDITION)."""


class Draining(ServeError):
    """The server is shutting down and takes no new work (UNAVAILABLE)."""


class ComputeFailed(ServeError):
    """ONNX Runtime failed on the batch group that held this request (INTERNAL); its state is unchanged."""
