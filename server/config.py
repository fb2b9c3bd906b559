"""Server settings: one frozen dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import grpc


STATE_PLACEMENTS = ("auto", "host", "device")
SESSION_STORE_SCHEMES = ("redis://", "rediss://", "unix://")
# Polling longer than this after a step cannot help a client whose next step comes later still.
MAX_IDLE_SPIN_US = 100_000
# The longest duration setting taken (TTL, grace, checkpoint interval, drain delay): ten years.
MAX_DURATION_S = 10 * 365 * 24 * 3600


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS: the server's certificate chain and key, and optionally the CA that
    client certificates must be signed by (then a client certificate is required)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials from the files (ConfigError if one cannot be read)."""
        try:
            chain, key = self.cert.read_bytes(), self.key.read_bytes()
            client_ca = self.client_ca.read_bytes() if self.client_ca else None
        except OSError as error:
            raise ConfigError(f"cannot read a TLS file: {error}") from error
        return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca, require_client_auth=bool(client_ca))


class ConfigError(ValueError):
    """A setting has a bad value; the message names it."""


@dataclass(frozen=True)
class ServerConfig:
    """Settings of `lstmserve serve` (each has a CLI flag and an LSTMSERVE_* variable).

    Args:
        model: path to the exported `model.onnx`.
        model_name: the model's name on the Open Inference Protocol ("": the model file's folder name).
        host, port: where gRPC listens (port 0 picks a free port).
        metrics_port: Prometheus HTTP port; None disables metrics, 0 picks a free port.
        providers: ONNX Runtime providers in order of preference ("auto" = CUDA if available, else CPU).
        device_id: CUDA device index.
        intra_op_threads: ONNX Runtime intra-op threads (0 = ONNX Runtime's default).
        max_batch_size: most sessions stepped in one ONNX Runtime call.
        batches_in_flight: batches computing at once, 1 or 2 (2: the next batch forms and waits while one
            computes; with state in host memory only, else 1).
        max_wait_us: after an idle spell, how long the batcher waits for more requests once
            the first one arrives (0 = run at once; batches still form while a step runs).
        idle_spin_us: after a step of a session stepping alone, how long the event loop keeps
            polling instead of sleeping, so that the session's next step finds the core awake
            (0 = sleep at once; see Scheduler._keep_awake).
        max_sessions: most live sessions; also the size of the state pools.
        session_ttl_s: a session idle this long is closed.
        max_tokens_per_request: most tokens (or feature rows) in one request.
        max_generate_tokens: most tokens one generation request may ask for.
        max_stop_strings: most stop strings one generation request may carry.
        max_stop_chars: most characters in one stop string.
        max_sessions_per_request: most entries (sessions) in one StepSessions request.
        max_queue: most requests waiting for the batcher; more gets RESOURCE_EXHAUSTED.
        max_inflight_per_session: most requests one session may have waiting (pipelined on
            its stream); more gets RESOURCE_EXHAUSTED, so one client cannot fill the queue.
        max_message_bytes: largest gRPC message accepted or sent.
        grace_s: on SIGTERM, how long in-flight work may take before the server exits.
        snapshot_secret: key for the HMAC that signs snapshots (None: a plain checksum).
        state_dir: where session files are written on drain (and by checkpoints) and read at start.
        checkpoint_interval_s: with state_dir, write changed sessions this often (0: only on drain).
        spill_idle: with state_dir, sessions idle past the TTL are written there instead of
            dropped, and come back on their next request.
        session_store: a Redis URL (`redis://HOST:PORT/DB`): sessions are shared with the other
            replicas using it (written there on drain, by checkpoints and when spilled, and taken
            over when asked for); instead of state_dir.
        drain_delay_s: on SIGTERM, how long to go on serving after reporting NOT_SERVING (so that a
            proxy's health checks take the server out first), before the grace period starts.
        tls: server certificate and key (and optionally a CA for client certificates); None: plaintext.
        api_keys: accepted API keys (`authorization: Bearer KEY`); empty: no authentication.
        state_placement: where session state lives: "auto" (on the GPU with CUDA, else host
            memory), "host", or "device" (ONNX Runtime buffers on the provider's device).
    """

    model: Path
    model_name: str = ""
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = None
    providers: tuple[str, ...] = ("auto",)
    device_id: int = 0
    intra_op_threads: int = 0
    max_batch_size: int = 256
    batches_in_flight: int = 1
    max_wait_us: int = 0
    idle_spin_us: int = 500
    max_sessions: int = 10_000
    session_ttl_s: float = 900.0
    max_tokens_per_request: int = 4096
    max_generate_tokens: int = 4096
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_sessions_per_request: int = 1024
    max_queue: int = 65_536
    max_inflight_per_session: int = 64
    max_message_bytes: int = 16 * 1024 * 1024
    grace_s: float = 10.0
    state_placement: str = "auto"
    snapshot_secret: bytes | None = field(default=None, repr=False)
    api_keys: frozenset[str] = field(default=frozenset(), repr=False)
    tls: TlsFiles | None = None
    state_dir: Path | None = None
    checkpoint_interval_s: float = 0.0
    spill_idle: bool = False
    session_store: str | None = None
    drain_delay_s: float = 0.0

    def __post_init__(self) -> None:
        positive = {
            "max_batch_size": self.max_batch_size,
            "max_sessions": self.max_sessions,
            "max_tokens_per_request": self.max_tokens_per_request,
            "max_generate_tokens": self.max_generate_tokens,
            "max_stop_strings": self.max_stop_strings,
            "max_stop_chars": self.max_stop_chars,
            "max_sessions_per_request": self.max_sessions_per_request,
            "max_queue": self.max_queue,
            "max_inflight_per_session": self.max_inflight_per_session,
            "max_message_bytes": self.max_message_bytes,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        durations = {
            "session_ttl_s": self.session_ttl_s,
            "grace_s": self.grace_s,
            "checkpoint_interval_s": self.checkpoint_interval_s,
            "drain_delay_s": self.drain_delay_s,
        }
        for name, seconds in durations.items():  # NaN and infinity too: a drain that never ends, a sweep that fails
            if not (math.isfinite(seconds) and 0 <= seconds <= MAX_DURATION_S):
                raise ConfigError(f"{name} must be a number of seconds in 0..{MAX_DURATION_S:,}, got {seconds}")
        if self.session_ttl_s == 0:
            raise ConfigError("session_ttl_s must be positive, got 0")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.max_wait_us < 0:
            raise ConfigError(f"max_wait_us must be >= 0, got {self.max_wait_us}")
        if not 0 <= self.idle_spin_us <= MAX_IDLE_SPIN_US:
            raise ConfigError(f"idle_spin_us must be in 0..{MAX_IDLE_SPIN_US}, got {self.idle_spin_us}")
        if self.batches_in_flight not in (1, 2):
            raise ConfigError(f"batches_in_flight must be 1 or 2, got {self.batches_in_flight}")
        if self.intra_op_threads < 0:
            raise ConfigError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")
        if self.session_store is not None:
            if not self.session_store.startswith(SESSION_STORE_SCHEMES):
                raise ConfigError(f"session_store must be a redis://HOST:PORT/DB URL, got {self.session_store!r}")
            if self.state_dir is not None:
                raise ConfigError("use either state_dir (--state-dir) or session_store (--session-store), not both")
        kept = self.state_dir is not None or self.session_store is not None
        if self.checkpoint_interval_s and not kept:
            raise ConfigError("checkpoint_interval_s needs a state_dir (--state-dir) or a session_store (--session-store)")
        if self.spill_idle and not kept:
            raise ConfigError("spill_idle needs a state_dir (--state-dir) or a session_store (--session-store)")
        if self.state_placement not in STATE_PLACEMENTS:
            raise ConfigError(f"state_placement must be one of {STATE_PLACEMENTS}, got {self.state_placement!r}")
        if not self.providers:
            raise ConfigError("providers must name at least one provider")
        if self.model_name.strip() != self.model_name or "/" in self.model_name:
            raise ConfigError(f"model_name must have no slashes or surrounding spaces, got {self.model_name!r}")

    @property
    def served_model_name(self) -> str:
        """The model's name on the Open Inference Protocol: model_name, else the model file's folder name."""
        return self.model_name or self.model.absolute().parent.name or "model"
