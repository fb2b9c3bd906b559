"""Bad input gets a clear status naming the bad value, changes no state, and disturbs no other session."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TEST_PROVIDER_NAME, ServerThread, start_server
from helpers import SyncStream, features_tensor, logits_of, model_spec

from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc


def _rejected(stream: SyncStream, **fields: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        stream.request(**fields)
    return error.value


@pytest.fixture()
def stub(server: ServerThread) -> Iterator[pb_grpc.LstmServeStub]:
    with server.channel() as channel:
        yield pb_grpc.LstmServeStub(channel)


@pytest.fixture(scope="module")
def limited_server(token_model: Path) -> Iterator[ServerThread]:
    handle = start_server(token_model, max_tokens_per_request=64, max_generate_tokens=1000)
    yield handle
    handle.stop()


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"tokens": [1, 10_000]}, "token id 10000 at position 1"),
        ({"tokens": [-3]}, "token id -3"),
        ({"tokens": [1] * 65}, "65 positions"),
        ({"tokens": [1], "output": 42}, "output 42"),
        ({"tokens": [1], "output": pb.OUTPUT_TOPK, "top_k": 999}, "top_k 999"),
        ({"tokens": [1], "output": pb.OUTPUT_SAMPLE, "sampling": pb.Sampling(temperature=-1)}, "temperature"),
        ({"tokens": [1], "output": pb.OUTPUT_SAMPLE, "sampling": pb.Sampling(top_p=1.5)}, "top_p"),
        ({"tokens": [1], "generate": pb.Generate(max_tokens=0)}, "max_tokens"),
        ({"tokens": [1], "generate": pb.Generate(max_tokens=100_000)}, "max_tokens"),
        ({"generate": pb.Generate(max_tokens=3)}, "no tokens"),
        ({"features": features_tensor(np.zeros((1, 3)))}, "carries features"),
        ({}, "no tokens"),
        ({"tokens": [1], "output": pb.OUTPUT_SAMPLE, "sampling": pb.Sampling(top_k=999)}, "sampling.top_k 999"),
        ({"tokens": [1], "generate": pb.Generate(max_tokens=3, sampling=pb.Sampling(top_k=2**32 - 1))}, "sampling.top_k 4294967295"),
        ({"tokens": [1], "generate": pb.Generate(max_tokens=3, stop=["x"] * 17)}, "17 strings, more than --max-stop-strings=16"),
        ({"tokens": [1], "generate": pb.Generate(max_tokens=3, stop=["ab", "y" * 257])}, "stop[1] has 257 characters"),
        ({"tokens": [1], "generate": pb.Generate(max_tokens=3, stop=["ab", ""])}, "generate.stop[1] is empty"),
    ],
)
def test_invalid_step_is_rejected_and_changes_nothing(
    limited_server: ServerThread, fields: dict[str, object], needle: str
) -> None:
    with limited_server.channel() as channel:
        stream = SyncStream(channel)
        opened = stream.request(tokens=[1, 2])
        error = _rejected(stream, **fields)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in (error.details() or "")
        stub = pb_grpc.LstmServeStub(channel)
        assert stub.GetSession(pb.SessionRef(session_id=opened.session_id)).step == 2
        # The session is intact: it continues exactly like an undisturbed one.
        resumed = SyncStream(channel).request(session_id=opened.session_id, tokens=[3])
        control = SyncStream(channel).request(tokens=[1, 2, 3])
        np.testing.assert_array_equal(logits_of(resumed)[0], logits_of(control)[2])


def test_invalid_first_request_creates_no_session(server: ServerThread) -> None:
    before = server.call_soon(lambda: server.server.store.in_use)
    with server.channel() as channel:
        error = _rejected(SyncStream(channel), tokens=[10_000])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.call_soon(lambda: server.server.store.in_use) == before


def test_unknown_session_is_not_found_everywhere(server: ServerThread, stub: pb_grpc.LstmServeStub) -> None:
    unknown = "0" * 32
    for call in (stub.GetSession, stub.ResetSession, stub.CloseSession):
        with pytest.raises(grpc.RpcError) as error:
            call(pb.SessionRef(session_id=unknown))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert unknown in (error.value.details() or "")
    with server.channel() as channel:
        error_value = _rejected(SyncStream(channel), session_id=unknown, tokens=[1])
    assert error_value.code() == grpc.StatusCode.NOT_FOUND


def test_other_session_id_on_an_open_stream_is_invalid(server: ServerThread, stub: pb_grpc.LstmServeStub) -> None:
    other = stub.CreateSession(pb.CreateSessionRequest()).session_id
    with server.channel() as channel:
        stream = SyncStream(channel)
        stream.request(tokens=[1])
        error = _rejected(stream, session_id=other, tokens=[1])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.GetSession(pb.SessionRef(session_id=other)).step == 0


def test_max_sessions_gives_resource_exhausted(token_model: Path) -> None:
    handle = start_server(token_model, max_sessions=2)
    try:
        with handle.channel() as channel:
            stub = pb_grpc.LstmServeStub(channel)
            ids = [stub.CreateSession(pb.CreateSessionRequest()).session_id for _ in range(2)]
            with pytest.raises(grpc.RpcError) as error:
                stub.CreateSession(pb.CreateSessionRequest())
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max-sessions" in (error.value.details() or "")
            with pytest.raises(grpc.RpcError) as stream_error:
                SyncStream(channel).request(tokens=[1])
            assert stream_error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stub.CloseSession(pb.SessionRef(session_id=ids[0]))
            assert SyncStream(channel).request(tokens=[1]).step == 1
    finally:
        handle.stop()


def test_feature_model_rejects_wrong_width_and_tokens(feature_model: Path) -> None:
    width = model_spec(feature_model).input_size
    handle = start_server(feature_model)
    try:
        with handle.channel() as channel:
            stream = SyncStream(channel)
            ok = stream.request(features=features_tensor(np.ones((2, width))))
            assert ok.step == 2 and list(ok.logits.shape)[0] == 2
            error = _rejected(stream, features=features_tensor(np.ones((1, width + 1))))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"[1, {width + 1}]" in (error.details() or "")
            error = _rejected(SyncStream(channel), session_id=ok.session_id, tokens=[1])
            assert "carries tokens" in (error.details() or "")
            bad = pb.Tensor(shape=[1, width], data=b"\x00" * 3)
            error = _rejected(SyncStream(channel), session_id=ok.session_id, features=bad)
            assert "bytes" in (error.details() or "")
            nan = features_tensor(np.full((1, width), np.nan))
            error = _rejected(SyncStream(channel), session_id=ok.session_id, features=nan)
            assert "NaN" in (error.details() or "")
            stub = pb_grpc.LstmServeStub(channel)
            assert stub.GetSession(pb.SessionRef(session_id=ok.session_id)).step == 2
    finally:
        handle.stop()


def test_bidirectional_model_cannot_be_stepped_but_infers(bidirectional_model: Path) -> None:
    handle = start_server(bidirectional_model)
    try:
        with handle.channel() as channel:
            stub = pb_grpc.LstmServeStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest())
            assert not info.steppable and info.num_directions == 2
            error = _rejected(SyncStream(channel), tokens=[1, 2])
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "bidirectional" in (error.details() or "")
            with pytest.raises(grpc.RpcError) as create_error:
                stub.CreateSession(pb.CreateSessionRequest())
            assert create_error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            response = stub.Infer(pb.InferRequest(tokens=[1, 2, 3]))
            assert list(response.logits.shape) == [3, info.output_size]
    finally:
        handle.stop()


def test_infer_rejects_bad_input(stub: pb_grpc.LstmServeStub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Infer(pb.InferRequest(tokens=[]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_model_info_describes_the_model(stub: pb_grpc.LstmServeStub, token_model: Path) -> None:
    spec = model_spec(token_model)
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.kind == "tokens" and tuple(info.vocabulary) == spec.vocabulary
    assert (info.hidden_size, info.num_layers, info.output_size) == (spec.hidden_size, spec.num_layers, spec.output_size)
    assert info.steppable and info.provider == TEST_PROVIDER_NAME
    assert info.fingerprint == spec.fingerprint and info.session_ttl_s == 900.0


def test_a_huge_session_id_is_not_echoed_whole(server: ServerThread, stub: pb_grpc.LstmServeStub) -> None:
    """A 1 MB session id gets NOT_FOUND with a short message (echoing it whole made the client fail on the
    size of the status metadata), and no lookup beyond the first check."""
    huge = "x" * (1024 * 1024)
    for call in (stub.GetSession, stub.ResetSession, stub.CloseSession, stub.SnapshotSession):
        with pytest.raises(grpc.RpcError) as error:
            call(pb.SessionRef(session_id=huge))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(error.value.details() or "") < 300 and "1048576 characters" in (error.value.details() or "")
    with server.channel() as channel:
        opened = SyncStream(channel).request(tokens=[1]).session_id
        stream = SyncStream(channel)
        stream.request(session_id=opened)
        error_value = _rejected(stream, session_id=huge, tokens=[1])
    assert error_value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error_value.details() or "") < 300


def test_health_list_reports_every_service(server: ServerThread) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with server.channel() as channel:
        listed = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest())
    assert listed.statuses[""].status == health_pb2.HealthCheckResponse.SERVING
    assert listed.statuses["lstmserve.v1.LstmServe"].status == health_pb2.HealthCheckResponse.SERVING


def test_unparseable_requests_log_one_short_line(server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    """Bytes that are not a protobuf message fail in grpcio (UNKNOWN); grpcio's log of them is cut to one line
    without a traceback, at most one per window, so that one client cannot flood the log."""
    from lstmserve.server.grpc_log import DECODE_ERROR_WINDOW_S, GRPC_LOGGER

    import time

    started = time.monotonic()
    with server.channel() as channel, caplog.at_level(logging.WARNING, logger=GRPC_LOGGER):
        infer = channel.unary_unary("/lstmserve.v1.LstmServe/Infer", request_serializer=None, response_deserializer=None)
        for _ in range(40):
            with pytest.raises(grpc.RpcError) as error:
                infer(b"\xff\xff\xff\xff")
            assert error.value.code() == grpc.StatusCode.UNKNOWN
            assert "Error parsing message" in (error.value.details() or "")
    windows = 1 + int((time.monotonic() - started) / DECODE_ERROR_WINDOW_S)
    records = [r for r in caplog.records if r.name == GRPC_LOGGER]
    assert 1 <= len(records) <= windows
    assert all(r.exc_info is None and r.levelno == logging.WARNING for r in records)
    assert "could not be parsed" in records[0].getMessage()


def test_an_answer_larger_than_a_message_is_refused_before_the_step(token_model: Path) -> None:
    """gRPC refused to send such an answer after the step was applied (RESOURCE_EXHAUSTED, the session one step
    on), and a resend met the same refusal: the client could never have its result."""
    handle = start_server(token_model, max_message_bytes=4096)
    try:
        with handle.channel() as channel:
            stub = pb_grpc.LstmServeStub(channel)
            vocab = stub.GetModelInfo(pb.GetModelInfoRequest()).output_size
            positions = 4096 // (4 * vocab) + 1  # their logits alone exceed the limit
            stream = SyncStream(channel)
            opened = stream.request(tokens=[1])
            error = _rejected(stream, tokens=[1] * positions, expected_step=1)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "more than --max-message-bytes=4096" in (error.details() or "")
            assert stub.GetSession(pb.SessionRef(session_id=opened.session_id)).step == 1
            # The same positions fit when they ask for less output, and the stream's session goes on from step 1.
            resumed = SyncStream(channel)
            answer = resumed.request(session_id=opened.session_id, tokens=[1] * positions, output=pb.OUTPUT_NONE)
            assert answer.step == 1 + positions
            topk = resumed.request(tokens=[1] * positions, output=pb.OUTPUT_TOPK, top_k=2)
            assert len(topk.topk) == positions and topk.step == 1 + 2 * positions
            with pytest.raises(grpc.RpcError) as infer_error:
                stub.Infer(pb.InferRequest(tokens=[1] * positions))
            assert infer_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "Infer asks for about" in (infer_error.value.details() or "")
            assert len(logits_of(stub.Infer(pb.InferRequest(tokens=[1])))) == 1
    finally:
        handle.stop()


@pytest.mark.parametrize("vocab", [2, 128, 129, 164, 16_385, 2**21])
@pytest.mark.parametrize("top_k", [1, 5, 300])
def test_the_top_k_size_estimate_bounds_the_encoded_answer(vocab: int, top_k: int) -> None:
    """What a step's top-k answer is estimated to take is never less than its encoding, for the largest ids."""
    from lstmserve.server import messages

    k = min(top_k, vocab)
    positions = 3
    response = pb.StepResponse(session_id="s" * 64, request_id=2**64 - 1, step=2**53, token=vocab - 1)
    for _ in range(positions):
        response.topk.add(ids=[vocab - 1] * k, logprobs=[-1e30] * k)
    estimate = messages.step_output_bytes(positions, pb.OUTPUT_TOPK, top_k, vocab)
    assert response.ByteSize() <= estimate <= response.ByteSize() + messages.STEP_RESPONSE_BYTES + 6 * positions
