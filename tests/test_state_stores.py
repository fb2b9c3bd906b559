"""The two state stores (host pools, ONNX Runtime device buffers) behave the same."""

from __future__ import annotations

import numpy as np
import pytest

from lstmserve.server.device_state import DeviceStateStore
from lstmserve.server.errors import Overloaded
from lstmserve.server.state import SessionState, StateStore

ROWS, H, C, CAPACITY = 2, 3, 5, 6


def _stores() -> list[StateStore | DeviceStateStore]:
    device = DeviceStateStore(
        ROWS, H, C, CAPACITY, providers=["CPUExecutionProvider"], provider_options=[{}], device="cpu"
    )
    return [StateStore(ROWS, H, C, CAPACITY), device]


def _random_state(rng: np.random.Generator) -> SessionState:
    return SessionState(
        h=rng.standard_normal((ROWS, 1, H)).astype(np.float32), c=rng.standard_normal((ROWS, 1, C)).astype(np.float32)
    )


@pytest.mark.parametrize("store", _stores(), ids=["host", "device"])
def test_store_round_trip_gather_scatter_reset(store: StateStore | DeviceStateStore) -> None:
    rng = np.random.default_rng(0)
    slots = [store.allocate() for _ in range(4)]
    assert slots == [0, 1, 2, 3] and store.in_use == 4
    states = {slot: _random_state(rng) for slot in slots}
    for slot, state in states.items():
        store.write(slot, state)
    order = np.array([2, 0, 3], np.int64)
    batch = store.gather(order)
    h0 = batch.h0 if isinstance(batch.h0, np.ndarray) else batch.h0.numpy()
    np.testing.assert_array_equal(h0, np.concatenate([states[s].h for s in order], axis=1))
    new_h = rng.standard_normal((ROWS, 3, H)).astype(np.float32)
    new_c = rng.standard_normal((ROWS, 3, C)).astype(np.float32)
    if isinstance(batch.hn, np.ndarray):
        batch.hn[...] = new_h
        batch.cn[...] = new_c
    else:
        batch.hn.update_inplace(new_h)
        batch.cn.update_inplace(new_c)
    store.scatter(order, batch)
    for column, slot in enumerate(order):
        np.testing.assert_array_equal(store.read(int(slot)).h[:, 0], new_h[:, column])
        np.testing.assert_array_equal(store.read(int(slot)).c[:, 0], new_c[:, column])
    np.testing.assert_array_equal(store.read(1).h, states[1].h)  # untouched slot unchanged
    store.reset(2)
    assert not store.read(2).h.any() and not store.read(2).c.any()
    store.release(3)
    assert store.in_use == 3 and store.allocate() == 3
    assert not store.read(3).h.any()  # a released slot comes back zeroed
    while store.in_use < CAPACITY:
        store.allocate()
    with pytest.raises(Overloaded, match=f"all {CAPACITY} session slots"):
        store.allocate()
