"""The Open Inference Protocol (KServe V2 / Triton gRPC) driven by Triton's own client, tritonclient,
and by Triton's perf_analyzer where it is installed.

Sequences interleaved (unary and streamed) get exactly the logits of their whole sequence run
alone; errors name the bad value in Triton's words where Triton has them, and change nothing;
sequences end, expire and belong to their key; statistics, config, metadata and reflection read
as Triton's do.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import ServerThread, start_server
from helpers import model_spec, reference_logits
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from lstmserve.server.oip import SEQUENCE_PREFIX, sequence_session_id
from lstmserve.server.statistics import BatchTiming, InferenceStatistics

TOLERANCE = 1e-4
KEY_A, KEY_B = "key-a-0123456789abcdef", "key-b-fedcba9876543210"
ROOT = Path(__file__).resolve().parents[1]
# Where scripts/install_perf_analyzer.sh puts Triton's perf_analyzer (CI's .ci/run runs it).
PERF_ANALYZER_WRAPPER = ROOT / ".perf-analyzer" / "perf_analyzer"


@pytest.fixture(scope="module")
def oip_server(token_model: Path) -> Iterator[ServerThread]:
    handle = start_server(token_model, max_batch_size=16)
    yield handle
    handle.stop()


@pytest.fixture()
def client(oip_server: ServerThread) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(oip_server.address) as handle:
        yield handle


def name_of(handle: ServerThread) -> str:
    return handle.server.config.served_model_name


def stateless_name_of(handle: ServerThread) -> str:
    """The stateless twin of the sequence model: whole sequences from zero state, nothing kept."""
    return name_of(handle) + "-stateless"


def not_started(key: int | str, model: str) -> str:
    """Triton's message for a request of a sequence that is not active."""
    return (
        f"inference request for sequence {key} to model '{model}' must specify the START flag on the first "
        "request of the sequence"
    )


def no_correlation_id(model: str) -> str:
    """Triton's message for a request without a sequence id to a sequence model."""
    return f"inference request to model '{model}' must specify a non-zero or non-empty correlation ID"


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Polls `condition` until it holds (the verdict never depends on how long that takes)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


@contextmanager
def next_batch_holds_several(handle: ServerThread, sessions: int) -> Iterator[None]:
    """A barrier in the scheduler: its next batch is formed only once `sessions` sessions have a step
    ready, so that batch holds several sequences by construction, not by timing. Later batches form
    as usual."""
    batcher = handle.server.scheduler.batcher
    collect = batcher.collect

    def held(*room: int | None) -> list[Any]:
        if len(batcher.ready) < sessions:
            return []  # nothing taken: the loop waits for the next request
        batcher.__dict__.pop("collect", None)
        return collect(*room)

    handle.call_soon(lambda: setattr(batcher, "collect", held))
    try:
        yield
    finally:
        handle.call_soon(lambda: batcher.__dict__.pop("collect", None))


def statistics(client: triton.InferenceServerClient, model: str) -> Any:
    (stats,) = client.get_inference_statistics(model).model_stats
    return stats


def tokens_input(tokens: np.ndarray | Sequence[int | np.integer[Any]], datatype: str = "INT64") -> triton.InferInput:
    array = np.asarray(tokens, dtype=np.int64 if datatype == "INT64" else np.int32).reshape(1, -1)
    tensor = triton.InferInput("tokens", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def random_tokens(rng: np.random.Generator, length: int) -> np.ndarray:
    return rng.integers(0, 40, size=length).astype(np.int64)


def chunks(rng: np.random.Generator, length: int) -> list[tuple[int, int]]:
    """Random [start, end) pieces covering 0..length, mostly single steps."""
    bounds, start = [], 0
    while start < length:
        end = min(length, start + (1 if rng.random() < 0.6 else int(rng.integers(2, 6))))
        bounds.append((start, end))
        start = end
    return bounds


def active_sessions(handle: ServerThread) -> set[str]:
    return handle.call_soon(lambda: {s.id for s in handle.server.scheduler.sessions.all()})


def error_of(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


# ---- the protocol modules ------------------------------------------------------------------------
def test_lstmserve_and_tritonclient_protocol_modules_load_in_one_process() -> None:
    """Both register `inference.*` messages: lstmserve's live in a pool of their own (either import order)."""
    for first, second in (("lstmserve.server.app", "tritonclient.grpc"), ("tritonclient.grpc", "lstmserve.server.app")):
        code = (
            f"import {first}, {second}\n"
            "from lstmserve.inference import grpc_service_pb2 as ours\n"
            "from tritonclient.grpc import service_pb2 as theirs\n"
            "request = ours.ModelInferRequest(model_name='m', raw_input_contents=[b'x'])\n"
            "request.parameters['sequence_id'].string_param = 'a'\n"
            "assert theirs.ModelInferRequest.FromString(request.SerializeToString()).parameters['sequence_id']"
            ".string_param == 'a'\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)


# ---- health, metadata, config, statistics ----------------------------------------------------------
def test_health_and_metadata_describe_the_model(oip_server: ServerThread, client: triton.InferenceServerClient) -> None:
    name, spec = name_of(oip_server), model_spec(oip_server.server.config.model)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    assert client.is_model_ready(stateless_name_of(oip_server))
    server = client.get_server_metadata()
    assert server.name == "lstmserve"
    assert {"sequence", "sequence(string_id)", "parameters", "statistics", "model_configuration"} <= set(server.extensions)
    for model in (name, stateless_name_of(oip_server)):
        metadata = client.get_model_metadata(model)
        assert metadata.name == model and metadata.versions == ["1"] and metadata.platform == "onnxruntime_onnx"
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("tokens", "INT64", [-1, -1])]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("logits", "FP32", [-1, -1, spec.output_size])
        ]


def test_model_config_reads_like_a_triton_sequence_model_config(
    oip_server: ServerThread, client: triton.InferenceServerClient
) -> None:
    """Controls, implicit state, a named instance group and ONNX Runtime's platform, as in a config.pbtxt."""
    name, spec = name_of(oip_server), model_spec(oip_server.server.config.model)
    config = client.get_model_config(name).config
    assert (config.name, config.platform, config.backend) == (name, "onnxruntime_onnx", "onnxruntime")
    assert config.max_batch_size == 16
    assert list(config.input[0].dims) == [-1] and list(config.output[0].dims) == [-1, spec.output_size]
    (group,) = config.instance_group
    assert group.name == f"{name}_0" and group.count == 1 and group.kind == group.KIND_CPU
    batching = config.sequence_batching
    assert batching.max_sequence_idle_microseconds == 900 * 1_000_000
    control = type(batching).Control
    controls = {c.name: (c.control[0].kind, list(c.control[0].int32_false_true)) for c in batching.control_input}
    assert controls == {
        "START": (control.CONTROL_SEQUENCE_START, [0, 1]),
        "END": (control.CONTROL_SEQUENCE_END, [0, 1]),
        "READY": (control.CONTROL_SEQUENCE_READY, [0, 1]),
    }
    states = {(s.input_name, s.output_name): s for s in batching.state}
    assert spec.c is not None
    assert set(states) == {(spec.h.input_name, spec.h.output_name), (spec.c.input_name, spec.c.output_name)}
    for state, width in ((spec.h, spec.h.width), (spec.c, spec.c.width)):
        described = states[(state.input_name, state.output_name)]
        assert list(described.dims) == [spec.state_rows, width]
        (initial,) = described.initial_state
        assert initial.zero_data and list(initial.dims) == [spec.state_rows, width]
    assert config.parameters["vocabulary"].string_value.startswith('["')
    as_json = client.get_model_config(name, as_json=True)["config"]
    assert as_json["input"][0]["data_type"] == "TYPE_INT64"
    assert as_json["sequence_batching"]["state"][0]["data_type"] == "TYPE_FP32"
    stateless = client.get_model_config(stateless_name_of(oip_server)).config
    assert not stateless.HasField("sequence_batching") and stateless.instance_group[0].name.endswith("-stateless_0")


def test_unknown_models_are_not_found_and_other_rpcs_unimplemented(client: triton.InferenceServerClient) -> None:
    for call in (
        lambda: client.get_model_metadata("nope"),
        lambda: client.get_model_config("nope"),
        lambda: client.get_inference_statistics("nope"),
    ):
        error = error_of(call)
        assert error.status() == "StatusCode.NOT_FOUND" and "'nope'" in error.message()
    assert error_of(lambda: client.infer("nope", [tokens_input([1])])).status() == "StatusCode.NOT_FOUND"
    assert error_of(client.get_model_repository_index).status() == "StatusCode.UNIMPLEMENTED"


def test_model_ready_is_false_for_unknown_models(oip_server: ServerThread, client: triton.InferenceServerClient) -> None:
    """As Triton's ModelIsReady: an unknown model or version is not ready (OK status), not an error."""
    name = name_of(oip_server)
    assert client.is_model_ready(name) and client.is_model_ready(name, "1")
    assert client.is_model_ready("nope") is False
    assert client.is_model_ready(name, "2") is False


def _counts(stats: Any) -> dict[str, int]:
    infer = stats.inference_stats
    return {
        "inference": stats.inference_count,
        "execution": stats.execution_count,
        "success": infer.success.count,
        "fail": infer.fail.count,
        "queue": infer.queue.count,
        "compute_input": infer.compute_input.count,
        "compute_infer": infer.compute_infer.count,
        "compute_output": infer.compute_output.count,
        "batches": sum(b.compute_infer.count for b in stats.batch_stats),
    }


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in after}


