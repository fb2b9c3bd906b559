"""Session snapshots: an opaque, versioned, integrity-checked blob of one session's state.

Layout (all integers little-endian):

    magic   8 bytes  b"LSTMSNAP"
    version u16      1
    keyed   u8       1 if the tag is an HMAC under the server's secret, 0 if a plain SHA-256
    fplen   u16      length of the model fingerprint
    fp      fplen bytes, UTF-8
    step    u64      the session's step counter
    rows, h_width, c_width  u32 each
    h       rows * h_width float32
    c       rows * c_width float32
    tag     32 bytes: HMAC-SHA256(secret, everything above) or SHA-256(everything above)

Every field is checked on decode (sizes, the step counter's range, finite state values), so a
blob made by hand is refused rather than restored into a session it would break.
Without a secret the tag only detects corruption; with one (`--snapshot-secret-file`), a
client cannot forge or alter state, and a server with a secret refuses unkeyed blobs.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import numpy as np

from lstmserve.server.errors import InvalidInput
from lstmserve.server.state import SessionState
from lstmserve.server.text import shown

MAGIC = b"LSTMSNAP"
VERSION = 1
_HEAD = struct.Struct("<8sHBH")
_BODY = struct.Struct("<QIII")
TAG_BYTES = 32
# The largest step counter a snapshot may hold: 2**53 positions (centuries of steps at a million a second),
# so that a session can go on stepping without reaching the wire's uint64 limit, and every JSON client
# reads the counter exactly. A blob with more is refused, even when its checksum is valid.
MAX_STEP = 2**53


def _tag(payload: bytes, secret: bytes | None) -> bytes:
    if secret:
        return hmac.new(secret, payload, hashlib.sha256).digest()
    return hashlib.sha256(payload).digest()


def encode_snapshot(state: SessionState, step: int, fingerprint: str, secret: bytes | None) -> bytes:
    """The blob for one session's state and step counter."""
    fp = fingerprint.encode()
    rows, h_width, c_width = state.h.shape[0], state.h.shape[-1], state.c.shape[-1]
    payload = (
        _HEAD.pack(MAGIC, VERSION, 1 if secret else 0, len(fp))
        + fp
        + _BODY.pack(step, rows, h_width, c_width)
        + np.ascontiguousarray(state.h, "<f4").tobytes()
        + np.ascontiguousarray(state.c, "<f4").tobytes()
    )
    return payload + _tag(payload, secret)


def decode_snapshot(
    blob: bytes, *, fingerprint: str, shape: tuple[int, int, int], secret: bytes | None
) -> tuple[SessionState, int]:
    """Checks a blob and returns (state, step); InvalidInput says what is wrong with it.

    Args:
        fingerprint: this server's model fingerprint (a blob of another model is refused).
        shape: (rows, h_width, c_width) of this server's model.
        secret: this server's snapshot secret, if it has one.
    """
    if len(blob) < _HEAD.size + _BODY.size + TAG_BYTES:
        raise InvalidInput(f"snapshot is truncated ({len(blob)} bytes)")
    magic, version, keyed, fp_len = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise InvalidInput("blob is not an lstmserve snapshot")
    if version != VERSION:
        raise InvalidInput(f"snapshot version {version} is not supported (expected {VERSION})")
    if len(blob) < _HEAD.size + fp_len + _BODY.size + TAG_BYTES:
        raise InvalidInput(f"snapshot is truncated ({len(blob)} bytes)")
    step, rows, h_width, c_width = _BODY.unpack_from(blob, _HEAD.size + fp_len)
    h_bytes, c_bytes = 4 * rows * h_width, 4 * rows * c_width
    expected = _HEAD.size + fp_len + _BODY.size + h_bytes + c_bytes + TAG_BYTES
    if len(blob) != expected:
        raise InvalidInput(f"snapshot is truncated or padded ({len(blob)} bytes, its header says {expected})")
    payload, tag = blob[:-TAG_BYTES], blob[-TAG_BYTES:]
    if secret and not keyed:
        raise InvalidInput("snapshot is not signed, and this server only accepts signed snapshots")
    if not hmac.compare_digest(tag, _tag(payload, secret if keyed else None)):
        raise InvalidInput("snapshot failed its integrity check (corrupted, tampered, or signed with another secret)")
    blob_fingerprint = payload[_HEAD.size : _HEAD.size + fp_len].decode(errors="replace")
    if blob_fingerprint != fingerprint:
        raise InvalidInput(
            f"snapshot is of model fingerprint {shown(blob_fingerprint)}, but this server serves {fingerprint!r}"
        )
    if (rows, h_width, c_width) != shape:
        raise InvalidInput(f"snapshot state shape {(rows, h_width, c_width)} does not match the model's {shape}")
    if keyed not in (0, 1):
        raise InvalidInput(f"snapshot keyed flag {keyed} must be 0 or 1")
    if step > MAX_STEP:
        raise InvalidInput(f"snapshot step {step} is out of range (at most {MAX_STEP})")
    offset = _HEAD.size + fp_len + _BODY.size
    h = np.frombuffer(payload, "<f4", rows * h_width, offset).reshape(rows, 1, h_width)
    c = np.frombuffer(payload, "<f4", rows * c_width, offset + h_bytes).reshape(rows, 1, c_width)
    for name, values in (("h", h), ("c", c)):
        if not np.isfinite(values).all():
            raise InvalidInput(f"snapshot state {name} holds NaN or infinity")
    return SessionState(h=h.astype(np.float32), c=c.astype(np.float32)), int(step)
