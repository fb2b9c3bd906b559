"""Wiring: builds the runner, state store, scheduler and services into one gRPC server.

`LstmServer` starts and stops everything: the gRPC port (lstmserve.v1, the Open
Inference Protocol, grpc.health.v1, server reflection), the Prometheus metrics
endpoint, and the scheduler's loops. `serve` runs it until SIGTERM/SIGINT, then drains.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from functools import partial

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import start_http_server

from lstmserve.server.auth import ApiKeyInterceptor
from lstmserve.server.config import ConfigError, ServerConfig
from lstmserve.server.grpc_log import quiet_decode_errors
from lstmserve.server.health import HealthServicer
from lstmserve.server.backend import MemoryOnly, SessionBackend
from lstmserve.server.handoff import CLOSED_MARGIN_S, HEARTBEAT_TTL_S, Cluster, ClusterBackend, new_replica_id
from lstmserve.server.keeper import DirectoryBackend, KeeperBase, NotWritten
from lstmserve.server.persistence import DirectorySpill, StateDir
from lstmserve.server.reflection import reflection_pool
from lstmserve.server.session_store import DirectoryStore, RedisStore
from lstmserve.server.snapshot import decode_snapshot, encode_snapshot
from lstmserve.server.device_state import DeviceStateStore
from lstmserve.server.messages import step_output_bytes
from lstmserve.server.metrics import Metrics
from lstmserve.inference import grpc_service_pb2 as inference_pb
from lstmserve.server.oip import InferenceService, add_inference_service
from lstmserve.server.oip import SERVICE_NAME as INFERENCE_SERVICE_NAME
from lstmserve.server.runner import Runner, RunnerOptions
from lstmserve.server.scheduler import Scheduler, SchedulerLimits
from lstmserve.server.service import LstmServeService
from lstmserve.server.state import HostStateStore, StateStore
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LstmServe"].full_name
WARMUP_BATCH_SIZES = (1, 2, 4, 8)
# After the work in progress is done, how long open (idle) streams get before they are cut.
DRAIN_STREAM_GRACE_S = 1.0
# The least time a drain keeps trying the session writes that failed (within the stop grace period
# that docs/scaling.md asks for: delay + grace + the writes).
DRAIN_WRITE_RETRY_S = 3.0


class PortError(OSError):
    """A port the server needs cannot be bound; the message names the address, which port it is, and why."""

    def __init__(self, host: str, port: int, which: str, reason: object) -> None:
        super().__init__(f"cannot listen on {host}:{port}, the {which}: {reason}")


def _bind_error(host: str, port: int) -> str:
    """Why binding host:port fails, asked of the OS directly (grpcio's error does not say)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host.strip("[]"), port))
    except OSError as error:
        return error.strerror or str(error)
    return "grpcio could not bind it"


class LstmServer:
    """One lstmserve server process: load the model, listen, serve, drain.

    Args:
        config: the server settings.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.runner = Runner(
            config.model,
            RunnerOptions(
                providers=config.providers, device_id=config.device_id, intra_op_threads=config.intra_op_threads
            ),
        )
        self.store = make_store(self.runner, config)
        self.health = HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_server: object | None = None
        self.scheduler: Scheduler | None = None
        self._service: LstmServeService | None = None
        self._inference: InferenceService | None = None  # the Open Inference Protocol, same port
        self.keeper: KeeperBase | None = None  # with --state-dir or --session-store
        self.cluster: Cluster | None = None  # with --session-store redis://...
        # Set if the batching loop died (see `_watch_scheduler`): `serve` then exits with status 1.
        self.failed = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Warms the model up, starts listening and returns the bound gRPC port."""
        config = self.config
        smallest = step_output_bytes(1, pb.OUTPUT_LOGITS, 0, self.runner.spec.output_size)
        if config.max_message_bytes < smallest:  # every step's answer would be refused
            raise ConfigError(
                f"max_message_bytes {config.max_message_bytes} is less than a one-position answer of this model "
                f"(about {smallest} bytes: {self.runner.spec.output_size} logits)"
            )
        self._warm_up()
        backend = self._session_backend()
        self.scheduler = Scheduler(
            self.runner,
            self.store,
            scheduler_limits(config),
            self.metrics,
            backend,
        )
        self.scheduler.start()
        self._watchdog = asyncio.create_task(self._watch_scheduler(self.scheduler), name="scheduler watchdog")
        await self._open_backend(backend)
        quiet_decode_errors()
        interceptors = [ApiKeyInterceptor(config.api_keys)] if config.api_keys else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
            ]
        )
        self._service = LstmServeService(self.scheduler, self.runner, config, self.metrics, cluster=self.cluster)
        pb_grpc.add_LstmServeServicer_to_server(self._service, server)
        self._inference = add_inference_service(
            server, self.scheduler, self.runner, config, self.metrics, self.health, self.cluster
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                INFERENCE_SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
            pool=reflection_pool((pb.DESCRIPTOR, inference_pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)),
        )
        if config.metrics_port is not None:  # first: if its port is taken, nothing else has started listening
            try:
                http_server, _ = start_http_server(config.metrics_port, addr=config.host, registry=self.metrics.registry)
            except OSError as error:
                raise PortError(config.host, config.metrics_port, "metrics port (--metrics-port)", error) from None
            self._metrics_server = http_server
            self.metrics_port = int(http_server.server_port)
        address = f"{config.host}:{config.port}"
        try:
            if config.tls is not None:
                self.port = server.add_secure_port(address, config.tls.server_credentials())
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpcio says only "Failed to bind to address"; the OS says why
            self.port = 0
        if self.port == 0:
            raise PortError(config.host, config.port, "gRPC port (--port)", _bind_error(config.host, config.port))
        await server.start()
        self._server = server
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s:%d with %s (%s)",
            config.model,
            config.host,
            self.port,
            self.runner.provider,
            f"metrics on port {self.metrics_port}" if self.metrics_port is not None else "metrics off",
        )
        return self.port

    async def _watch_scheduler(self, scheduler: Scheduler) -> None:
        """If the scheduler's loops ever die (they contain every error they expect), every step would hang:
        reports NOT_SERVING at once, so probes and proxies see it, and sets `failed` so that `serve` exits
        with status 1 and an orchestrator restarts the process."""
        error = await scheduler.failure()
        log.critical("the batching loop stopped (%r): reporting NOT_SERVING and exiting", error, exc_info=error)
        await self.health.enter_graceful_shutdown()
        self.failed.set()

    def _session_backend(self) -> SessionBackend:
        """Where sessions go besides memory: Redis with --session-store, else the state directory if set, else
        nowhere (nothing is opened or read here: see `_open_backend`)."""
        config, spec = self.config, self.runner.spec
        encode = partial(encode_snapshot, fingerprint=spec.fingerprint, secret=config.snapshot_secret)
        if config.session_store is not None:
            decode = partial(
                decode_snapshot,
                fingerprint=spec.fingerprint,
                shape=spec.state_shape,
                secret=config.snapshot_secret,
            )
            store = RedisStore(
                config.session_store,
                new_replica_id(),
                held_ttl_s=config.session_ttl_s + 60,
                released_ttl_s=config.session_ttl_s,
                heartbeat_ttl_s=HEARTBEAT_TTL_S,
                closed_ttl_s=config.session_ttl_s + CLOSED_MARGIN_S,
            )
            return ClusterBackend(
                store, self.metrics, encode, decode, config.session_ttl_s, spills_idle=config.spill_idle
            )
        if config.state_dir is not None:
            state_dir = StateDir(
                config.state_dir,
                fingerprint=spec.fingerprint,
                shape=spec.state_shape,
                secret=config.snapshot_secret,
            )
            return DirectoryBackend(
                DirectoryStore(state_dir, encode), DirectorySpill(state_dir, encode), spills_idle=config.spill_idle
            )
        return MemoryOnly()

    async def _open_backend(self, backend: SessionBackend) -> None:
        """Opens the session backend on the running scheduler: brings back the sessions it holds for this server,
        and starts checkpoints as configured."""
        assert self.scheduler is not None
        restored = await backend.open(self.scheduler)
        self.keeper = backend.keeper
        self.cluster = backend.cluster
        if self.keeper is None:
            return
        log.info("session store %s: restored %d session(s)", self.config.session_store or self.config.state_dir, restored)
        if self.config.checkpoint_interval_s:
            self.keeper.start(self.config.checkpoint_interval_s)

    async def checkpoint(self, *, release: bool = False, retry_s: float = 0.0) -> int:
        """Writes every session whose state changed since it was last written; returns how many (failed
        writes are tried again for up to `retry_s` seconds)."""
        return 0 if self.keeper is None else await self.keeper.checkpoint(release=release, retry_s=retry_s)

    def _warm_up(self) -> None:
        """Runs a few batch sizes once through the real store, on slots taken and released again
        (zeroed) before any session exists, so its buffers and row graphs are warm too."""
        spec = self.runner.spec
        for size in (s for s in WARMUP_BATCH_SIZES if s <= self.store.capacity):
            if spec.kind == "tokens":
                inputs = np.zeros((size, 1), np.int64)
            else:
                inputs = np.zeros((size, 1, spec.input_size), np.float32)
            slots = np.array([self.store.allocate() for _ in range(size)], np.int64)
            buffers = self.store.gather(slots)
            self.runner.run(inputs, buffers)
            self.store.scatter(slots, buffers)
            for slot in reversed(slots):  # back in order, so the lowest slot is handed out first
                self.store.release(int(slot))

    async def drain(self, grace_s: float | None = None) -> bool:
        """Reports NOT_SERVING (and serves on for --drain-delay-s), stops taking sessions, lets requests
        in progress (steps and whole generations) finish within the grace period, writes the sessions to
        the session store (with Redis: and releases them to the other replicas), then stops; streams
        still open then are cut. Returns False if some session could not be written (each is logged)."""
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self.config.drain_delay_s:  # NOT_SERVING, but serving as before while a proxy's health checks notice
            await asyncio.sleep(self.config.drain_delay_s)
        started = time.monotonic()
        if self.cluster is not None:
            self.cluster.draining = True  # sessions asked for from now on are not taken over here
        if self.scheduler is not None:
            self.scheduler.stop_accepting()
            try:
                await asyncio.wait_for(self._work_done(), timeout=grace)
            except TimeoutError:
                log.warning("grace period of %.1f s ended with requests still in progress", grace)
        if self.keeper is not None:
            self.keeper.stop()
        if self.scheduler is not None:
            self.scheduler.freeze()  # nothing acknowledged after this point: the write below has it all
            await self._work_done()
        complete = True
        try:
            # With Redis, every session is released too. A failed write (a Redis blip, a full disk) is tried
            # again while the grace period lasts, and for a few seconds at least.
            retry_s = max(DRAIN_WRITE_RETRY_S, grace - (time.monotonic() - started))
            written = await self.checkpoint(release=True, retry_s=retry_s)
            if self.keeper is not None:
                log.info("wrote %d session(s) to %s", written, self.config.session_store or self.config.state_dir)
        except NotWritten as error:  # they resume from their last checkpoint, if they had one
            complete = False
            log.error("drain: %s", error.describe(limit=len(error.failures) + len(error.unremoved)))
        except Exception:  # noqa: BLE001 - as above, for an error the keeper did not expect
            complete = False
            log.exception("writing the sessions on drain failed")
        remaining = max(0.0, grace - (time.monotonic() - started))
        await self.stop(min(remaining, DRAIN_STREAM_GRACE_S))
        return complete

    async def _work_done(self) -> None:
        """Returns when no step request or generation is in progress or queued."""
        while (
            (self._service is not None and self._service.requests_in_progress)
            or (self._inference is not None and self._inference.requests_in_progress)
            or (self.scheduler is not None and not self.scheduler.is_idle())
        ):
            await asyncio.sleep(0.01)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stops the gRPC server, the scheduler and the metrics endpoint (writes nothing: see `drain`)."""
        if self.keeper is not None:
            self.keeper.stop()
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        if self.cluster is not None:
            await self.cluster.stop()
            self.cluster = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.scheduler is not None:
            await self.scheduler.close()
            self.scheduler = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()  # type: ignore[attr-defined]
            self._metrics_server.server_close()  # type: ignore[attr-defined]
            self._metrics_server = None

    async def wait_for_termination(self) -> None:
        """Returns when the gRPC server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()


