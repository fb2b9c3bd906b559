"""The Open Inference Protocol (KServe V2 gRPC, as Triton extends it) on top of the scheduler.

`inference.GRPCInferenceService` beside lstmserve.v1 on the same port. A request with
Triton's `sequence_id` parameter steps the lstmserve session of that sequence, batched by
the same scheduler as every other session; `sequence_start` begins it from zero state and
`sequence_end` closes it after the request. A request without a sequence runs from zero
state and keeps nothing. The RPCs not declared in proto/lstmserve/inference/ answer
UNIMPLEMENTED.

A sequence's session id is derived from the caller's owner (its API key digest) and the
sequence id: "oip-" + 32 hex digits of a SHA-256. lstmserve's own session ids are 32 hex
digits with no prefix, so the two never collide, two API keys never share a sequence, and
the session table, TTL expiry, state files and spilling need no second table.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2

from lstmserve import __version__
from lstmserve.inference import grpc_service_pb2 as pb
from lstmserve.inference import grpc_service_pb2_grpc as pb_grpc
from lstmserve.inference import model_config_pb2 as config_pb
from lstmserve.metadata import ModelSpec
from lstmserve.server import oip_messages as messages
from lstmserve.server.auth import bearer_key, owner_of
from lstmserve.server.config import ServerConfig
from lstmserve.server.errors import NotSteppable, Overloaded, ServeError, SessionNotFound
from lstmserve.server.handoff import Cluster, check_lease
from lstmserve.server.metrics import Metrics
from lstmserve.server.runner import Runner
from lstmserve.server.scheduler import Scheduler
from lstmserve.server.service import new_session, status_for
from lstmserve.server.sessions import SEQUENCE_ID_PREFIX, Session

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MODEL_VERSION = "1"
PLATFORM = "lstmserve"
EXTENSIONS = ("model_configuration", "sequence", "statistics")
SEQUENCE_PREFIX = SEQUENCE_ID_PREFIX
# Longest wait between tries to close an ended sequence while the request queue is full.
CLOSE_RETRY_MAX_S = 0.05


class ModelNotFound(ServeError):
    """The request names a model (or version) this server does not serve (NOT_FOUND)."""


def sequence_session_id(owner: str, key: int | str) -> str:
    """The lstmserve session id of a sequence: namespaced, per owner, and distinct for 5 and "5"."""
    kind = "s" if isinstance(key, str) else "i"
    digest = hashlib.sha256(f"{owner}\0{kind}\0{key}".encode()).hexdigest()[:32]
    return SEQUENCE_PREFIX + digest


def _code(error: ServeError) -> grpc.StatusCode:
    return grpc.StatusCode.NOT_FOUND if isinstance(error, ModelNotFound) else status_for(error)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """Implements `inference.GRPCInferenceService` for the one model this server serves.

    Args:
        scheduler: the batcher and session table shared with lstmserve.v1.
        runner: the model (for its spec, and for requests without a sequence).
        config: the server settings (limits, TTL, model name, API keys).
        metrics: the server's Prometheus metrics (ModelStatistics reads them).
        health: the grpc.health.v1 servicer; ServerReady follows its overall status.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        runner: Runner,
        config: ServerConfig,
        metrics: Metrics,
        health: health.aio.HealthServicer,
        cluster: Cluster | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.cluster = cluster
        self.runner = runner
        self.spec: ModelSpec = runner.spec
        self.config = config
        self.metrics = metrics
        self.health = health
        self.model_name = config.served_model_name
        self.requests_in_progress = 0
        # Most requests of one ModelStreamInfer stream in progress at once (enough to fill a batch).
        self.stream_window = max(config.max_batch_size, config.max_inflight_per_session)
        self._last_inference_ms = 0

    # ---- helpers ---------------------------------------------------------
    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        if not self.config.api_keys:
            return ""
        return owner_of(bearer_key(context.invocation_metadata()))

    def _check_model(self, name: str, version: str) -> None:
        if name != self.model_name:
            raise ModelNotFound(f"unknown model {messages.show(name)}; this server serves {self.model_name!r}")
        if version not in ("", MODEL_VERSION):
            raise ModelNotFound(f"model {name!r} has no version {messages.show(version)}; it has version {MODEL_VERSION}")

    async def _abort(self, context: grpc.aio.ServicerContext, error: ServeError) -> None:
        code = _code(error)
        self.metrics.errors.labels(code=code.name).inc()
        await context.abort(code, str(error))

    async def _serving(self) -> bool:
        status = await self.health.Check(health_pb2.HealthCheckRequest(service=""), None)
        return status.status == health_pb2.HealthCheckResponse.SERVING

    # ---- health and metadata ---------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self._serving())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            self._check_model(request.name, request.version)
        except ModelNotFound:  # as Triton: a model (or version) it does not serve is not ready, no error
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=await self._serving())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="lstmserve", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            self._check_model(request.name, request.version)
        except ServeError as error:
            await self._abort(context, error)
            raise
        tensor = pb.ModelMetadataResponse.TensorMetadata
        inputs, outputs = messages.input_format(self.spec), messages.output_format(self.spec)
        return pb.ModelMetadataResponse(
            name=self.model_name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[tensor(name=inputs.name, datatype=inputs.datatype, shape=inputs.shape)],
            outputs=[tensor(name=outputs.name, datatype=outputs.datatype, shape=outputs.shape)],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        try:
            self._check_model(request.name, request.version)
        except ServeError as error:
            await self._abort(context, error)
            raise
        return pb.ModelConfigResponse(config=model_config(self.spec, self.config, self.model_name, self.runner))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:  # empty: every model
            try:
                self._check_model(request.name, request.version)
            except ServeError as error:
                await self._abort(context, error)
                raise
        stats = model_statistics(self.metrics, self.model_name, self._last_inference_ms)
        return pb.ModelStatisticsResponse(model_stats=[stats])

    # ---- inference -------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        try:
            return await self._infer(request, self._owner(context))
        except ServeError as error:
            await self._abort(context, error)
            raise

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Runs requests as they arrive, concurrently across sequences and in order within one;
        answers each (in completion order) with a response or an error_message.

        At most `stream_window` requests of a stream are in progress or answered but not yet
        sent; the next one is read when one is sent, so gRPC flow control holds back a client
        that sends faster (or reads slower) than the server answers.
        """
        owner = self._owner(context)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        last_of_sequence: dict[int | str, asyncio.Task[None]] = {}
        tasks: set[asyncio.Task[None]] = set()
        window = asyncio.Semaphore(self.stream_window)

        async def answer(request: pb.ModelInferRequest, previous: asyncio.Task[None] | None) -> None:
            if previous is not None:
                await asyncio.wait([previous])  # the sequence's earlier request first
            answers.put_nowait(await self._stream_answer(request, owner))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    key = messages.sequence_key(request)
                    task = asyncio.create_task(answer(request, last_of_sequence.get(key) if key is not None else None))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    if key is not None:
                        last_of_sequence[key] = task
                        task.add_done_callback(lambda t, k=key: _forget(last_of_sequence, k, t))
                if tasks:
                    await asyncio.wait(set(tasks))
            except Exception as error:  # noqa: BLE001 - the client went away mid-stream
                log.debug("ModelStreamInfer stream ended: %s", error)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                yield item
                window.release()
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _stream_answer(self, request: pb.ModelInferRequest, owner: str) -> pb.ModelStreamInferResponse:
        try:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, owner))
        except ServeError as error:
            code = _code(error)
            message = f"{code.name}: {error}"
        except Exception as error:  # noqa: BLE001 - the stream stays open, as Triton's does
            log.exception("ModelStreamInfer request failed")
            code, message = grpc.StatusCode.INTERNAL, f"INTERNAL: {error}"
        self.metrics.errors.labels(code=code.name).inc()
        failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
        return pb.ModelStreamInferResponse(error_message=message, infer_response=failed)

    async def _infer(self, request: pb.ModelInferRequest, owner: str) -> pb.ModelInferResponse:
        self.requests_in_progress += 1
        try:
            self._check_model(request.model_name, request.model_version)
            call = messages.decode_infer(
                request, self.spec, self.config.max_tokens_per_request, self.config.max_batch_size
            )
            if call.sequence.key is None:
                logits = await asyncio.to_thread(self.runner.run_stateless, call.inputs)
            else:
                logits = (await self._step_sequence(call, owner))[np.newaxis]
        finally:
            self.requests_in_progress -= 1
        self._last_inference_ms = int(time.time() * 1000)
        return messages.infer_response(call, logits, self.spec, self.model_name, MODEL_VERSION)

    async def _step_sequence(self, call: messages.InferCall, owner: str) -> np.ndarray:
        """Feeds a sequence's session (starting or ending it as asked); returns logits [positions, output]."""
        sequence = call.sequence
        assert sequence.key is not None
        if not self.spec.steppable:
            raise NotSteppable("this model is bidirectional and cannot keep sequences; send requests without sequence_id")
        session_id = sequence_session_id(owner, sequence.key)
        scheduler = self.scheduler
        check_lease(self.cluster, session_id)  # with several replicas: UNAVAILABLE while the lease lapsed
        try:
            session = await scheduler.find_session(session_id, owner)
            if sequence.start:  # a start on a live sequence begins it again from zero state
                session = await scheduler.reset_session(session_id, owner)
        except SessionNotFound as error:
            if type(error) is not SessionNotFound:  # a more specific reason (e.g. moved): keep it
                raise
            if sequence.start:
                session = await new_session(scheduler, self.cluster, owner, session_id)
            else:
                raise SessionNotFound(
                    f"sequence {messages.show(sequence.key)} is not active (never started, ended, or idle for more "
                    f"than {self.config.session_ttl_s:g} s): send sequence_start=true to start it"
                ) from None
        result = await scheduler.step(session, call.inputs[0])
        check_lease(self.cluster, session_id)  # acknowledged only while no other replica can have taken it
        if sequence.end:
            await self._close_after_step(session, owner)
        return result.logits

    async def _close_after_step(self, session: Session, owner: str) -> None:
        """Closes a sequence whose sequence_end step ran. The step changed its state, so the request
        must not fail now: a full queue (Overloaded) is waited out instead of answered."""
        delay_s = 0.001
        while session in self.scheduler.sessions:
            try:
                await self.scheduler.close_session(session.id, owner)
                return
            except SessionNotFound:  # already gone (expired): nothing to free
                return
            except Overloaded:
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, CLOSE_RETRY_MAX_S)