def test_statistics_count_requests_and_batches_as_triton_does(
    oip_server: ServerThread, client: triton.InferenceServerClient
) -> None:
    """Per-request counts agree (what perf_analyzer checks); per-batch figures are execution_count and
    batch_stats; queue is the wait alone, so queue + compute never exceeds a request's whole time."""
    name = name_of(oip_server)
    before = _counts(statistics(client, name))
    client.infer(name, [tokens_input([1, 2])], sequence_id=901, sequence_start=True)
    for token in (3, 4, 5):
        client.infer(name, [tokens_input([token])], sequence_id=901, sequence_end=token == 5)
    error_of(lambda: client.infer(name, [tokens_input([1])], sequence_id=902))  # not started: a failure
    stats = statistics(client, name)
    delta = _delta(_counts(stats), before)
    per_request = {delta[key] for key in ("inference", "success", "queue", "compute_input", "compute_infer", "compute_output")}
    assert per_request == {4} and delta["fail"] == 1
    assert 1 <= delta["execution"] == delta["batches"] <= 4
    infer = stats.inference_stats
    compute_ns = infer.compute_input.ns + infer.compute_infer.ns + infer.compute_output.ns
    assert infer.compute_infer.ns > 0 and stats.last_inference > 0
    # Each request's wait ends where its batch's compute starts, and its time ends after that compute.
    assert infer.queue.ns + compute_ns <= infer.success.ns + 4 * stats.execution_count
    sizes = [b.batch_size for b in stats.batch_stats]
    assert sizes == sorted(sizes) and all(b.compute_infer.count >= 1 for b in stats.batch_stats)


def test_statistics_charge_each_request_its_own_wait_and_its_whole_batch() -> None:
    """Unit: two requests in a batch of three (one failed), waiting since 9.990 s and 9.996 s; the batch
    computes from 10.000 s (1 ms gather, 4 ms model, 2 ms scatter) and answers at 10.008 s."""
    stats = InferenceStatistics()
    timing = BatchTiming(started=10.0, input_s=0.001, infer_s=0.004, output_s=0.002)
    stats.record(3, timing, requests=2, waiting_since_sum=9.990 + 9.996, finished=10.008)
    ms = 1_000_000
    assert (stats.queue.count, stats.queue.ns) == (2, pytest.approx(14 * ms, abs=2))  # 10 ms + 4 ms
    assert (stats.success.count, stats.success.ns) == (2, pytest.approx(30 * ms, abs=2))  # 18 ms + 12 ms
    assert (stats.compute_input.count, stats.compute_input.ns) == (2, pytest.approx(2 * ms, abs=2))
    assert (stats.compute_infer.count, stats.compute_infer.ns) == (2, pytest.approx(8 * ms, abs=2))
    assert (stats.compute_output.count, stats.compute_output.ns) == (2, pytest.approx(4 * ms, abs=2))
    assert (stats.executions, stats.inferences) == (1, 2)
    batch = stats.batches[3]
    assert (batch.compute_infer.count, batch.compute_infer.ns) == (1, pytest.approx(4 * ms, abs=2))
    stats.record(2, timing, requests=1, waiting_since_sum=10.0, finished=10.008, inferences=2)  # a 2-row request
    assert (stats.executions, stats.inferences, stats.success.count) == (2, 4, 3) and stats.last_inference_ms > 0


