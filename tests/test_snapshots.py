"""Snapshot and restore: exact continuation on any server of the same model; bad blobs refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from conftest import ServerThread, start_server

from lstmserve.client import AsyncClient, Client, InvalidRequest
from lstmserve.server.errors import InvalidInput
from lstmserve.server.snapshot import decode_snapshot, encode_snapshot
from lstmserve.server.state import SessionState


def test_restored_session_continues_exactly_on_another_server(server: ServerThread, token_model: Path) -> None:
    other = start_server(token_model, state_placement="device")  # a second server, other state store
    try:
        with Client(server.address) as client, Client(other.address) as other_client:
            with client.session() as original:
                original.step([1, 2, 3, 4])
                blob = original.snapshot()
                expected = original.step([5, 6]).logits
                assert original.info().step == 6
            for target in (client, other_client):
                with target.session(restore=blob) as restored:
                    assert restored.info().step == 4
                    assert restored.id != original.id
                    np.testing.assert_array_equal(restored.step([5, 6]).logits, expected)
    finally:
        other.stop()


def test_async_snapshot_and_restore(server: ServerThread) -> None:
    async def scenario() -> tuple[np.ndarray, np.ndarray]:
        async with AsyncClient(server.address) as client:
            async with client.session() as session:
                await session.step([7, 8])
                blob = await session.snapshot()
                expected = (await session.step([9])).logits
            async with client.session(restore=blob) as restored:
                got = (await restored.step([9])).logits
        return expected, got  # type: ignore[return-value]

    expected, got = asyncio.run(scenario())
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b"NOTSNAP!" + b[8:], "not an lstmserve snapshot"),
        (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "integrity check"),
        (lambda b: b"", "truncated"),
    ],
)
def test_bad_blobs_are_refused_with_a_clear_error(server: ServerThread, mutate, needle: str) -> None:
    with Client(server.address) as client:
        with client.session() as session:
            session.step([1])
            blob = session.snapshot()
        with pytest.raises(InvalidRequest, match=needle):
            client.session(restore=mutate(blob))


def test_blob_of_another_model_is_refused(server: ServerThread, projected_model: Path) -> None:
    other = start_server(projected_model)
    try:
        with Client(other.address) as other_client, other_client.session() as session:
            session.step([1])
            foreign = session.snapshot()
        with Client(server.address) as client, pytest.raises(InvalidRequest, match="fingerprint"):
            client.session(restore=foreign)
    finally:
        other.stop()


def test_a_long_foreign_fingerprint_is_cut_in_the_error(server: ServerThread) -> None:
    """A forged blob's 20,000-character fingerprint, echoed whole, overflowed gRPC's 16 KiB limit on a status
    message: the client got RESOURCE_EXHAUSTED with gRPC's words instead of INVALID_ARGUMENT with ours."""
    spec = server.server.runner.spec
    with Client(server.address) as client:
        with client.session() as session:
            session.step([1])
            state, step = decode_snapshot(
                session.snapshot(), fingerprint=spec.fingerprint,
                shape=(spec.state_rows, spec.h.width, spec.c.width), secret=None,
            )
        with pytest.raises(InvalidRequest, match=r"fingerprint 'f{80}'\.\.\. \(20000 characters\)"):
            client.session(restore=encode_snapshot(state, step, "f" * 20_000, None))


def test_signed_snapshots_cannot_be_forged(token_model: Path) -> None:
    secret = b"0123456789abcdef-test-secret"
    signed = start_server(token_model, snapshot_secret=secret)
    unsigned = start_server(token_model)
    try:
        with Client(signed.address) as client, Client(unsigned.address) as plain_client:
            with client.session() as session:
                session.step([3, 1])
                blob = session.snapshot()
            with client.session(restore=blob) as restored:  # the signing server accepts its own blob
                assert restored.info().step == 2
            with plain_client.session() as session:
                session.step([3, 1])
                unsigned_blob = session.snapshot()
            with pytest.raises(InvalidRequest, match="only accepts signed"):
                client.session(restore=unsigned_blob)
            # A client that rewrites the state and recomputes a plain checksum cannot pass the HMAC.
            spec = signed.server.runner.spec
            state, step = decode_snapshot(
                blob, fingerprint=spec.fingerprint, shape=(spec.state_rows, spec.h.width, spec.c.width), secret=secret
            )
            forged_state = SessionState(h=state.h + 1.0, c=state.c)
            forged = encode_snapshot(forged_state, step, spec.fingerprint, b"guessed-secret-0000")
            with pytest.raises(InvalidRequest, match="integrity check"):
                client.session(restore=forged)
    finally:
        signed.stop()
        unsigned.stop()


def test_snapshot_codec_round_trip_and_shape_check() -> None:
    rng = np.random.default_rng(0)
    state = SessionState(h=rng.standard_normal((2, 1, 3)).astype(np.float32), c=rng.standard_normal((2, 1, 5)).astype(np.float32))
    blob = encode_snapshot(state, 17, "fp", None)
    decoded, step = decode_snapshot(blob, fingerprint="fp", shape=(2, 3, 5), secret=None)
    assert step == 17
    np.testing.assert_array_equal(decoded.h, state.h)
    np.testing.assert_array_equal(decoded.c, state.c)
    with pytest.raises(InvalidInput, match="shape"):
        decode_snapshot(blob, fingerprint="fp", shape=(2, 3, 6), secret=None)


def _forged(server: ServerThread, blob: bytes, *, step: int | None = None, h_value: float | None = None) -> bytes:
    """The blob with its step counter or one state value rewritten, and a valid checksum (no secret is set)."""
    spec = server.server.runner.spec
    state, old_step = decode_snapshot(
        blob, fingerprint=spec.fingerprint, shape=(spec.state_rows, spec.h.width, spec.c.width), secret=None
    )
    h = state.h.copy()
    if h_value is not None:
        h[0, 0, 0] = h_value
    return encode_snapshot(SessionState(h=h, c=state.c), old_step if step is None else step, spec.fingerprint, None)


@pytest.mark.parametrize(
    ("forge", "needle"),
    [
        ({"step": 2**64 - 1}, "step 18446744073709551615 is out of range"),
        ({"step": 2**53 + 1}, "out of range"),
        ({"h_value": float("nan")}, "NaN or infinity"),
        ({"h_value": float("inf")}, "NaN or infinity"),
    ],
)
def test_forged_blobs_with_a_valid_checksum_are_refused(server: ServerThread, forge: dict, needle: str) -> None:
    """Without a secret anyone can make a blob that passes the checksum: every field is checked, so such a blob
    cannot restore a session it would break (a step near 2**64 used to restore, then fail every later call)."""
    with Client(server.address) as client:
        with client.session() as session:
            session.step([1, 2])
            blob = session.snapshot()
        with pytest.raises(InvalidRequest, match=needle):
            client.session(restore=_forged(server, blob, **forge))
        with client.session(restore=_forged(server, blob, step=2**53)) as restored:  # the largest step allowed
            assert restored.info().step == 2**53
            assert restored.step([3]).step == 2**53 + 1