def _forget(tasks: dict[int | str, asyncio.Task[None]], key: int | str, task: asyncio.Task[None]) -> None:
    if tasks.get(key) is task:
        del tasks[key]


def model_config(spec: ModelSpec, config: ServerConfig, name: str, runner: Runner) -> config_pb.ModelConfig:
    """The model as Triton's ModelConfig describes it (dims exclude the batch dimension)."""
    types = {"INT64": config_pb.TYPE_INT64, "FP32": config_pb.TYPE_FP32}
    inputs, outputs = messages.input_format(spec), messages.output_format(spec)
    on_gpu = runner.provider == "CUDAExecutionProvider"
    message = config_pb.ModelConfig(
        name=name,
        platform=PLATFORM,
        backend=PLATFORM,
        max_batch_size=config.max_batch_size,
        input=[config_pb.ModelInput(name=inputs.name, data_type=types[inputs.datatype], dims=inputs.shape[1:])],
        output=[config_pb.ModelOutput(name=outputs.name, data_type=types[outputs.datatype], dims=outputs.shape[1:])],
        instance_group=[
            config_pb.ModelInstanceGroup(
                count=1,
                kind=config_pb.ModelInstanceGroup.KIND_GPU if on_gpu else config_pb.ModelInstanceGroup.KIND_CPU,
                gpus=[runner.device_id] if on_gpu else [],
            )
        ],
        default_model_filename=config.model.name,
        model_transaction_policy=config_pb.ModelTransactionPolicy(decoupled=False),
    )
    message.version_policy.latest.num_versions = 1
    if spec.steppable:
        batching = message.sequence_batching
        batching.max_sequence_idle_microseconds = int(config.session_ttl_s * 1_000_000)
        batching.oldest.max_candidate_sequences = config.max_sessions
        batching.oldest.max_queue_delay_microseconds = config.max_wait_us
    details = {
        "kind": spec.kind,
        "head": spec.head,
        "steppable": json.dumps(spec.steppable),
        "fingerprint": spec.fingerprint,
        "vocabulary": json.dumps(list(spec.vocabulary)),
        "max_tokens_per_request": str(config.max_tokens_per_request),
    }
    for key, value in details.items():
        message.parameters[key].string_value = value
    return message


