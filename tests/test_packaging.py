"""The wire code is current, and the distribution installs only the `lstmserve` namespace."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_proto_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    expected = {
        "v1": ["lstmserve_pb2.py", "lstmserve_pb2.pyi", "lstmserve_pb2_grpc.py"],
        "inference": [
            "grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py",
            "model_config_pb2.py", "model_config_pb2.pyi",
        ],
    }
    for package, names in expected.items():
        generated = sorted(p.name for p in (tmp_path / "lstmserve" / package).iterdir())
        assert generated == names
        for name in generated:
            committed = ROOT / "lstmserve" / package / name
            assert filecmp.cmp(tmp_path / "lstmserve" / package / name, committed, shallow=False), (
                f"{committed} is stale: run `make proto`"
            )


def test_generated_code_uses_package_qualified_imports() -> None:
    text = (ROOT / "lstmserve" / "v1" / "lstmserve_pb2_grpc.py").read_text()
    assert "from lstmserve.v1 import lstmserve_pb2" in text
    text = (ROOT / "lstmserve" / "inference" / "grpc_service_pb2.py").read_text()
    assert "from lstmserve.inference import model_config_pb2" in text


def test_open_inference_protocol_messages_stay_out_of_the_default_pool() -> None:
    """tritonclient registers the same `inference.*` names in protobuf's default pool."""
    from google.protobuf import descriptor_pool

    from lstmserve.inference import grpc_service_pb2

    assert grpc_service_pb2.DESCRIPTOR.pool is not descriptor_pool.Default()
    assert grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == "inference.GRPCInferenceService"


def test_wheel_installs_only_the_lstmserve_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("lstmserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"lstmserve"}
    for module in ("lstmserve/server/scheduler.py", "lstmserve/client/__init__.py", "lstmserve/export/__init__.py",
                   "lstmserve/v1/lstmserve_pb2.py", "lstmserve/inference/grpc_service_pb2.py", "lstmserve/cli.py"):
        assert module in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lstmserve = lstmserve.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_server_modules_do_not_import_torch() -> None:
    code = (
        "import sys, lstmserve.server.app, lstmserve.server.cli, lstmserve.cli; "
        "assert 'torch' not in sys.modules, 'server imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
