"""The two state stores (host pools, ONNX Runtime device buffers) behave the same."""

from __future__ import annotations

import numpy as np
import pytest

from lstmserve.server.device_state import DeviceStateStore
from lstmserve.server.errors import Overloaded
from lstmserve.server.state import StateBuffers, SessionState, HostStateStore, StateStore

ROWS, H, C, CAPACITY = 2, 3, 5, 6


def _stores() -> list[HostStateStore | DeviceStateStore]:
    device = DeviceStateStore(
        ROWS, H, C, CAPACITY, providers=["CPUExecutionProvider"], provider_options=[{}], device="cpu"
    )
    return [HostStateStore(ROWS, H, C, CAPACITY), device]


def _random_state(rng: np.random.Generator) -> SessionState:
    return SessionState(
        h=rng.standard_normal((ROWS, 1, H)).astype(np.float32), c=rng.standard_normal((ROWS, 1, C)).astype(np.float32)
    )


@pytest.mark.parametrize("store", _stores(), ids=["host", "device"])
def test_store_round_trip_gather_scatter_reset(store: StateStore) -> None:
    rng = np.random.default_rng(0)
    slots = [store.allocate() for _ in range(4)]
    assert slots == [0, 1, 2, 3] and store.in_use == 4
    states = {slot: _random_state(rng) for slot in slots}
    for slot, state in states.items():
        store.write(slot, state)
    order = np.array([2, 0, 3], np.int64)
    batch = store.gather(order)
    h0 = batch.h0 if isinstance(batch.h0, np.ndarray) else batch.h0.to_host()
    np.testing.assert_array_equal(h0, np.concatenate([states[s].h for s in order], axis=1))
    new_h = rng.standard_normal((ROWS, 3, H)).astype(np.float32)
    new_c = rng.standard_normal((ROWS, 3, C)).astype(np.float32)
    if isinstance(batch.hn, np.ndarray):
        batch.hn[...] = new_h
        batch.cn[...] = new_c
    else:  # the batch's tensors are the start of flat device buffers
        for tensor, values in ((batch.hn, new_h), (batch.cn, new_c)):
            flat = tensor.memory.numpy().copy()
            flat[: values.size] = values.ravel()
            tensor.memory.update_inplace(flat)
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


def test_host_batch_buffers_of_every_size_share_one_largest_set() -> None:
    """Buffers for batch sizes 1 to 100 cost one 128-row set (the next power of two), not one set
    per size; and gather/scatter through them still move exactly the batch's rows."""
    store = HostStateStore(ROWS, H, C, 100)
    rng = np.random.default_rng(1)
    slots = np.array([store.allocate() for _ in range(100)], np.int64)
    for slot in slots:
        store.write(int(slot), _random_state(rng))
    expected = {int(slot): store.read(int(slot)) for slot in slots}
    for size in range(1, 101):
        chosen = rng.choice(slots, size=size, replace=False)
        batch = store.gather(chosen)
        np.testing.assert_array_equal(batch.h0, np.concatenate([expected[int(s)].h for s in chosen], axis=1))
        batch.hn[...] = batch.h0 + 1.0
        batch.cn[...] = batch.c0 - 1.0
        store.scatter(chosen, batch)
        for column, slot in enumerate(chosen):
            expected[int(slot)] = SessionState(
                h=batch.h0[:, column : column + 1] + 1.0, c=batch.c0[:, column : column + 1] - 1.0
            )
    for slot in slots:
        np.testing.assert_array_equal(store.read(int(slot)).h, expected[int(slot)].h)
        np.testing.assert_array_equal(store.read(int(slot)).c, expected[int(slot)].c)
    owners = {id(b.base) for size in range(1, 101) for b in _arrays(store.buffers(size))}
    assert len(owners) == 4  # h0, c0, hn, cn: one flat array each, for all sizes
    base = store.buffers(100).h0.base
    assert base is not None
    assert base.nbytes == ROWS * 128 * H * 4


def test_device_batch_buffers_of_every_size_are_the_start_of_one_largest_set() -> None:
    store = DeviceStateStore(ROWS, H, C, 100, providers=["CPUExecutionProvider"], provider_options=[{}], device="cpu")
    largest = store.buffers(100)
    assert largest.h0.memory.shape() == [ROWS * 128 * H]  # the next power of two
    for size in range(1, 101):
        buffers = store.buffers(size)
        assert buffers.cn is not None
        assert buffers.h0.shape == (ROWS, size, H) and buffers.cn.shape == (ROWS, size, C)
        assert all(
            getattr(buffers, name).memory is getattr(largest, name).memory for name in ("h0", "c0", "hn", "cn")
        )


