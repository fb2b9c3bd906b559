"""lstmserve.client: the Python client of an lstmserve server, synchronous (`Client`) and asyncio (`AsyncClient`).

    from lstmserve.client import Client

    with Client("127.0.0.1:50051") as client, client.session() as session:
        out = session.step("hello")           # logits [5, vocabulary size]; the state carries over
        for token in session.generate(" world", max_tokens=20, temperature=0):
            print(token.text, end="")

The public names are imported lazily (PEP 562), so the command line
(`lstmserve.client.cli`) does not import gRPC until a command runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AsyncClient",
    "AsyncGeneration",
    "AsyncSession",
    "Cancelled",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GeneratedToken",
    "Generation",
    "InvalidRequest",
    "LstmServeError",
    "ModelInfo",
    "NotSteppable",
    "PermissionDenied",
    "RetryPolicy",
    "ServerBusy",
    "Session",
    "SessionInfo",
    "SessionNotFound",
    "StepMismatch",
    "StepOutput",
    "Unauthenticated",
    "Unavailable",
    "Vocabulary",
]

_WHERE = {
    "AsyncClient": "_async",
    "AsyncGeneration": "_async",
    "AsyncSession": "_async",
    "Client": "_sync",
    "Generation": "_sync",
    "Session": "_sync",
    "Completion": "_types",
    "GeneratedToken": "_types",
    "ModelInfo": "_types",
    "RetryPolicy": "_types",
    "SessionInfo": "_types",
    "StepOutput": "_types",
    "Vocabulary": "_types",
    "Cancelled": "_errors",
    "DeadlineExceeded": "_errors",
    "FailedPrecondition": "_errors",
    "InvalidRequest": "_errors",
    "LstmServeError": "_errors",
    "NotSteppable": "_errors",
    "PermissionDenied": "_errors",
    "ServerBusy": "_errors",
    "SessionNotFound": "_errors",
    "StepMismatch": "_errors",
    "Unauthenticated": "_errors",
    "Unavailable": "_errors",
}

if TYPE_CHECKING:
    from lstmserve.client._async import AsyncClient, AsyncGeneration, AsyncSession
    from lstmserve.client._errors import (
        Cancelled,
        DeadlineExceeded,
        FailedPrecondition,
        InvalidRequest,
        LstmServeError,
        NotSteppable,
        PermissionDenied,
        ServerBusy,
        SessionNotFound,
        StepMismatch,
        Unauthenticated,
        Unavailable,
    )
    from lstmserve.client._sync import Client, Generation, Session
    from lstmserve.client._types import (
        Completion,
        GeneratedToken,
        ModelInfo,
        RetryPolicy,
        SessionInfo,
        StepOutput,
        Vocabulary,
    )


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
