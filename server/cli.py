"""`lstmserve serve`: every flag also reads an LSTMSERVE_* environment variable (the flag wins)."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any

from lstmserve import cli_values

ENV_PREFIX = "LSTMSERVE_"

# How long a thread may keep the GIL while another waits for it. The worker thread that runs ONNX
# Runtime must take the GIL back after every call; while the event loop is busy, a 4.8 ms model call
# on 256 rows took 10.5 ms with Python's default (5 ms), 5.6 with 0.5 ms and 5.1 with 0.1 ms
# (scripts/worker_gil_wait.py). Only the worker waits for the GIL, once per batch, so a short
# interval costs the loop little; 0.1 ms against 0.5 ms gave a 256-session generation 6% more tokens/s
# (docs/benchmarks.md).
GIL_SWITCH_INTERVAL_S = 0.0001

# Collect the youngest generation of cyclic garbage once this many more container objects were made than
# freed, not Python's default 700. Every step makes and frees futures, lists and messages: in a
# 256-session generation, 700 meant about 420 young and 37 middle collections in 6 s (about 130 ms
# in all), 10,000 meant one
# (scripts/gc_cost.py, with the imports frozen as below; without that, the 3 or 4 full collections
# in those 6 s each stopped every session for up to 20 ms instead of about 2).
# Not higher. With 4,096 sessions generating (batches of about 2,048, two in flight), 10,000 still means about 40
# young and 3 or 4 middle collections in a 7 s run, about 0.65 s in all, freeing nothing, and 100,000 meant one
# (`scripts/gc_cost.py N --engine --batches-in-flight 2 --model models/tiny/model.onnx --sessions 4096`). But gRPC's
# server leaves a reference cycle behind every call, and until a collection frees it, each `Step` stream refused for
# a bad token in a 4,001-token request keeps about 75 KB: the memory a client can pin grows with the threshold (over
# 8,000 such streams the server's RSS rose at most 59 MB with 10,000, and 526 MB with 100,000:
# `scripts/refused_stream_memory.py --threshold N`).
GC_YOUNG_THRESHOLD = 10_000


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _add(
    parser: argparse.ArgumentParser, flag: str, *, type: Any, default: Any, help: str, unset: str = "unset"
) -> None:
    """Adds a flag whose default comes from its environment variable when that is set. `unset` is what the
    help says for a default of None or "" (say "off", or what the server does instead)."""
    env = _env_name(flag)
    raw = os.environ.get(env)
    value = default
    if raw is not None:
        try:
            value = type(raw)
        except ValueError:
            parser.error(f"environment variable {env}={raw!r} is not a valid {type.__name__}")
    shown = "%(default)s" if value not in (None, "") else unset
    parser.add_argument(flag, type=type, default=value, help=f"{help} (env {env}; default: {shown})")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(text)
    return level


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off", ""):
        raise ValueError(text)
    return value in ("1", "true", "yes", "on")


def _optional_path(text: str) -> Path | None:
    return Path(text) if text else None


def _optional_str(text: str) -> str | None:
    return text or None


def _optional_port(text: str) -> int | None:
    return None if text.lower() in ("", "none", "off") else int(text)


def add_parsers(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Registers `serve`."""
    p = subparsers.add_parser(
        "serve",
        help="serve an exported model over gRPC",
        description="Serve a model written by `lstmserve export` over gRPC: per-session state on the server, "
        "steps of many sessions batched into one ONNX Runtime call. Stops gracefully on SIGTERM.",
    )
    _add(
        p,
        "--model",
        type=Path,
        default=Path("models/default/model.onnx"),
        help="the exported model.onnx, or the folder that holds it",
    )
    _add(
        p,
        "--model-name",
        type=str,
        default="",
        help="the model's name on the Open Inference Protocol (KServe V2 / Triton)",
        unset="the model file's folder name",
    )
    _add(p, "--host", type=str, default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    _add(p, "--port", type=int, default=50051, help="gRPC port (0 picks a free one)")
    _add(
        p, "--metrics-port", type=_optional_port, default=None, help="Prometheus metrics HTTP port ('off' disables)", unset="off"
    )
    _add(p, "--providers", type=str, default="auto", help="ONNX Runtime providers, comma-separated: auto, cuda, cpu")
    _add(p, "--device-id", type=int, default=0, help="CUDA device index")
    _add(p, "--intra-op-threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its default)")
    _add(p, "--max-batch-size", type=int, default=256, help="most sessions stepped in one ONNX Runtime call")
    _add(p, "--batches-in-flight", type=int, default=1,
         help="batches computing at once, 1 or 2 (2: the next batch forms while one computes; state in host memory only)")  # fmt: skip
    _add(p, "--max-wait-us", type=int, default=0, help="after an idle spell, wait this long for more requests before the first batch")
    _add(p, "--idle-spin-us", type=int, default=500,
         help="after a step of a session stepping alone, keep polling this long instead of sleeping (0 = off)")  # fmt: skip
    _add(p, "--max-sessions", type=int, default=10_000, help="most live sessions (size of the state pools)")
    _add(p, "--session-ttl-s", type=float, default=900.0, help="close a session after this many idle seconds")
    _add(p, "--max-tokens-per-request", type=int, default=4096, help="most tokens or feature rows in one request")
    _add(p, "--max-generate-tokens", type=int, default=4096, help="most tokens one generation may ask for")
    _add(p, "--max-stop-strings", type=int, default=16, help="most stop strings one generation request may carry")
    _add(p, "--max-stop-chars", type=int, default=256, help="most characters in one stop string")
    _add(p, "--max-sessions-per-request", type=int, default=1024, help="most sessions stepped by one StepSessions request")
    _add(p, "--max-queue", type=int, default=65_536, help="most requests waiting for the batcher")
    _add(p, "--max-inflight-per-session", type=int, default=64, help="most requests one session may have waiting")
    _add(p, "--max-message-bytes", type=int, default=16 * 1024 * 1024, help="largest gRPC message")
    _add(p, "--grace-s", type=float, default=10.0, help="on SIGTERM, how long in-flight work may take")
    _add(
        p,
        "--state-placement",
        type=str,
        default="auto",
        help="where session state lives: auto (GPU memory with CUDA, else host), host, or device",
    )
    _add(
        p,
        "--state-dir",
        type=_optional_path,
        default=None,
        help="directory for the sessions: a checkpoint file written on SIGTERM (and by checkpoints), read back at start",
        unset="none: sessions live in memory only",
    )
    _add(
        p,
        "--checkpoint-interval-s",
        type=float,
        default=0.0,
        help="with --state-dir, write changed sessions this often, bounding what a crash loses (0: off)",
    )
    _add(
        p,
        "--spill-idle",
        type=_flag,
        default=False,
        help="with --state-dir, write sessions idle past the TTL there instead of dropping them (true/false)",
    )
    _add(
        p,
        "--session-store",
        type=_optional_str,
        default=None,
        help="redis://HOST:PORT/DB: share sessions with the other replicas using this Redis (written there on "
        "drain and by checkpoints, taken over when asked for); replaces --state-dir",
        unset="none: one server on its own",
    )
    _add(
        p,
        "--drain-delay-s",
        type=float,
        default=0.0,
        help="on SIGTERM, go on serving this long after reporting NOT_SERVING, so a proxy's health checks "
        "take the server out first (behind Envoy: at least its health-check interval)",
    )
    _add(
        p,
        "--tls-cert-file",
        type=_optional_path,
        default=None,
        help="server certificate chain (PEM); enables TLS",
        unset="none: plaintext",
    )
    _add(
        p, "--tls-key-file", type=_optional_path, default=None, help="server private key (PEM), with --tls-cert-file", unset="none"
    )
    _add(
        p,
        "--tls-client-ca-file",
        type=_optional_path,
        default=None,
        help="CA (PEM) that client certificates must be signed by; clients then need a certificate",
        unset="none: no client certificates",
    )
    _add(
        p,
        "--api-keys-file",
        type=_optional_path,
        default=None,
        help="file of accepted API keys, one per line; calls then need 'authorization: Bearer KEY'",
        unset="none: open to every caller",
    )
    _add(
        p,
        "--snapshot-secret-file",
        type=_optional_path,
        default=None,
        help="file whose contents key the HMAC that signs session snapshots and state files",
        unset="none: a plain checksum",
    )
    _add(p, "--log-level", type=_log_level, default="INFO", help="logging level: DEBUG, INFO, WARNING or ERROR")
    p.set_defaults(run=run_serve)

    h = subparsers.add_parser(
        "health",
        help="check a server's grpc.health.v1 status (exit 0 when SERVING)",
        description="Query the standard gRPC health service of a running server; exit 0 if it is SERVING, "
        "1 otherwise (used by container health checks).",
    )
    _add(h, "--target", type=cli_values.target, default="127.0.0.1:50051", help="server address HOST:PORT")
    h.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    h.add_argument("--timeout", type=cli_values.seconds, default=3.0, help="seconds to wait for the answer")
    h.add_argument("--tls-ca-file", type=Path, default=None, help="CA (PEM) to verify a TLS server with")
    h.set_defaults(run=run_health)


def run_serve(args: argparse.Namespace) -> int:
    """Runs the server until SIGTERM/SIGINT."""
    import asyncio

    from lstmserve.metadata import ModelSpecError
    from lstmserve.server.auth import ApiKeyError, load_api_keys
    from lstmserve.server.app import serve
    from lstmserve.server.config import ConfigError, ServerConfig, TlsFiles
    from lstmserve.server.runner import ModelLoadError, ProviderError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = args.model / "model.onnx" if args.model.is_dir() else args.model
    if not model.is_file():
        where = f"folder {str(args.model)!r} holds no model.onnx" if args.model.is_dir() else f"model file {str(args.model)!r} not found"
        print(f"lstmserve serve: error: {where} (run `lstmserve export`)", file=sys.stderr)
        return 2
    tls = None
    if args.tls_cert_file or args.tls_key_file or args.tls_client_ca_file:
        if not (args.tls_cert_file and args.tls_key_file):
            print("lstmserve serve: error: TLS needs both --tls-cert-file and --tls-key-file", file=sys.stderr)
            return 2
        tls = TlsFiles(cert=args.tls_cert_file, key=args.tls_key_file, client_ca=args.tls_client_ca_file)
    api_keys: frozenset[str] = frozenset()
    if args.api_keys_file is not None:
        try:
            api_keys = load_api_keys(args.api_keys_file)
        except ApiKeyError as error:
            print(f"lstmserve serve: error: {error}", file=sys.stderr)
            return 2
    secret = None
    if args.snapshot_secret_file is not None:
        try:
            secret = args.snapshot_secret_file.read_bytes().strip()
        except OSError as error:
            print(f"lstmserve serve: error: cannot read --snapshot-secret-file: {error}", file=sys.stderr)
            return 2
        if len(secret) < 16:
            print(
                f"lstmserve serve: error: --snapshot-secret-file {str(args.snapshot_secret_file)!r} holds "
                f"{len(secret)} bytes; use at least 16",
                file=sys.stderr,
            )
            return 2
    try:
        config = ServerConfig(
            model=model,
            model_name=args.model_name,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()),
            device_id=args.device_id,
            intra_op_threads=args.intra_op_threads,
            max_batch_size=args.max_batch_size,
            batches_in_flight=args.batches_in_flight,
            max_wait_us=args.max_wait_us,
            idle_spin_us=args.idle_spin_us,
            max_sessions=args.max_sessions,
            session_ttl_s=args.session_ttl_s,
            max_tokens_per_request=args.max_tokens_per_request,
            max_generate_tokens=args.max_generate_tokens,
            max_stop_strings=args.max_stop_strings,
            max_stop_chars=args.max_stop_chars,
            max_sessions_per_request=args.max_sessions_per_request,
            max_queue=args.max_queue,
            max_inflight_per_session=args.max_inflight_per_session,
            max_message_bytes=args.max_message_bytes,
            grace_s=args.grace_s,
            state_placement=args.state_placement,
            snapshot_secret=secret,
            api_keys=api_keys,
            tls=tls,
            state_dir=args.state_dir,
            checkpoint_interval_s=args.checkpoint_interval_s,
            spill_idle=args.spill_idle,
            session_store=args.session_store,
            drain_delay_s=args.drain_delay_s,
        )
    except ConfigError as error:
        print(f"lstmserve serve: error: {error}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    gc.freeze()  # what the imports made lives as long as the process: keep it out of every collection
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        return asyncio.run(serve(config))  # 0 after a complete drain, 1 after a failure while serving
    except (ModelSpecError, ModelLoadError, ProviderError, ConfigError, OSError) as error:
        # Raised while starting (the model, the providers, a port, the state directory): a configuration error.
        print(f"lstmserve serve: error: {error}", file=sys.stderr)
        return 2


def run_health(args: argparse.Namespace) -> int:
    """Prints the health status of a server; 0 when SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = [("grpc.so_reuseport", 0)]
    if args.tls_ca_file is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=args.tls_ca_file.read_bytes())
        channel = grpc.secure_channel(args.target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(args.target, options=options)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as error:
            details = error.details()
            if error.code() == grpc.StatusCode.NOT_FOUND and not details:  # grpc.health.v1 says nothing more
                details = f"the server's health service knows no service {args.service!r}"
            print(f"lstmserve health: error: {error.code().name}: {details}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1