def _fake_step(buffers: object, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """What a model call does to host buffers: new state into hn and cn (returned, to compare with later)."""
    hn, cn = buffers.hn, buffers.cn  # type: ignore[attr-defined]
    hn[...] = rng.standard_normal(hn.shape)
    cn[...] = rng.standard_normal(cn.shape)
    return hn.copy(), cn.copy()


def test_host_store_feeds_a_batch_of_the_same_slots_its_last_outputs_in_place() -> None:
    """A generation running on every session forms batches of the same slots: the next batch reads the last
    batch's new state where it is (no copy out and back), and every other use sees it in the pools."""
    rng = np.random.default_rng(1)
    store = HostStateStore(ROWS, H, C, CAPACITY)
    slots = np.array([store.allocate() for _ in range(3)], np.int64)[::-1].copy()
    first = store.gather(slots)
    h1, c1 = _fake_step(first, rng)
    store.scatter(slots, first)
    second = store.gather(slots.copy())
    assert second is not first and np.shares_memory(second.h0, first.hn)  # swapped in place, no copy
    np.testing.assert_array_equal(second.h0, h1)
    np.testing.assert_array_equal(second.c0, c1)
    h2, c2 = _fake_step(second, rng)
    store.scatter(slots, second)
    third = store.gather(slots)
    np.testing.assert_array_equal(third.h0, h2)
    # A read, a batch of other slots, or a failed call between batches all see the newest state.
    np.testing.assert_array_equal(store.read(int(slots[0])).h, h2[:, :1])
    _fake_step(third, rng)  # this call "fails": no scatter, so its outputs are not the state
    other = store.gather(slots[:2])
    np.testing.assert_array_equal(other.h0, h2[:, :2])
    np.testing.assert_array_equal(other.c0, c2[:, :2])


def test_host_store_after_a_failed_call_of_a_swapped_batch_keeps_the_state_it_had() -> None:
    rng = np.random.default_rng(2)
    store = HostStateStore(ROWS, H, C, CAPACITY)
    slots = np.array([store.allocate() for _ in range(2)], np.int64)
    first = store.gather(slots)
    h1, _ = _fake_step(first, rng)
    store.scatter(slots, first)
    second = store.gather(slots)
    _fake_step(second, rng)  # fails: never scattered
    np.testing.assert_array_equal(store.gather(slots).h0, h1)
    np.testing.assert_array_equal(store.read(int(slots[1])).h, h1[:, 1:])
    again = store.gather(slots)
    h3, _ = _fake_step(again, rng)
    store.scatter(slots, again)
    store.reset(int(slots[1]))  # the newest state of slot 0 still sits in the batch buffers
    assert not store.read(int(slots[1])).h.any()
    np.testing.assert_array_equal(store.read(int(slots[0])).h, h3[:, :1])


def _arrays(buffers: StateBuffers) -> tuple[np.ndarray, ...]:
    return buffers.h0, buffers.c0, buffers.hn, buffers.cn


def test_host_lanes_have_buffers_of_their_own_and_each_keeps_its_batch_in_place() -> None:
    """Two batches in flight (lanes 0 and 1): their buffers never share memory, a lane's next batch of the same
    slots reads its last new state in place, and whatever a lane leaves unsettled reaches the pools before
    anything else reads them, whichever lane gathers next."""
    store = HostStateStore(ROWS, H, C, 8)
    first, second = np.array([0, 1, 2]), np.array([3, 4, 5])
    a, b = store.gather(first, 0), store.gather(second, 1)
    assert (a.lane, b.lane) == (0, 1)
    assert not any(np.shares_memory(x, y) for x in _arrays(a) for y in _arrays(b))
    a.hn[...], a.cn[...] = 1.0, -1.0
    b.hn[...], b.cn[...] = 2.0, -2.0
    store.scatter(second, b)  # lane 1 finishes first
    store.scatter(first, a)
    again = store.gather(first, 0)  # lane 0 again, the same slots: in place, the last outputs are the inputs
    assert np.shares_memory(again.h0, a.hn) and float(again.h0[0, 0, 0]) == 1.0
    other = store.gather(np.array([5, 6]), 1)  # lane 1, other slots: the pools first get every lane's newest state
    assert other.h0[:, 0].tolist() == [[2.0] * H] * ROWS and other.h0[:, 1].tolist() == [[0.0] * H] * ROWS
    again.hn[...] = 3.0
    store.scatter(first, again)
    assert store.read(0).h.ravel().tolist() == [3.0] * (ROWS * H)
    assert store.read(4).c.ravel().tolist() == [-2.0] * (ROWS * C)
