"""`lstmserve generate`, `lstmserve stream` and `lstmserve info` against a real server, and their errors."""

from __future__ import annotations

import io
import json
import math
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ServerThread

from lstmserve.cli import main
from lstmserve.client import Client


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.address) as c:
        yield c


def ours(err: str) -> list[str]:
    """The command's own stderr lines (a server stopped by another test may log to the same stream)."""
    return [line for line in err.splitlines() if line.startswith("lstmserve ")]


@pytest.fixture()
def dead_target() -> str:
    """An address nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_info_text_and_json(server: ServerThread, client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    expected = client.model_info()
    assert main(["info", "--target", server.address]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["kind"] == "tokens"
    assert lines["provider"] == expected.provider
    assert lines["output_size"] == str(expected.output_size)
    assert lines["vocabulary"].startswith(f"{len(expected.vocabulary)} pieces: ")

    assert main(["info", "--target", server.address, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "tokens" and data["steppable"] is True
    assert data["vocabulary"] == list(expected.vocabulary.pieces)
    assert data["fingerprint"] == expected.fingerprint


def test_target_from_environment(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LSTMSERVE_TARGET", server.address)
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "tokens"


def test_generate_prints_prompt_then_the_generation(
    server: ServerThread, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    with client.session() as session:
        expected = session.complete("def f", max_tokens=15, temperature=0.8, seed=11)
    code = main(
        ["generate", "def f", "--target", server.address, "--max-tokens", "15", "--temperature", "0.8", "--seed", "11"]
    )
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    assert captured.out == "def f" + expected.text + "\n"


def test_generate_with_stop_top_k_top_p(
    server: ServerThread, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    with client.session() as session:
        full = session.complete("x = ", max_tokens=30, top_k=10, top_p=0.9, seed=3)
    stop = next(full.text[i : i + 2] for i in range(1, len(full.text)) if full.text[i] != full.text[0])
    args = ["generate", "x = ", "--target", server.address, "--max-tokens", "30", "--top-k", "10", "--top-p", "0.9"]
    assert main([*args, "--seed", "3", "--stop", stop, "never-generated"]) == 0
    assert capsys.readouterr().out == "x = " + full.text[: full.text.find(stop)] + "\n"


def test_stream_prints_top_predictions_after_each_line(
    server: ServerThread, client: Client, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = ["hello\n", "world\n", "it works\n"]
    vocabulary = client.model_info().vocabulary
    expected = []
    with client.session() as session:
        for line in lines:
            out = session.step(line, output="topk", k=3)
            assert out.topk_ids is not None and out.topk_logprobs is not None
            pairs = zip(out.topk_ids[-1], out.topk_logprobs[-1], strict=True)
            shown = "  ".join(f"{vocabulary[int(t)]!r} {math.exp(float(lp)):.3f}" for t, lp in pairs)
            expected.append(f"[step {out.step}] next: {shown}")
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(lines)))
    assert main(["stream", "--target", server.address, "--top", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    assert [e.split("]")[0] for e in expected] == ["[step 6", "[step 12", "[step 21"]  # the state carries over


def test_stream_long_line_and_bad_line(
    token_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import start_server

    handle = start_server(token_model, max_tokens_per_request=4)
    try:
        monkeypatch.setattr(sys, "stdin", io.StringIO("a line longer than four\nbad \u20ac\nok\n"))
        assert main(["stream", "--target", handle.address, "--top", "2"]) == 1  # one line was skipped
        captured = capsys.readouterr()
        assert [line.split("]")[0] for line in captured.out.splitlines()] == ["[step 24", "[step 27"]
        (line,) = ours(captured.err)
        assert "'€'" in line and line.startswith("lstmserve stream: skipped a line: ")
    finally:
        handle.stop()


def test_unreachable_target_is_one_line_and_non_zero(dead_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["info"], ["generate", "hi"], ["stream"]):
        assert main([*command, "--target", dead_target]) != 0
        captured = capsys.readouterr()
        assert captured.out == ""
        (line,) = ours(captured.err)
        assert line.startswith(f"lstmserve {command[0]}: error: cannot reach the server at {dead_target}")


def test_bad_generate_options_are_refused_before_anything_is_printed(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    """Limits come from the server's model info first: nothing (not even the prompt) is printed, exit 2."""
    assert main(["generate", "hi", "--target", server.address, "--max-tokens", "999999"]) == 2
    captured = capsys.readouterr()
    (line,) = ours(captured.err)
    assert captured.out == "" and line.startswith("lstmserve generate: error: --max-tokens must be in [1, 4096]")

    assert main(["generate", "caf\u00e9\u20ac", "--target", server.address]) == 2
    captured = capsys.readouterr()
    (line,) = ours(captured.err)
    assert captured.out == "" and line.startswith("lstmserve generate: error: the prompt cannot be encoded: character ")


def test_server_refusals_are_reported_with_their_status(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", "--target", server.address, "--temperature", "-1"]) == 2  # checked here
    (line,) = ours(capsys.readouterr().err)
    assert line.startswith("lstmserve generate: error: temperature must be")
    stops = [f"s{i}" for i in range(17)]  # more stop strings than the server takes
    assert main(["generate", "hi", "--target", server.address, "--stop", *stops]) == 1
    (line,) = ours(capsys.readouterr().err)
    assert line.startswith("lstmserve generate: error: INVALID_ARGUMENT: generate.stop has 17 strings")


def test_feature_model_refuses_text(feature_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import start_server

    handle = start_server(feature_model)
    try:
        assert main(["stream", "--target", handle.address]) == 2
        assert ours(capsys.readouterr().err) == [
            "lstmserve stream: error: the server's model takes features, not text"
        ]
        assert main(["generate", "hi", "--target", handle.address]) == 2
        (line,) = ours(capsys.readouterr().err)
        assert line == "lstmserve generate: error: the server's model takes features, not text"
    finally:
        handle.stop()


def test_installed_command_exits_non_zero(dead_target: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lstmserve.cli", "info", "--target", dead_target],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "cannot reach the server" in result.stderr


@pytest.mark.parametrize("command", [["generate", "hi"], ["info"], ["stream"], ["health"]])
@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--timeout", "-1", "must be a positive number of seconds, got -1"),
        ("--timeout", "nan", "must be a positive number of seconds, got nan"),
        ("--timeout", "0", "must be a positive number of seconds, got 0"),
        ("--target", "127.0.0.1:99999", "port 99999 of '127.0.0.1:99999' is outside 1..65535"),
        ("--target", "[::1]:0", "port 0 of '[::1]:0' is outside 1..65535"),
        ("--target", "", "the server's address is empty"),
    ],
)
def test_bad_target_or_timeout_is_a_usage_error(
    command: list[str], option: str, value: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A deadline of -1 or NaN failed every call with DEADLINE_EXCEEDED (exit 1), port 99999 reached whatever
    listened on 34463 (gRPC wraps it), an empty address printed gRPC's resolver noise: now argparse refuses them."""
    with pytest.raises(SystemExit) as exited:
        main([*command, option, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_top_k_beyond_the_vocabulary_is_refused_before_anything_is_printed(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "hi", "--target", server.address, "--top-k", "1000"]) == 2
    captured = capsys.readouterr()
    (line,) = ours(captured.err)
    assert captured.out == "" and line.startswith("lstmserve generate: error: --top-k must be in [0, ")
