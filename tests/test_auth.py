"""API keys: no valid key is UNAUTHENTICATED; a session belongs to the key that created it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import ServerThread, start_server
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import bearer

from lstmserve.client import Client, SessionNotFound, Unauthenticated
from lstmserve.server.auth import ApiKeyError, load_api_keys
from lstmserve.v1 import lstmserve_pb2 as pb
from lstmserve.v1 import lstmserve_pb2_grpc as pb_grpc

KEY_A, KEY_B = "key-a-0123456789abcdef", "key-b-fedcba9876543210"


@pytest.fixture(scope="module")
def keyed_server(token_model: Path) -> Iterator[ServerThread]:
    handle = start_server(token_model, api_keys=frozenset({KEY_A, KEY_B}))
    yield handle
    handle.stop()


@pytest.mark.parametrize("metadata", [None, bearer("wrong"), [("authorization", KEY_A)]])
def test_calls_without_a_valid_key_are_unauthenticated(keyed_server: ServerThread, metadata: object) -> None:
    with Client(keyed_server.address, metadata=metadata) as client:  # type: ignore[arg-type]
        with pytest.raises(Unauthenticated, match="API key"):
            client.model_info()
        with pytest.raises(Unauthenticated):
            client.session()


def test_streams_without_a_key_are_unauthenticated(keyed_server: ServerThread) -> None:
    from helpers import SyncStream

    with keyed_server.channel() as channel:
        with pytest.raises(grpc.RpcError) as error:
            SyncStream(channel).request(tokens=[1])
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_stays_open_for_probes(keyed_server: ServerThread) -> None:
    with keyed_server.channel() as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_a_session_is_invisible_to_another_key(keyed_server: ServerThread) -> None:
    with Client(keyed_server.address, metadata=bearer(KEY_A)) as owner, Client(
        keyed_server.address, metadata=bearer(KEY_B)
    ) as stranger:
        with owner.session() as session:
            session.step([1, 2])
            with pytest.raises(SessionNotFound):
                stranger.session(resume=session.id)
            with pytest.raises(SessionNotFound):
                stranger.session(resume=session.id, close_on_exit=True)
            with keyed_server.channel() as channel, pytest.raises(grpc.RpcError) as error:
                pb_grpc.LstmServeStub(channel).SnapshotSession(
                    pb.SessionRef(session_id=session.id), metadata=bearer(KEY_B)
                )
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            assert session.step([3]).step == 3  # the owner is not disturbed
            with owner.session(resume=session.id) as again:
                assert again.info().step == 3


def test_api_keys_file_errors(tmp_path: Path, token_model: Path) -> None:
    empty = tmp_path / "keys.txt"
    empty.write_text("# nobody\n\n")
    with pytest.raises(ApiKeyError, match="lists no keys"):
        load_api_keys(empty)
    listed = tmp_path / "listed.txt"
    listed.write_text(f"# team keys\n{KEY_A}\n\n  {KEY_B}  \n")
    assert load_api_keys(listed) == {KEY_A, KEY_B}
    lstmserve = str(Path(sys.executable).with_name("lstmserve"))
    result = subprocess.run(
        [lstmserve, "serve", "--model", str(token_model), "--api-keys-file", str(tmp_path / "missing.txt")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "missing.txt" in result.stderr
    accented = tmp_path / "accented.txt"
    accented.write_text(f"{KEY_A}\n# comment\nclé-secrète-0123456789\n", encoding="utf-8")
    result = subprocess.run(
        [lstmserve, "serve", "--model", str(token_model), "--api-keys-file", str(accented)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "line 3" in result.stderr and "ASCII" in result.stderr
    assert "Traceback" not in result.stderr


def test_keys_are_compared_as_bytes(keyed_server: ServerThread) -> None:
    """A key sent with characters outside ASCII (as raw metadata bytes) is refused like any wrong key, and the
    valid keys keep working (comparing str with non-ASCII characters used to raise, failing every call)."""
    from lstmserve.server.auth import ApiKeyInterceptor

    interceptor = ApiKeyInterceptor(frozenset({KEY_A}))
    assert interceptor._valid(KEY_A)
    assert not interceptor._valid("clé-0123456789abcdef")
    assert not interceptor._valid(None)
    with Client(keyed_server.address, metadata=bearer(KEY_A)) as client:
        assert client.model_info().kind == "tokens"


def test_cli_commands_send_the_api_key(keyed_server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    from lstmserve.cli import main

    assert main(["info", "--target", keyed_server.address]) != 0
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["info", "--target", keyed_server.address, "--api-key", KEY_B]) == 0
    assert "tokens" in capsys.readouterr().out
