"""Fuzzing every RPC with generated requests: each gets an answer or a status, the server stays up,
and a control session running alongside keeps producing exact outputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerThread, start_server
from helpers import SyncStream, logits_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

EXPECTED_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Bytes that are not a protobuf message at all fail in grpcio's own deserializer, before
# lstmserve sees them, and grpcio answers UNKNOWN (a known limit, noted in the README).
RAW_BYTES_CODES = EXPECTED_CODES | {grpc.StatusCode.UNKNOWN}
UNARY_METHODS = [
    ("GetModelInfo", pb.ModelInfo),
    ("CreateSession", pb.SessionInfo),
    ("GetSession", pb.SessionInfo),
    ("ResetSession", pb.SessionInfo),
    ("CloseSession", pb.CloseSessionResponse),
    ("SnapshotSession", pb.SessionSnapshot),
    ("RestoreSession", pb.SessionInfo),
    ("Infer", pb.InferResponse),
]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Control:
    """Two sessions stepped alongside the fuzzing with the same tokens: each step must equal the
    other session's and the last logits of the same tokens run whole by Infer (reset every 40)."""

    def __init__(self, handle: ServerThread) -> None:
        self.channel = handle.channel()
        self.stub = pb_grpc.LstmServeStub(self.channel)
        self.first, self.second = SyncStream(self.channel), SyncStream(self.channel)
        self.ids = (self.first.request().session_id, self.second.request().session_id)
        self.window: list[int] = []
        self.count = 0

    def check(self) -> None:
        if len(self.window) == 40:
            for session_id in self.ids:
                self.stub.ResetSession(pb.SessionRef(session_id=session_id))
            self.window = []
        self.count += 1
        token = self.count % 7
        self.window.append(token)
        got = logits_of(self.first.request(tokens=[token]))
        np.testing.assert_array_equal(got, logits_of(self.second.request(tokens=[token])))
        expected = self.stub.Infer(pb.InferRequest(tokens=self.window)).logits  # whole sequence, no session
        np.testing.assert_allclose(got[0], logits_of(pb.StepResponse(logits=expected))[-1], atol=1e-5)

    def close(self) -> None:
        self.first.close()
        self.second.close()
        self.channel.close()


@pytest.fixture(scope="module")
def fuzz_server(token_model: Path) -> Iterator[tuple[ServerThread, Control]]:
    handle = start_server(token_model, max_tokens_per_request=512, max_generate_tokens=64)
    control = Control(handle)
    yield handle, control
    control.close()
    handle.stop()


def _call_raw(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    call = channel.unary_unary(f"/lstmserve.v1.LstmServe/{method}", request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@FUZZ
@given(method=st.sampled_from([m for m, _ in UNARY_METHODS]), payload=st.binary(max_size=512))
def test_random_bytes_to_every_unary_rpc(fuzz_server: tuple[ServerThread, Control], method: str, payload: bytes) -> None:
    handle, control = fuzz_server
    with handle.channel() as channel:
        assert _call_raw(channel, method, payload) in RAW_BYTES_CODES
    control.check()


session_ids = st.one_of(st.text(max_size=40), st.just("0" * 32), st.binary(min_size=16, max_size=16).map(bytes.hex))
tensors = st.builds(
    pb.Tensor,
    shape=st.lists(st.integers(min_value=-3, max_value=2**40), max_size=4),
    data=st.binary(max_size=256),
)
step_requests = st.builds(
    pb.StepRequest,
    session_id=session_ids,
    request_id=st.integers(min_value=0, max_value=2**64 - 1),
    tokens=st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=8)
    | st.lists(st.integers(min_value=0, max_value=15), min_size=1, max_size=700),
    output=st.integers(min_value=0, max_value=7),
    top_k=st.integers(min_value=0, max_value=2**32 - 1),
    sampling=st.builds(
        pb.Sampling,
        temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
        top_k=st.integers(min_value=0, max_value=2**32 - 1),
        top_p=st.floats(allow_nan=True, allow_infinity=True, width=32),
    ),
)


@FUZZ
@given(requests=st.lists(st.one_of(step_requests, step_requests.map(lambda r: r)), min_size=1, max_size=4),
       features=tensors, with_features=st.booleans(),
       generate=st.none() | st.builds(pb.Generate, max_tokens=st.integers(min_value=0, max_value=2**32 - 1),
                                       stop=st.lists(st.text(max_size=5), max_size=3)))  # fmt: skip
def test_random_step_streams(
    fuzz_server: tuple[ServerThread, Control],
    requests: list[pb.StepRequest],
    features: pb.Tensor,
    with_features: bool,
    generate: pb.Generate | None,
) -> None:
    handle, control = fuzz_server
    if with_features:
        requests[0].features.CopyFrom(features)
    if generate is not None:
        requests[-1].generate.CopyFrom(generate)
    with handle.channel() as channel:
        stream = SyncStream(channel)
        try:
            for request in requests:
                stream.send(**{f.name: v for f, v in request.ListFields()})
                response = stream.read()
                while request.HasField("generate") and not response.finished:
                    response = stream.read()
        except grpc.RpcError as error:
            assert error.code() in EXPECTED_CODES, (error.code(), error.details())
            assert error.details()  # a message says what was wrong
        finally:
            stream.close()
    control.check()


@FUZZ
@given(payload=st.binary(max_size=256), session_id=session_ids)
def test_random_snapshots_and_session_ids(fuzz_server: tuple[ServerThread, Control], payload: bytes, session_id: str) -> None:
    handle, control = fuzz_server
    with handle.channel() as channel:
        restore = channel.unary_unary("/lstmserve.v1.LstmServe/RestoreSession")
        for call, request in (
            (restore, pb.RestoreSessionRequest(blob=payload).SerializeToString()),
            (channel.unary_unary("/lstmserve.v1.LstmServe/GetSession"), pb.SessionRef(session_id=session_id).SerializeToString()),
        ):
            try:
                call(request, timeout=10)
            except grpc.RpcError as error:
                assert error.code() in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}, error.details()
    control.check()
