"""Errors the server raises for bad requests; the gRPC service maps each to a status code."""

from __future__ import annotations


class ServeError(Exception):
    """Base class: a request the server refuses, with a message for the client."""


class SessionNotFound(ServeError):
    """The session id is unknown, closed or expired (NOT_FOUND)."""


class ModelNotFound(ServeError):
    """The request names a model (or version) this server does not serve (NOT_FOUND)."""


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


class SessionExists(ServeError):
    """A proposed session id is already taken (ALREADY_EXISTS)."""


class SessionMoved(SessionNotFound):
    """The session is (being) handed over to another replica (UNAVAILABLE): retry, and the proxy
    sends the call to the replica that holds it now. A SessionNotFound to code that only asks
    whether the session is here."""