def test_the_stateless_model_has_statistics_of_its_own(
    oip_server: ServerThread, client: triton.InferenceServerClient
) -> None:
    name, stateless = name_of(oip_server), stateless_name_of(oip_server)
    before, sequence_before = _counts(statistics(client, stateless)), _counts(statistics(client, name))
    batch = triton.InferInput("tokens", [3, 2], "INT64")
    batch.set_data_from_numpy(np.array([[1, 2], [3, 4], [5, 6]], np.int64))
    client.infer(stateless, [batch])
    error_of(lambda: client.infer(stateless, [tokens_input([10_000])]))
    stats = statistics(client, stateless)
    delta = _delta(_counts(stats), before)
    assert delta == {
        "inference": 3, "execution": 1, "success": 1, "fail": 1, "queue": 1, "compute_input": 1,
        "compute_infer": 1, "compute_output": 1, "batches": 1,
    }
    assert 3 in {b.batch_size for b in stats.batch_stats}
    assert _counts(statistics(client, name)) == sequence_before  # the sequence model's are untouched
    everything = {s.name for s in client.get_inference_statistics().model_stats}
    assert everything == {name, stateless}


# ---- sequences --------------------------------------------------------------------------------------
def test_interleaved_unary_sequences_match_each_whole_sequence(
    oip_server: ServerThread, token_model: Path
) -> None:
    """12 sequences (int and string ids), each in random pieces from its own thread, batched together
    (the first batch waits at a barrier until several sequences have a step ready)."""
    name, rng = name_of(oip_server), np.random.default_rng(3)
    sequences = {key: random_tokens(rng, int(rng.integers(8, 24))) for key in [*range(1, 7), *"abcdef"]}

    def run(key: int | str) -> np.ndarray:
        tokens, pieces = sequences[key], []
        bounds = chunks(np.random.default_rng(list(sequences).index(key)), len(tokens))
        with triton.InferenceServerClient(oip_server.address) as own:
            for index, (start, end) in enumerate(bounds):
                result = own.infer(
                    name,
                    [tokens_input(tokens[start:end])],
                    sequence_id=key,
                    sequence_start=index == 0,
                    sequence_end=index == len(bounds) - 1,
                )
                pieces.append(result.as_numpy("logits")[0])
        return np.concatenate(pieces)

    before = active_sessions(oip_server)
    with triton.InferenceServerClient(oip_server.address) as client:
        batched_before = {b.batch_size: b.compute_infer.count for b in statistics(client, name).batch_stats}
        with next_batch_holds_several(oip_server, 3), ThreadPoolExecutor(len(sequences)) as pool:
            served = dict(zip(sequences, pool.map(run, sequences), strict=True))
        batched = {b.batch_size: b.compute_infer.count for b in statistics(client, name).batch_stats}
    for key, tokens in sequences.items():
        assert np.abs(served[key] - reference_logits(token_model, tokens)).max() <= TOLERANCE, key
    assert active_sessions(oip_server) == before  # sequence_end freed every one
    # The shared scheduler batched sequences together (ModelStatistics' batch_stats say so too).
    assert any(size >= 3 and count > batched_before.get(size, 0) for size, count in batched.items())


def test_streamed_sequences_with_errors_keep_the_stream_open_and_stay_exact(
    oip_server: ServerThread, token_model: Path
) -> None:
    """16 sequences pipelined on one stream; a bad request mid-sequence gets an error_message, nothing else."""
    name, rng = name_of(oip_server), np.random.default_rng(5)
    sequences = {key: random_tokens(rng, int(rng.integers(6, 16))) for key in [f"s{i}" for i in range(8)] + list(range(100, 108))}
    plans = {key: chunks(rng, len(tokens)) for key, tokens in sequences.items()}
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    sent: dict[str, tuple[int | str, int]] = {}
    with triton.InferenceServerClient(oip_server.address) as stream_client:
        stream_client.start_stream(callback=lambda result, error: results.put((result, error)))
        for round_ in range(max(len(p) for p in plans.values())):
            for key, plan in plans.items():
                if round_ >= len(plan):
                    continue
                if key == "s3" and round_ == 1:  # out of vocabulary: refused, and s3 carries on unchanged
                    stream_client.async_stream_infer(name, [tokens_input([10_000])], request_id="bad", sequence_id=key)
                start, end = plan[round_]
                request_id = f"{key}/{round_}"
                sent[request_id] = (key, round_)
                stream_client.async_stream_infer(
                    name,
                    [tokens_input(sequences[key][start:end])],
                    request_id=request_id,
                    sequence_id=key,
                    sequence_start=round_ == 0,
                    sequence_end=round_ == len(plan) - 1,
                )
        answers = [results.get(timeout=30) for _ in range(len(sent) + 1)]
        stream_client.stop_stream()
    errors = [error for _, error in answers if error is not None]
    assert len(errors) == 1 and errors[0].message().startswith("token id 10000 ")  # Triton's bare message
    pieces: dict[int | str, dict[int, np.ndarray]] = {key: {} for key in sequences}
    for result, error in answers:
        if error is None:
            key, round_ = sent[result.get_response().id]
            pieces[key][round_] = result.as_numpy("logits")[0]
    for key, tokens in sequences.items():
        served = np.concatenate([pieces[key][r] for r in range(len(plans[key]))])
        assert np.abs(served - reference_logits(token_model, tokens)).max() <= TOLERANCE, key


def test_sequence_end_frees_and_start_restarts(oip_server: ServerThread, client: triton.InferenceServerClient) -> None:
    name = name_of(oip_server)
    first = client.infer(name, [tokens_input([5, 6])], sequence_id=42, sequence_start=True).as_numpy("logits")
    client.infer(name, [tokens_input([7])], sequence_id=42)
    session_id = sequence_session_id("", 42)
    assert session_id.startswith(SEQUENCE_PREFIX) and session_id in active_sessions(oip_server)
    again = client.infer(name, [tokens_input([5, 6])], sequence_id=42, sequence_start=True).as_numpy("logits")
    assert np.array_equal(first, again)  # a new start begins from zero state
    client.infer(name, [tokens_input([7])], sequence_id=42, sequence_end=True)
    assert session_id not in active_sessions(oip_server)
    error = error_of(lambda: client.infer(name, [tokens_input([7])], sequence_id=42))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and error.message() == not_started(42, name)
    error = error_of(lambda: client.infer(name, [tokens_input([7])], sequence_id="never-started"))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and error.message() == not_started("never-started", name)


