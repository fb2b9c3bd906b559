"""Optional API keys: `authorization: Bearer KEY` metadata, checked by a server interceptor.

With `--api-keys-file`, every lstmserve.v1 and Open Inference Protocol call needs a listed
key (health, reflection, and the protocol's ServerLive and ServerReady stay open, for
probes). A session (or sequence) belongs to the key that created it: the owner is a digest
of the key, and another key gets NOT_FOUND for that session id.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

PROTECTED_PREFIXES = ("/lstmserve.v1.LstmServe/", "/inference.GRPCInferenceService/")
REFUSAL = "missing or invalid API key: send metadata 'authorization: Bearer <key>'"
OPEN_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady"})


class ApiKeyError(ValueError):
    """The API keys file is missing, unreadable or empty."""


def load_api_keys(path: Path) -> frozenset[str]:
    """One key per line; blank lines and lines starting with # are ignored.

    A key must be printable ASCII: it travels as gRPC metadata, which carries nothing
    else, so any other key could never be sent. Such a line is refused, naming its line number.
    """
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as error:
        raise ApiKeyError(f"cannot read --api-keys-file {str(path)!r}: {error}") from error
    keys = set()
    for number, line in enumerate(lines, start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not all(32 <= ord(char) <= 126 for char in key):
            raise ApiKeyError(
                f"--api-keys-file {str(path)!r} line {number}: a key must be printable ASCII "
                "(it travels as gRPC metadata)"
            )
        keys.add(key)
    if not keys:
        raise ApiKeyError(f"--api-keys-file {str(path)!r} lists no keys")
    return frozenset(keys)


def bearer_key(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The key of an `authorization: Bearer KEY` metadata entry, if any."""
    for name, value in metadata or ():
        if name.lower() == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


def owner_of(key: str | None) -> str:
    """The session owner for a key: a digest, so keys never sit in the session table ("" without keys)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32] if key else ""


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses protected calls without a valid key with UNAUTHENTICATED."""

    def __init__(self, keys: frozenset[str]) -> None:
        self._keys = tuple(key.encode() for key in keys)

    def _valid(self, key: str | None) -> bool:
        if key is None:
            return False
        sent = key.encode(errors="replace")  # bytes: compare_digest refuses str with non-ASCII characters
        return any(hmac.compare_digest(sent, known) for known in self._keys)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        protected = method.startswith(PROTECTED_PREFIXES) and method not in OPEN_METHODS
        if not protected or self._valid(bearer_key(handler_call_details.invocation_metadata)):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # a method no servicer declares: UNIMPLEMENTED, key or not
            return None
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only answers UNAUTHENTICATED.

    It never parses the request (an unauthenticated client's bytes are dropped unread) and sets the status
    instead of raising `context.abort`, whose exception would keep the call in a reference cycle (see
    `service.refuse`).
    """

    def ignore(_: bytes) -> None:
        return None

    def nothing(_: Any) -> bytes:
        return b""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details(REFUSAL)

    async def streaming(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details(REFUSAL)
        return
        yield  # pragma: no cover - makes this an async generator, as stream handlers are

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, ignore, nothing)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, ignore, nothing)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, ignore, nothing)
    return grpc.unary_unary_rpc_method_handler(unary, ignore, nothing)