def model_statistics(metrics: Metrics, name: str, last_inference_ms: int) -> pb.ModelStatistics:
    """Triton's statistics from the server's Prometheus metrics (every request of the batcher,
    whichever API sent it): success = lstmserve_steps_total with lstmserve_step_latency_seconds;
    queue = the same latency (arrival at the batcher to result, the batch's compute included);
    compute_infer = lstmserve_compute_seconds (one per batch); fail = lstmserve_errors_total."""
    value = metrics.registry.get_sample_value
    steps = int(value("lstmserve_steps_total") or 0)
    latency_ns = int((value("lstmserve_step_latency_seconds_sum") or 0.0) * 1e9)
    batches = int(value("lstmserve_compute_seconds_count") or 0)
    compute_ns = int((value("lstmserve_compute_seconds_sum") or 0.0) * 1e9)
    failures = sum(
        int(sample.value)
        for family in metrics.errors.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )
    duration = pb.StatisticDuration
    return pb.ModelStatistics(
        name=name,
        version=MODEL_VERSION,
        last_inference=last_inference_ms,
        inference_count=steps,
        execution_count=batches,
        inference_stats=pb.InferStatistics(
            success=duration(count=steps, ns=latency_ns),
            fail=duration(count=failures),
            queue=duration(count=steps, ns=latency_ns),
            compute_infer=duration(count=batches, ns=compute_ns),
        ),
    )


def add_inference_service(
    server: grpc.aio.Server,
    scheduler: Scheduler,
    runner: Runner,
    config: ServerConfig,
    metrics: Metrics,
    health_servicer: health.aio.HealthServicer,
    cluster: Cluster | None = None,
) -> InferenceService:
    """Registers `inference.GRPCInferenceService` on a server; returns the servicer."""
    service = InferenceService(scheduler, runner, config, metrics, health_servicer, cluster)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    return service