def test_sequence_end_answers_its_step_even_when_the_queue_fills_before_the_close(token_model: Path) -> None:
    """The step of a sequence_end request ran: its logits come back and the sequence is closed, even if
    the queue is full when the close is queued (it used to be RESOURCE_EXHAUSTED with the step applied)."""
    handle = start_server(token_model)
    scheduler = handle.server.scheduler
    try:
        with triton.InferenceServerClient(handle.address) as client:
            name = name_of(handle)
            client.infer(name, [tokens_input([5, 6])], sequence_id=43, sequence_start=True)
            client.infer(name, [tokens_input([7])], sequence_id=43)  # now the scheduler's last solo session
            limits = scheduler.batcher.limits  # the batcher enforces the queue limit
            handle.call_soon(lambda: setattr(scheduler.batcher, "limits", replace(limits, max_queue=0)))
            session_id = sequence_session_id("", 43)

            def stepped_and_still_open() -> bool:
                session = scheduler.sessions.find(session_id)
                return session is not None and session.step == 4

            with ThreadPoolExecutor(1) as pool:
                ending = pool.submit(
                    client.infer, name, [tokens_input([8])], sequence_id=43, sequence_end=True
                )
                # The step runs inline and, with no await in between, the close is refused (queue full):
                # once the step shows, the request is waiting out the full queue.
                wait_until(lambda: handle.call_soon(stepped_and_still_open), "the sequence_end step ran")
                handle.call_soon(lambda: setattr(scheduler.batcher, "limits", limits))
                logits = ending.result(timeout=30).as_numpy("logits")
            expected = reference_logits(token_model, np.array([5, 6, 7, 8], np.int64))
            assert np.abs(logits[0, 0] - expected[-1]).max() <= TOLERANCE
            assert sequence_session_id("", 43) not in active_sessions(handle)
    finally:
        handle.stop()


def test_int_and_string_ids_are_different_sequences(oip_server: ServerThread, client: triton.InferenceServerClient) -> None:
    name = name_of(oip_server)
    client.infer(name, [tokens_input([3])], sequence_id=7, sequence_start=True)
    error = error_of(lambda: client.infer(name, [tokens_input([3])], sequence_id="7"))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and error.message() == not_started("7", name)
    client.infer(name, [tokens_input([3])], sequence_id=7, sequence_end=True)


def test_int64_and_uint64_ids_name_one_correlation_id(oip_server: ServerThread) -> None:
    """Triton reads an int64 sequence_id as its uint64 correlation id: -1 (int64) is 2**64 - 1 (uint64)."""
    name = name_of(oip_server)

    def request(field: str, value: int, start: bool = False, end: bool = False) -> triton_pb.ModelInferRequest:
        message = triton_pb.ModelInferRequest(model_name=name)
        message.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
        message.raw_input_contents.append(np.array([3], "<i8").tobytes())
        setattr(message.parameters["sequence_id"], field, value)
        message.parameters["sequence_start"].bool_param = start
        message.parameters["sequence_end"].bool_param = end
        return message

    with oip_server.channel() as channel:
        stub = triton_grpc.GRPCInferenceServiceStub(channel)
        for signed, unsigned in ((-1, 2**64 - 1), (-(2**63), 2**63), (8, 8)):
            stub.ModelInfer(request("int64_param", signed, start=True))
            stub.ModelInfer(request("uint64_param", unsigned))  # the same sequence: live
            stub.ModelInfer(request("int64_param", signed, end=True))
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(request("uint64_param", unsigned))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.details() == not_started(unsigned, name)  # the uint64 form, as Triton prints it


def test_idle_sequences_expire_with_the_session_ttl(token_model: Path) -> None:
    handle = start_server(token_model, session_ttl_s=30.0)
    try:
        with triton.InferenceServerClient(handle.address) as client:
            name = name_of(handle)
            idle = client.get_model_config(name).config.sequence_batching.max_sequence_idle_microseconds
            assert idle == 30 * 1_000_000
            client.infer(name, [tokens_input([1])], sequence_id="idle", sequence_start=True)
            handle.call_soon(lambda: handle.server.scheduler.sweep_idle(time.monotonic() + 31))
            assert active_sessions(handle) == set()
            error = error_of(lambda: client.infer(name, [tokens_input([1])], sequence_id="idle"))
            assert error.status() == "StatusCode.INVALID_ARGUMENT" and error.message() == not_started("idle", name)
    finally:
        handle.stop()


def test_last_position_only_and_stateless_requests(
    oip_server: ServerThread, client: triton.InferenceServerClient, token_model: Path
) -> None:
    name, tokens = name_of(oip_server), np.array([4, 8, 15, 16, 23], np.int64)
    expected = reference_logits(token_model, tokens)
    last = client.infer(
        name, [tokens_input(tokens)], sequence_id=77, sequence_start=True, sequence_end=True,
        parameters={"last_position_only": True},
    ).as_numpy("logits")
    assert last.shape == (1, 1, expected.shape[1]) and np.abs(last[0, 0] - expected[-1]).max() <= TOLERANCE
    # The stateless model: whole sequences from zero state, a batch of them, nothing kept.
    batch = triton.InferInput("tokens", [2, 5], "INT64")
    batch.set_data_from_numpy(np.stack([tokens, tokens[::-1]]))
    before = active_sessions(oip_server)
    result = client.infer(stateless_name_of(oip_server), [batch])
    logits = result.as_numpy("logits")
    assert result.get_response().model_name == stateless_name_of(oip_server)
    assert np.abs(logits[0] - expected).max() <= TOLERANCE
    assert np.abs(logits[1] - reference_logits(token_model, tokens[::-1].copy())).max() <= TOLERANCE
    assert active_sessions(oip_server) == before


def test_the_sequence_model_refuses_requests_without_a_sequence_id(
    oip_server: ServerThread, client: triton.InferenceServerClient
) -> None:
    """As Triton's sequence batcher; the stateless model is the explicit way to run whole sequences, and
    it refuses sequence parameters instead of ignoring them."""
    name, stateless = name_of(oip_server), stateless_name_of(oip_server)
    before = active_sessions(oip_server)
    extra: Mapping[str, object]
    for extra in ({}, {"sequence_id": 0}, {"sequence_id": ""}):
        error = error_of(lambda extra=extra: client.infer(name, [tokens_input([1, 2])], **extra))
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and error.message() == no_correlation_id(name), extra
    messages = []
    for extra in ({"sequence_id": 5}, {"sequence_id": "a", "sequence_start": True}):
        error = error_of(lambda extra=extra: client.infer(stateless, [tokens_input([1, 2])], **extra))
        assert error.status() == "StatusCode.INVALID_ARGUMENT", extra
        messages.append(error.message())
    end_only = _request(stateless, sequence_end=True)  # tritonclient sends no flags without an id
    del end_only.parameters["sequence_id"]
    with oip_server.channel() as channel, pytest.raises(grpc.RpcError) as raised:
        triton_grpc.GRPCInferenceServiceStub(channel).ModelInfer(end_only)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    messages.append(raised.value.details())
    for message in messages:
        assert f"model '{stateless}' runs each request from zero state" in message
        assert f"send sequences to model '{name}'" in message
    assert active_sessions(oip_server) == before


