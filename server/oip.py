"""The Open Inference Protocol (KServe V2 gRPC, as Triton extends it) on top of the scheduler.

`inference.GRPCInferenceService` beside lstmserve.v1 on the same port, behaving as Triton's
sequence batcher does where clients depend on it (docs/oip.md lists the differences). A request
to the sequence model carries Triton's `sequence_id` parameter and steps the lstmserve session of
that sequence, batched by the same scheduler as every other session; `sequence_start` begins it
from zero state and `sequence_end` closes it after the request. A request without a sequence id is
refused, as Triton refuses it; whole sequences from zero state go to the stateless model
(`oip_models.py`). The RPCs not declared in proto/lstmserve/inference/ answer UNIMPLEMENTED.

A sequence's session id is derived from the caller's owner (its API key digest) and the
sequence id: "oip-" + 32 hex digits of a SHA-256. lstmserve's own session ids are 32 hex
digits with no prefix, so the two never collide, two API keys never share a sequence, and
the session table, TTL expiry, state files and spilling need no second table.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2

from lstmserve import __version__
from lstmserve.inference import grpc_service_pb2 as pb
from lstmserve.inference import grpc_service_pb2_grpc as pb_grpc
from lstmserve.metadata import ModelSpec
from lstmserve.server import oip_messages as messages
from lstmserve.server.auth import bearer_key, owner_of
from lstmserve.server.config import ServerConfig
from lstmserve.server.errors import InvalidInput, ModelNotFound, NotSteppable, Overloaded, ServeError, SessionNotFound
from lstmserve.server.handoff import Cluster, check_lease
from lstmserve.server.metrics import Metrics
from lstmserve.server.oip_models import (
    EXTENSIONS,
    MODEL_VERSION,
    ServedModel,
    model_config,
    model_metadata,
    model_statistics,
    served_models,
)
from lstmserve.server.runner import Runner
from lstmserve.server.scheduler import Scheduler
from lstmserve.server.session_ops import new_session
from lstmserve.server.sessions import SEQUENCE_ID_PREFIX, Session
from lstmserve.server.statistics import BatchTiming
from lstmserve.server.status import refusals, status_for

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SEQUENCE_PREFIX = SEQUENCE_ID_PREFIX
# Longest wait between tries to close an ended sequence while the request queue is full.
CLOSE_RETRY_MAX_S = 0.05


def sequence_session_id(owner: str, key: int | str) -> str:
    """The lstmserve session id of a sequence: namespaced, per owner, and distinct for 5 and "5"."""
    kind = "s" if isinstance(key, str) else "i"
    digest = hashlib.sha256(f"{owner}\0{kind}\0{key}".encode()).hexdigest()[:32]
    return SEQUENCE_PREFIX + digest


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """Implements `inference.GRPCInferenceService` for the model this server serves (under the names
    of `oip_models.served_models`).

    Args:
        scheduler: the batcher and session table shared with lstmserve.v1.
        runner: the model (for its spec, and for the stateless model's requests).
        config: the server settings (limits, TTL, model name, API keys).
        metrics: the server's metrics (errors; the batcher's statistics for ModelStatistics).
        health: the grpc.health.v1 servicer; ServerReady follows its overall status.
        cluster: with several replicas, the shared session store's leases.
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
        self.models = served_models(self.spec, self.model_name, metrics.statistics)
        self.requests_in_progress = 0
        # Most requests of one ModelStreamInfer stream in progress at once (enough to fill a batch).
        self.stream_window = max(config.max_batch_size, config.max_inflight_per_session)

    # ---- helpers ---------------------------------------------------------
    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        if not self.config.api_keys:
            return ""
        return owner_of(bearer_key(context.invocation_metadata()))

    def _model(self, name: str, version: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            served = " and ".join(repr(n) for n in self.models)
            raise ModelNotFound(f"unknown model {messages.show(name)}; this server serves {served}")
        if version not in ("", MODEL_VERSION):
            raise ModelNotFound(f"model {name!r} has no version {messages.show(version)}; it has version {MODEL_VERSION}")
        return model

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
            self._model(request.name, request.version)
        except ModelNotFound:  # as Triton: a model (or version) it does not serve is not ready, no error
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=await self._serving())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="lstmserve", version=__version__, extensions=EXTENSIONS)

    @refusals(pb.ModelMetadataResponse)
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return model_metadata(self.spec, self._model(request.name, request.version))

    @refusals(pb.ModelConfigResponse)
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        model = self._model(request.name, request.version)
        on_gpu = self.runner.provider == "CUDAExecutionProvider"
        config = model_config(self.spec, self.config, model, on_gpu=on_gpu, device_id=self.runner.device_id)
        return pb.ModelConfigResponse(config=config)

    @refusals(pb.ModelStatisticsResponse)
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if not request.name:  # every model
            return pb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in self.models.values()])
        model = self._model(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(model)])

    # ---- inference -------------------------------------------------------
    @refusals(pb.ModelInferResponse)
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self._infer(request, self._owner(context))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Runs requests as they arrive, concurrently across sequences and in order within one, and
        answers each with a response or an error_message, in the order the requests came (as Triton
        does for a model that is not decoupled).

        At most `stream_window` requests of a stream are in progress or answered but not yet
        sent; the next one is read when one is sent, so gRPC flow control holds back a client
        that sends faster (or reads slower) than the server answers.
        """
        owner = self._owner(context)
        # The stream's requests in arrival order, each as the task that answers it (None: no more).
        answers: asyncio.Queue[asyncio.Task[pb.ModelStreamInferResponse] | None] = asyncio.Queue()
        last_of_sequence: dict[int | str, asyncio.Task[pb.ModelStreamInferResponse]] = {}
        tasks: set[asyncio.Task[pb.ModelStreamInferResponse]] = set()
        window = asyncio.Semaphore(self.stream_window)

        async def answer(
            request: pb.ModelInferRequest, previous: asyncio.Task[pb.ModelStreamInferResponse] | None
        ) -> pb.ModelStreamInferResponse:
            if previous is not None:
                await asyncio.wait([previous])  # the sequence's earlier request first
            return await self._stream_answer(request, owner)

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
                        task.add_done_callback(functools.partial(_forget, last_of_sequence, key))
                    answers.put_nowait(task)
            except Exception as error:  # noqa: BLE001 - the client went away mid-stream
                log.debug("ModelStreamInfer stream ended: %s", error)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await answers.get()) is not None:
                yield await task
                window.release()
        finally:
            reader.cancel()
            for pending in list(tasks):
                pending.cancel()

    async def _stream_answer(self, request: pb.ModelInferRequest, owner: str) -> pb.ModelStreamInferResponse:
        """One stream request's answer: its response, or Triton's error_message (the bare message) with
        the request's id; the stream stays open either way."""
        try:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, owner))
        except ServeError as error:
            code, message = status_for(error), str(error)
        except Exception as error:  # noqa: BLE001 - the stream stays open, as Triton's does
            log.exception("ModelStreamInfer request failed")
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {error}"
        self.metrics.errors.labels(code=code.name).inc()
        failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
        return pb.ModelStreamInferResponse(error_message=message, infer_response=failed)

    async def _infer(self, request: pb.ModelInferRequest, owner: str) -> pb.ModelInferResponse:
        self.requests_in_progress += 1
        try:
            model = self._model(request.model_name, request.model_version)
            arrived = time.perf_counter()
            try:
                if not model.sequences:
                    self._check_no_sequence(messages.decode_sequence(request), model)
                call = messages.decode_infer(
                    request, self.spec, self.config.max_tokens_per_request, self.config.max_batch_size
                )
                if model.sequences:
                    logits = (await self._step_sequence(call, owner, model.name))[np.newaxis]
                else:
                    logits = await self._run_stateless(call, model)
            except ServeError:
                model.statistics.failed(time.perf_counter() - arrived)
                raise
        finally:
            self.requests_in_progress -= 1
        return messages.infer_response(call, logits, self.spec, model.name, MODEL_VERSION)

    def _check_no_sequence(self, sequence: messages.Sequence, model: ServedModel) -> None:
        """Refuses sequence parameters sent to a stateless model (Triton would ignore them: here a client
        that believes its state is kept learns at once that it is not)."""
        if sequence.key is None and not (sequence.start or sequence.end):
            return
        if self.spec.steppable:
            raise InvalidInput(
                f"model {model.name!r} runs each request from zero state and keeps no sequence: send it without "
                f"sequence_id, sequence_start and sequence_end, or send sequences to model {self.model_name!r}"
            )
        if sequence.key is not None:
            raise NotSteppable("this model is bidirectional and cannot keep sequences; send requests without sequence_id")
        raise InvalidInput("sequence_start and sequence_end need a non-zero (or non-empty) sequence_id")

    async def _run_stateless(self, call: messages.InferCall, model: ServedModel) -> np.ndarray:
        """Runs a request's whole input from zero state on a worker thread (outside the batcher);
        records it in the model's statistics as one execution."""
        queued = time.perf_counter()

        def run() -> tuple[np.ndarray, float, float]:
            started = time.perf_counter()
            logits = self.runner.run_stateless(call.inputs)
            return logits, started, time.perf_counter()

        logits, started, finished = await asyncio.to_thread(run)
        timing = BatchTiming(started=started, input_s=0.0, infer_s=finished - started, output_s=0.0)
        batch = int(call.inputs.shape[0])
        model.statistics.record(batch, timing, requests=1, waiting_since_sum=queued, finished=finished, inferences=batch)
        return logits

    async def _step_sequence(self, call: messages.InferCall, owner: str, model_name: str) -> np.ndarray:
        """Feeds a sequence's session (starting or ending it as asked); returns logits [positions, output]."""
        sequence = call.sequence
        if sequence.key is None:
            raise InvalidInput(messages.no_sequence_message(model_name))
        session_id = sequence_session_id(owner, sequence.key)
        check_lease(self.cluster, session_id)  # with several replicas: UNAVAILABLE while the lease lapsed
        try:
            session = await self._sequence_session(session_id, owner, sequence.start)
            result = await self.scheduler.step(session, call.inputs[0])
        except SessionNotFound as error:
            if type(error) is not SessionNotFound:  # a more specific reason (e.g. moved): keep it
                raise
            # Never started, ended, expired (idle past the TTL), or closed while this request waited.
            raise InvalidInput(messages.not_started_message(sequence.key, model_name)) from None
        check_lease(self.cluster, session_id)  # acknowledged only while no other replica can have taken it
        if sequence.end:
            await self._close_after_step(session, owner)
        return result.logits

    async def _sequence_session(self, session_id: str, owner: str, start: bool) -> Session:
        """The live session of a sequence; with `start`, reset to zero state, or created if it is not live.
        SessionNotFound if it is not live and this is not a start."""
        scheduler = self.scheduler
        try:
            session = await scheduler.find_session(session_id, owner)
            if start:  # a start on a live sequence begins it again from zero state
                session = await scheduler.reset_session(session_id, owner)
            return session
        except SessionNotFound as error:
            if type(error) is not SessionNotFound or not start:
                raise
        return await new_session(scheduler, self.cluster, owner, session_id)

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


def _forget(tasks: dict[int | str, asyncio.Task[pb.ModelStreamInferResponse]], key: int | str, task: asyncio.Task[pb.ModelStreamInferResponse]) -> None:
    if tasks.get(key) is task:
        del tasks[key]


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