def scheduler_limits(config: ServerConfig) -> SchedulerLimits:
    """The scheduler's limits from the server's settings."""
    return SchedulerLimits(
        max_batch_size=config.max_batch_size,
        max_wait_us=config.max_wait_us,
        idle_spin_us=config.idle_spin_us,
        max_queue=config.max_queue,
        session_ttl_s=config.session_ttl_s,
        max_inflight_per_session=config.max_inflight_per_session,
        batches_in_flight=config.batches_in_flight,
    )


def make_store(runner: Runner, config: ServerConfig) -> StateStore:
    """The state store for this provider: device buffers with CUDA (or when asked), else host pools."""
    spec = runner.spec
    on_cuda = runner.provider == "CUDAExecutionProvider"
    placement = config.state_placement
    if placement == "device" or (placement == "auto" and on_cuda):
        store = DeviceStateStore(
            *spec.state_shape,
            config.max_sessions,
            providers=runner.providers,
            provider_options=runner.provider_options,
            device="cuda" if on_cuda else "cpu",
            device_id=runner.device_id if on_cuda else 0,
        )
        log.info("session state on %s (ONNX Runtime device buffers)", store.device)
        return store
    log.info("session state in host memory")
    return HostStateStore(*spec.state_shape, config.max_sessions)


async def serve(config: ServerConfig) -> int:
    """Runs a server until SIGTERM or SIGINT, then drains it. Returns the process's exit status: 0 after a
    complete drain, 1 if some session could not be written or the batching loop died."""
    server = LstmServer(config)
    try:
        await server.start()
    except BaseException:
        await server.stop()  # whatever had started (the scheduler, a listening port) stops cleanly
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = f", metrics on port {server.metrics_port}" if server.metrics_port is not None else ""
    print(f"lstmserve: serving on {config.host}:{server.port} ({server.runner.provider}){metrics}", flush=True)
    return await run_until_stopped(server, stop)


async def run_until_stopped(server: LstmServer, stop: asyncio.Event) -> int:
    """Serves until `stop` is set (then drains) or the server fails (then stops at once); returns the exit
    status `serve` gives the process."""
    stopping = asyncio.create_task(stop.wait())
    failing = asyncio.create_task(server.failed.wait())
    await asyncio.wait((stopping, failing), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    failing.cancel()
    if server.failed.is_set():
        # Steps would hang: no drain (it needs the loop). Sessions resume from their last checkpoint.
        await server.stop(0)
        log.critical("stopped after a failure of the batching loop: exit status 1")
        return 1
    log.info("signal received: draining (grace %.1f s)", server.config.grace_s)
    complete = await server.drain()
    if not complete:
        log.error("stopped, but some sessions were not written (listed above): exit status 1")
        return 1
    log.info("stopped")
    return 0