def test_batch_size_errors_say_which_limit(token_model: Path) -> None:
    """With --max-batch-size 1, a stateless batch of 2 is refused for the batch limit, not as a sequence."""
    handle = start_server(token_model, max_batch_size=1)
    try:
        with triton.InferenceServerClient(handle.address) as client:
            batch = triton.InferInput("tokens", [2, 1], "INT64")
            batch.set_data_from_numpy(np.array([[1], [2]], np.int64))
            error = error_of(lambda: client.infer(stateless_name_of(handle), [batch]))
            assert error.status() == "StatusCode.INVALID_ARGUMENT"
            assert "batch size must be 1..1" in error.message() and "sequence" not in error.message()
            error = error_of(lambda: client.infer(name_of(handle), [batch], sequence_id=3, sequence_start=True))
            assert "a sequence request carries batch size 1" in error.message()
    finally:
        handle.stop()


def test_typed_contents_equal_raw_contents(oip_server: ServerThread, client: triton.InferenceServerClient) -> None:
    """tritonclient sends raw bytes; Triton's typed `contents` (sent here with Triton's own messages) work too."""
    name, tokens = name_of(oip_server), [9, 8, 7]
    raw = client.infer(name, [tokens_input(tokens)], sequence_id=55, sequence_start=True, sequence_end=True)
    request = triton_pb.ModelInferRequest(model_name=name, id="typed")
    request.inputs.add(name="tokens", datatype="INT64", shape=[1, 3]).contents.int64_contents.extend(tokens)
    request.parameters["sequence_id"].int64_param = 56
    request.parameters["sequence_start"].bool_param = True
    request.parameters["sequence_end"].bool_param = True
    with oip_server.channel() as channel:
        response = triton_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert response.id == "typed" and list(response.outputs[0].shape) == [1, 3, raw.as_numpy("logits").shape[2]]
    typed = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(tuple(response.outputs[0].shape))
    assert np.array_equal(typed, raw.as_numpy("logits"))


def test_feature_model_sequences(feature_model: Path) -> None:
    spec, rng = model_spec(feature_model), np.random.default_rng(11)
    features = rng.standard_normal((9, spec.input_size)).astype(np.float32)
    handle = start_server(feature_model)
    try:
        with triton.InferenceServerClient(handle.address) as client:
            name = name_of(handle)
            assert client.get_model_metadata(name).inputs[0].shape == [-1, -1, spec.input_size]
            pieces = []
            for start, end, first, last in ((0, 4, True, False), (4, 5, False, False), (5, 9, False, True)):
                tensor = triton.InferInput("features", [1, end - start, spec.input_size], "FP32")
                tensor.set_data_from_numpy(features[np.newaxis, start:end])
                result = client.infer(name, [tensor], sequence_id=1, sequence_start=first, sequence_end=last)
                pieces.append(result.as_numpy("logits")[0])
        assert np.abs(np.concatenate(pieces) - reference_logits(feature_model, features)).max() <= TOLERANCE
    finally:
        handle.stop()


def test_a_single_state_model_describes_its_one_state_and_keeps_sequences(gru_model: Path) -> None:
    """A GRU keeps h only: ModelConfig describes that one state tensor, and sequences are exact."""
    spec, tokens = model_spec(gru_model), np.array([3, 1, 4, 1, 5], np.int64)
    assert spec.c is None
    handle = start_server(gru_model)
    try:
        with triton.InferenceServerClient(handle.address) as client:
            name = name_of(handle)
            batching = client.get_model_config(name).config.sequence_batching
            (state,) = batching.state
            assert (state.input_name, state.output_name) == (spec.h.input_name, spec.h.output_name)
            assert list(state.dims) == [spec.state_rows, spec.h.width]
            pieces = [
                client.infer(name, [tokens_input(tokens[a:b])], sequence_id=7, sequence_start=a == 0, sequence_end=b == 5)
                .as_numpy("logits")[0]
                for a, b in ((0, 2), (2, 5))
            ]
        assert np.abs(np.concatenate(pieces) - reference_logits(gru_model, tokens)).max() <= TOLERANCE
    finally:
        handle.stop()


def test_bidirectional_model_runs_whole_sequences_only(bidirectional_model: Path) -> None:
    handle = start_server(bidirectional_model)
    try:
        with triton.InferenceServerClient(handle.address) as client:
            name = name_of(handle)
            assert not client.get_model_config(name).config.HasField("sequence_batching")
            logits = client.infer(name, [tokens_input([1, 2, 3])]).as_numpy("logits")
            expected = reference_logits(bidirectional_model, np.array([1, 2, 3], np.int64))
            assert np.abs(logits[0] - expected).max() <= TOLERANCE
            error = error_of(lambda: client.infer(name, [tokens_input([1])], sequence_id=1, sequence_start=True))
            assert error.status() == "StatusCode.FAILED_PRECONDITION" and "bidirectional" in error.message()
            assert not client.is_model_ready(name + "-stateless")  # it is stateless itself: no twin
    finally:
        handle.stop()


# ---- errors ------------------------------------------------------------------------------------------
def _request(name: str, **parameters: Any) -> triton_pb.ModelInferRequest:
    request = triton_pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="tokens", datatype="INT64", shape=[1, 2])
    request.raw_input_contents.append(np.array([1, 2], "<i8").tobytes())
    for key, value in {"sequence_id": 314, **parameters}.items():
        field = {bool: "bool_param", int: "int64_param", str: "string_param", float: "double_param"}[type(value)]
        setattr(request.parameters[key], field, value)
    return request


def _bad_requests(name: str) -> list[tuple[str, triton_pb.ModelInferRequest, grpc.StatusCode, str]]:
    cases: list[tuple[str, triton_pb.ModelInferRequest, grpc.StatusCode, str]] = []

    def case(label: str, code: grpc.StatusCode, text: str, **parameters: Any) -> triton_pb.ModelInferRequest:
        request = _request(name, **parameters)
        request.id = label
        cases.append((label, request, code, text))
        return request

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    case("token", invalid, "token id 999").raw_input_contents[0] = np.array([1, 999], "<i8").tobytes()
    case("datatype", invalid, "datatype 'INT32'").inputs[0].datatype = "INT32"
    case("rank", invalid, "shape [2]").inputs[0].shape[:] = [2]
    case("batch", invalid, "batch size 2").inputs[0].shape[:] = [2, 1]
    case("bytes", invalid, "has 3 bytes").raw_input_contents[0] = b"abc"
    case("name", invalid, "'token'").inputs[0].name = "token"
    case("output", invalid, "'probs'").outputs.add(name="probs")
    case("classification", invalid, "classification").outputs.add(name="logits").parameters["classification"].int64_param = 3
    case("start type", invalid, "sequence_start must be a bool", sequence_start=1)
    case("id type", invalid, "sequence_id must be", sequence_id=1.5)
    request = case("both contents", invalid, "both raw_input_contents and contents.int64_contents")
    request.inputs[0].contents.int64_contents.extend([1, 2])
    request = case("typed field", invalid, "contents.int64_contents")
    del request.raw_input_contents[:]
    request.inputs[0].contents.int_contents.extend([1, 2])
    request = case("typed count", invalid, "has 1 values")
    del request.raw_input_contents[:]
    request.inputs[0].contents.int64_contents.append(1)
    case("positions", invalid, "no positions").inputs[0].shape[:] = [1, 0]
    case("too many", invalid, "max_tokens_per_request=4096").inputs[0].shape[:] = [1, 5000]
    case("version", grpc.StatusCode.NOT_FOUND, "no version '2'").model_version = "2"
    case("unknown sequence", invalid, not_started("never", name), sequence_id="never")
    start_without_id = _request(name, sequence_start=True)
    start_without_id.id = "start without id"
    del start_without_id.parameters["sequence_id"]
    cases.append(("start without id", start_without_id, invalid, no_correlation_id(name)))
    return cases


def test_bad_requests_name_the_value_and_change_no_state(oip_server: ServerThread, token_model: Path) -> None:
    """Each refused request gets its status (unary) or error_message (stream); the sequence carries on exactly."""
    name = name_of(oip_server)
    cases = _bad_requests(name)
    with oip_server.channel() as channel, triton.InferenceServerClient(oip_server.address) as client:
        stub = triton_grpc.GRPCInferenceServiceStub(channel)
        client.infer(name, [tokens_input([1, 2])], sequence_id=314, sequence_start=True)
        unary_messages = {}
        for label, request, code, text in cases:
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(request)
            assert error.value.code() == code, label
            assert text in error.value.details(), (label, error.value.details())
            unary_messages[label] = error.value.details()
        good = _request(name)
        good.id = "good"
        streamed = list(stub.ModelStreamInfer(iter([request for _, request, _, _ in cases] + [good])))
        # One answer per request, in the order sent (as Triton answers a model that is not decoupled).
        assert [response.infer_response.id for response in streamed] == [label for label, *_ in cases] + ["good"]
        answers = {response.infer_response.id: response for response in streamed}
        for label, *_ in cases:
            # Triton's error_message is the bare message: the same words as the unary status, no code prefix.
            assert answers[label].error_message == unary_messages[label], label
        assert not answers["good"].error_message  # the stream stayed open and the good request ran
        last = client.infer(name, [tokens_input([3])], sequence_id=314, sequence_end=True).as_numpy("logits")
    expected = reference_logits(token_model, np.array([1, 2, 1, 2, 3], np.int64))
    assert np.abs(last[0, 0] - expected[-1]).max() <= TOLERANCE


# ---- API keys --------------------------------------------------------------------------------------
def test_api_keys_guard_inference_and_own_sequences(token_model: Path) -> None:
    handle = start_server(token_model, api_keys=frozenset({KEY_A, KEY_B}))
    try:
        key_a, key_b = {"authorization": f"Bearer {KEY_A}"}, {"authorization": f"Bearer {KEY_B}"}
        with triton.InferenceServerClient(handle.address) as client:
            name = name_of(handle)
            assert client.is_server_live() and client.is_server_ready()  # probes stay open
            for call in (lambda: client.get_model_metadata(name), lambda: client.infer(name, [tokens_input([1])])):
                assert error_of(call).status() == "StatusCode.UNAUTHENTICATED"
            a = client.infer(name, [tokens_input([1, 2])], sequence_id=1, sequence_start=True, headers=key_a)
            error = error_of(lambda: client.infer(name, [tokens_input([3])], sequence_id=1, headers=key_b))
            assert error.message() == not_started(1, name)  # key B cannot see key A's sequence 1
            b = client.infer(name, [tokens_input([1, 2])], sequence_id=1, sequence_start=True, headers=key_b)
            assert np.array_equal(a.as_numpy("logits"), b.as_numpy("logits"))  # independent, same id
            assert sequence_session_id("", 1) not in active_sessions(handle)
            assert len(active_sessions(handle)) == 2
    finally:
        handle.stop()


def test_undeclared_rpcs_answer_unimplemented_with_or_without_a_key(token_model: Path) -> None:
    """The interceptor must not crash on a method no servicer declares (it used to: UNKNOWN, AttributeError)."""
    handle = start_server(token_model, api_keys=frozenset({KEY_A}))
    try:
        with handle.channel() as channel:
            stub = triton_grpc.GRPCInferenceServiceStub(channel)
            for metadata in ((), (("authorization", f"Bearer {KEY_A}"),), (("authorization", "Bearer wrong"),)):
                for call, request in (
                    (stub.RepositoryIndex, triton_pb.RepositoryIndexRequest()),
                    (stub.SystemSharedMemoryStatus, triton_pb.SystemSharedMemoryStatusRequest()),
                ):
                    with pytest.raises(grpc.RpcError) as error:
                        call(request, metadata=metadata, timeout=10)
                    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED, (metadata, error.value.details())
    finally:
        handle.stop()


def test_server_ready_follows_health_while_draining(token_model: Path) -> None:
    handle = start_server(token_model)
    try:
        with triton.InferenceServerClient(handle.address) as client:
            assert client.is_server_ready()
            handle.call(handle.server.health.enter_graceful_shutdown())
            assert client.is_server_live() and not client.is_server_ready()
            assert not client.is_model_ready(name_of(handle))
    finally:
        handle.stop()


def test_sequences_survive_a_restart_with_a_state_dir(token_model: Path, tmp_path: Path) -> None:
    """A sequence's session id is derived from its id, so a restarted server finds it again."""
    tokens = np.array([2, 4, 6, 8], np.int64)
    first = start_server(token_model, state_dir=tmp_path)
    name = name_of(first)
    try:
        with triton.InferenceServerClient(first.address) as client:
            client.infer(name, [tokens_input(tokens[:3])], sequence_id="kept", sequence_start=True)
        first.call(first.server.drain(grace_s=1.0))
    finally:
        first.stop()
    second = start_server(token_model, state_dir=tmp_path)
    try:
        with triton.InferenceServerClient(second.address) as client:
            logits = client.infer(name, [tokens_input(tokens[3:])], sequence_id="kept", sequence_end=True)
        expected = reference_logits(token_model, tokens)
        assert np.abs(logits.as_numpy("logits")[0, 0] - expected[-1]).max() <= TOLERANCE
    finally:
        second.stop()


def test_stream_requests_of_one_sequence_run_in_order(oip_server: ServerThread, token_model: Path) -> None:
    """Pipelined start, steps and end of one sequence on a stream: in order, then a new start of the same id."""
    name, tokens = name_of(oip_server), np.arange(1, 13, dtype=np.int64)
    done = threading.Event()
    results: list[Any] = []

    def callback(result: Any, error: Any) -> None:
        results.append((result, error))
        if len(results) == 14:
            done.set()

    with triton.InferenceServerClient(oip_server.address) as client:
        client.start_stream(callback=callback)
        for i, token in enumerate(tokens):
            client.async_stream_infer(
                name, [tokens_input([token])], request_id=str(i), sequence_id=600, sequence_start=i == 0,
                sequence_end=i == len(tokens) - 1,
            )
        client.async_stream_infer(name, [tokens_input([1])], request_id="again", sequence_id=600, sequence_start=True,
                                  sequence_end=True)
        client.async_stream_infer(name, [tokens_input([1])], request_id="ended", sequence_id=600)
        assert done.wait(30)
        client.stop_stream()
    errors = [error for _, error in results if error is not None]
    assert len(errors) == 1 and errors[0].message() == not_started(600, name)  # "ended" came after the end
    ids = [result.get_response().id for result, error in results if error is None]
    assert ids == [*map(str, range(len(tokens))), "again"]  # answers in the order sent
    results = [(result, error) for result, error in results if error is None]
    by_id = {result.get_response().id: result.as_numpy("logits")[0, 0] for result, _ in results}
    expected = reference_logits(token_model, tokens)
    assert np.abs(np.stack([by_id[str(i)] for i in range(len(tokens))]) - expected).max() <= TOLERANCE
    assert np.abs(by_id["again"] - expected[0]).max() <= TOLERANCE


def test_a_small_stream_window_holds_requests_back_without_losing_any(token_model: Path) -> None:
    """With a window of 2 requests per stream, 40 pipelined requests of 4 sequences all come back exact."""
    handle = start_server(token_model, max_batch_size=2, max_inflight_per_session=1)
    rng = np.random.default_rng(9)
    sequences = {key: random_tokens(rng, 10) for key in (1, 2, "x", "y")}
    requests = []
    for position in range(10):
        for key, tokens in sequences.items():
            request = triton_pb.ModelInferRequest(model_name=name_of(handle), id=f"{key}/{position}")
            request.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
            request.raw_input_contents.append(tokens[position : position + 1].astype("<i8").tobytes())
            request.parameters["sequence_id"].string_param = str(key)
            request.parameters["sequence_start"].bool_param = position == 0
            requests.append(request)
    try:
        assert handle.server._inference is not None and handle.server._inference.stream_window == 2
        with handle.channel() as channel:
            answers = list(triton_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests)))
    finally:
        handle.stop()
    assert [a.error_message for a in answers] == [""] * len(requests)
    by_id = {a.infer_response.id: a.infer_response for a in answers}
    for key, tokens in sequences.items():
        rows = [np.frombuffer(by_id[f"{key}/{p}"].raw_output_contents[0], "<f4") for p in range(10)]
        assert np.abs(np.stack(rows) - reference_logits(token_model, tokens)).max() <= TOLERANCE, key


def test_stream_answers_come_in_request_order_across_sequences(oip_server: ServerThread, token_model: Path) -> None:
    """Three long requests of one sequence, then three 1-token requests of another, pipelined on one stream:
    the short ones may be computed alongside, but they are answered after the long ones, as sent."""
    name, rng, length = name_of(oip_server), np.random.default_rng(17), 1024
    long_tokens, short_tokens = random_tokens(rng, 3 * length), random_tokens(rng, 3)
    requests = []

    def request(request_id: str, key: int, tokens: np.ndarray, start: bool, end: bool) -> None:
        message = triton_pb.ModelInferRequest(model_name=name, id=request_id)
        message.inputs.add(name="tokens", datatype="INT64", shape=[1, len(tokens)])
        message.raw_input_contents.append(tokens.astype("<i8").tobytes())
        message.parameters["sequence_id"].uint64_param = key
        message.parameters["sequence_start"].bool_param = start
        message.parameters["sequence_end"].bool_param = end
        message.parameters["last_position_only"].bool_param = True
        requests.append(message)

    for i in range(3):
        request(f"X{i + 1}", 9001, long_tokens[i * length : (i + 1) * length], i == 0, i == 2)
    for i in range(3):
        request(f"Y{i + 1}", 9002, short_tokens[i : i + 1], i == 0, i == 2)
    with oip_server.channel() as channel:
        answers = list(triton_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests)))
    assert [a.infer_response.id for a in answers] == ["X1", "X2", "X3", "Y1", "Y2", "Y3"]
    assert [a.error_message for a in answers] == [""] * 6
    last = {a.infer_response.id: np.frombuffer(a.infer_response.raw_output_contents[0], "<f4") for a in answers}
    expected_long = reference_logits(token_model, long_tokens)
    for i in range(3):
        assert np.abs(last[f"X{i + 1}"] - expected_long[(i + 1) * length - 1]).max() <= TOLERANCE
    expected_short = reference_logits(token_model, short_tokens)
    for i in range(3):
        assert np.abs(last[f"Y{i + 1}"] - expected_short[i]).max() <= TOLERANCE


def test_reflection_describes_the_inference_service_without_proto_files(oip_server: ServerThread) -> None:
    """What grpcurl does without -proto: list the services, fetch the descriptors by symbol, and call
    ModelMetadata with messages built from them alone."""
    with oip_server.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        def ask(**fields: str) -> Any:
            (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**fields)]))
            return answer

        services = {s.name for s in ask(list_services="").list_services_response.service}
        assert {"inference.GRPCInferenceService", "lstmserve.v1.LstmServe", "grpc.health.v1.Health"} <= services
        files = ask(file_containing_symbol="inference.GRPCInferenceService").file_descriptor_response
        protos = {proto.name: proto for proto in map(descriptor_pb2.FileDescriptorProto.FromString, files.file_descriptor_proto)}
        pool = descriptor_pool.DescriptorPool()

        def add(file_name: str) -> None:  # each file after the files it imports
            proto = protos.pop(file_name, None)
            if proto is not None:
                for dependency in proto.dependency:
                    add(dependency)
                pool.Add(proto)

        while protos:
            add(next(iter(protos)))
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        method = service.methods_by_name["ModelMetadata"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelMetadata",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        response = call(request_class(name=name_of(oip_server)), timeout=10)
    assert response.name == name_of(oip_server) and response.inputs[0].name == "tokens"
    assert {"ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics"} <= set(service.methods_by_name)


# ---- perf_analyzer -----------------------------------------------------------------------------------
def perf_analyzer_command() -> list[str] | None:
    """How to run Triton's perf_analyzer here: $LSTMSERVE_PERF_ANALYZER, scripts/install_perf_analyzer.sh's
    wrapper, or one on PATH; None if there is none."""
    configured = os.environ.get("LSTMSERVE_PERF_ANALYZER")
    if configured:
        return [configured]
    if PERF_ANALYZER_WRAPPER.exists():
        return [str(PERF_ANALYZER_WRAPPER)]
    found = shutil.which("perf_analyzer")
    return [found] if found else None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["--streaming", "--async", "--sync"])
def test_perf_analyzer_completes_a_concurrency_sweep(token_model: Path, tmp_path: Path, mode: str) -> None:
    """Triton's own load generator, unchanged, against the sequence model: it reads the config and the
    statistics (it aborted on inconsistent compute counts before) and sweeps two concurrency levels."""
    command = perf_analyzer_command()
    if command is None:
        pytest.skip(
            "perf_analyzer is not installed: run scripts/install_perf_analyzer.sh (CI's .ci/run does), "
            "or set LSTMSERVE_PERF_ANALYZER to its path"
        )
    data = tmp_path / "tokens.json"
    data.write_text(json.dumps({"data": [{"tokens": [position % 30 + 1]} for position in range(8)]}))
    handle = start_server(token_model, max_batch_size=16)
    try:
        name = name_of(handle)
        run = subprocess.run(
            [
                *command, "-m", name, "-i", "grpc", "-u", handle.address, mode,
                "--input-data", str(data), "--shape", "tokens:1",
                "--sequence-length", "8", "--sequence-id-range", "1:1000",
                "--concurrency-range", "1:4:3",
                # Windows of a fixed request count, and any three count as stable: the sweep's end, not
                # its figures, is the verdict (the figures belong to docs/benchmarks.md).
                "--measurement-mode", "count_windows", "--measurement-request-count", "40",
                "--stability-percentage", "100000", "--max-trials", "5",
                "-f", str(tmp_path / "sweep.csv"),
            ],
            capture_output=True, text=True, timeout=300,
        )
        with triton.InferenceServerClient(handle.address) as client:
            stats = statistics(client, name)
    finally:
        handle.stop()
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "Server side statistics compute counts must be the same" not in output
    assert re.search(r"^Concurrency: 1, throughput: [\d.]+ infer/sec", output, re.M), output[-4000:]
    assert re.search(r"^Concurrency: 4, throughput: [\d.]+ infer/sec", output, re.M), output[-4000:]
    server_counts = [int(n) for n in re.findall(r"Successful request count: (\d+)", output)]
    assert len(server_counts) == 2 and min(server_counts) > 0  # server-side statistics read at each level
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    # perf_analyzer sorts the rows by throughput, not by concurrency: compare the set of levels.
    assert rows[0].startswith("Concurrency,") and sorted(row.split(",")[0] for row in rows[1:]) == ["1", "4"]
    assert stats.inference_stats.fail.count == 0  # every request of every sequence was accepted


# ---- fuzzing -----------------------------------------------------------------------------------------
FUZZ_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
PARAMETER_VALUES = st.one_of(
    st.booleans().map(lambda v: ("bool_param", v)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: ("int64_param", v)),
    st.integers(0, 2**64 - 1).map(lambda v: ("uint64_param", v)),
    st.text(max_size=8).map(lambda v: ("string_param", v)),
    st.floats(allow_nan=True).map(lambda v: ("double_param", v)),
)
TENSORS = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["tokens", "features", "", "logits"]),
        "datatype": st.sampled_from(["INT64", "INT32", "FP32", "BYTES", ""]),
        "shape": st.lists(st.integers(-3, 2**40), max_size=4) | st.lists(st.integers(0, 3), min_size=2, max_size=2),
        "typed": st.none() | st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6),
    }
)


@pytest.fixture(scope="module")
def control_window() -> list[int]:
    """The tokens fed so far to the fuzz test's control sequence."""
    return []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    model=st.sampled_from(["tokens", "stateless", "", "other"]),
    version=st.sampled_from(["", "1", "2"]),
    tensors=st.lists(TENSORS, max_size=2),
    raw=st.lists(st.binary(max_size=48), max_size=2),
    parameters=st.dictionaries(
        st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "last_position_only", "priority", "x"]),
        PARAMETER_VALUES,
        max_size=4,
    ),
    outputs=st.lists(st.sampled_from(["logits", "probs"]), max_size=2),
)
def test_generated_requests_get_a_status_and_leave_other_sequences_exact(
    oip_server: ServerThread,
    client: triton.InferenceServerClient,
    control_window: list[int],
    model: str,
    version: str,
    tensors: list[dict[str, Any]],
    raw: list[bytes],
    parameters: dict[str, tuple[str, Any]],
    outputs: list[str],
) -> None:
    name = name_of(oip_server)
    named = {"tokens": name, "stateless": stateless_name_of(oip_server)}.get(model, model)
    request = triton_pb.ModelInferRequest(model_name=named, model_version=version)
    for tensor in tensors:
        added = request.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        if tensor["typed"] is not None:
            added.contents.int64_contents.extend(tensor["typed"])
    request.raw_input_contents.extend(raw)
    for key, (field, value) in parameters.items():
        setattr(request.parameters[key], field, value)
    for output in outputs:
        request.outputs.add(name=output)
    with oip_server.channel() as channel:
        try:
            triton_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
    assert code in FUZZ_CODES
    # A control sequence stepped alongside: each step equals the last position of its whole window.
    token = len(control_window) % 7
    control_window.append(token)
    start = len(control_window) == 1
    step = client.infer(name, [tokens_input([token])], sequence_id="control-sequence", sequence_start=start)
    whole = client.infer(stateless_name_of(oip_server), [tokens_input(control_window)]).as_numpy("logits")[0, -1]
    np.testing.assert_allclose(step.as_numpy("logits")[0, 0], whole, atol=1e-5)

