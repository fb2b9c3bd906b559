"""Per-session recurrent state in preallocated pools, addressed by slot.

`StateStore` is what the engine needs of a store; two implement it: `HostStateStore` (here, numpy pools
in host memory) and `DeviceStateStore` (device_state.py, pools on the accelerator).
`HostStateStore` holds h and c for every slot in two float32 pools shaped
[state_rows, capacity, width]. A session owns one slot; a batch gathers its
sessions' rows into contiguous buffers, the runner writes the new state into
output buffers, and `scatter` copies them back. Batch buffers are views of four
flat arrays sized for the largest batch so far, so steady-state stepping
allocates no state memory, and the buffers cost one largest batch's worth however
many batch sizes the batcher forms.

Only the scheduler touches the store, and never from two threads at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from lstmserve.metadata import StateSpec
from lstmserve.server.errors import Overloaded


@dataclass(frozen=True)
class StateBuffers:
    """Contiguous state buffers for one batch size: inputs (h0, c0) and outputs (hn, cn)."""

    h0: np.ndarray
    c0: np.ndarray
    hn: np.ndarray
    cn: np.ndarray
    lane: int = 0  # of the store that made them: which batch in flight uses them

    def bind(self, binding: ort.IOBinding, h: StateSpec, c: StateSpec | None) -> None:
        """Binds the buffers to the model's state inputs and outputs (no copies); without `c` (GRU, RNN)
        the c buffers, zero-width, are not bound."""
        pairs = [(h, self.h0, self.hn)] + ([] if c is None else [(c, self.c0, self.cn)])
        for spec, initial, final in pairs:
            binding.bind_cpu_input(spec.input_name, initial)
            binding.bind_output(spec.output_name, "cpu", 0, np.float32, list(final.shape), final.ctypes.data)


@dataclass(frozen=True)
class SessionState:
    """A copy of one session's state: h [rows, 1, h_width] and c [rows, 1, c_width] (c_width 0 for a
    single-state model: GRU, RNN)."""

    h: np.ndarray
    c: np.ndarray


class SlotList:
    """The free slot numbers of a pool, handed out lowest first so live state stays packed."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[int] = list(range(capacity - 1, -1, -1))

    @property
    def in_use(self) -> int:
        """Number of slots handed out."""
        return self.capacity - len(self._free)

    def take(self) -> int:
        """A free slot; raises Overloaded when none is left."""
        if not self._free:
            raise Overloaded(f"all {self.capacity} session slots are in use (--max-sessions)")
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        """Makes a slot free again."""
        self._free.append(slot)


class StateStore(Protocol):
    """The recurrent state of every session, one slot each: what the engine needs of a store (host or device)."""

    capacity: int

    @property
    def in_use(self) -> int:
        """Slots taken."""

    def allocate(self) -> int:
        """Takes a free slot (zeroed); Overloaded when none is left."""

    def release(self, slot: int) -> None:
        """Frees a slot (zeroed for its next session)."""

    def reset(self, slot: int) -> None:
        """Zeroes a slot's state."""

    def read(self, slot: int) -> SessionState:
        """A copy of a slot's state."""

    def write(self, slot: int, state: SessionState) -> None:
        """Sets a slot's state."""

    max_lanes: int  # how many batches may be in flight at once, each in buffers of its own (its lane)

    def gather(self, slots: np.ndarray, lane: int = 0) -> Any:
        """The rows of `slots`, in order, in batch buffers of `lane` that the runner binds (see
        `runner.BindableState`)."""

    def scatter(self, slots: np.ndarray, buffers: Any) -> None:
        """Copies the new state of a batch (from `gather`'s buffers, after the model call) back to its slots."""


@dataclass
class _Lane:
    """The batch buffers of one lane (one batch in flight): flat h0, c0, hn, cn arrays for `capacity` rows, and
    per batch size contiguous views of their beginnings, as they are and with inputs and outputs swapped."""

    capacity: int = 0
    flat: tuple[np.ndarray, ...] = ()
    buffers: dict[int, StateBuffers] = field(default_factory=dict)
    swapped: dict[int, StateBuffers] = field(default_factory=dict)


class HostStateStore:
    """Pools of h and c rows, one slot per session.

    Args:
        rows: num_layers * num_directions.
        h_width: width of h (proj_size or hidden_size).
        c_width: width of c (hidden_size; 0 for single-state models, whose c pool is empty).
        capacity: number of slots (the server's max sessions).
    """

    max_lanes = 2

    def __init__(self, rows: int, h_width: int, c_width: int, capacity: int) -> None:
        self.rows = rows
        self.h_width = h_width
        self.c_width = c_width
        self.capacity = capacity
        # np.zeros maps untouched pages lazily: memory grows with the slots in use.
        self._h = np.zeros((rows, capacity, h_width), dtype=np.float32)
        self._c = np.zeros((rows, capacity, c_width), dtype=np.float32)
        self._slots = SlotList(capacity)
        # Batch buffers per lane (see `buffers`): a batch in flight uses its lane's alone.
        self._lanes: list[_Lane] = [_Lane() for _ in range(self.max_lanes)]
        # Per lane, the newest state of some slots when it is not in the pools yet: (slots, h, c), views of
        # that lane's batch buffers. `scatter` leaves a batch's new state here; if the lane's next batch has
        # exactly the same slots in the same order (a generation running on every session), its `gather` swaps
        # the buffers' roles instead of copying the state out and back in. Anything else writes it to the
        # pools first (`_settle`). Only reads of batch buffers: safe while another lane's batch computes.
        self._unsettled: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def in_use(self) -> int:
        """Number of allocated slots."""
        return self._slots.in_use

    def allocate(self) -> int:
        """Takes a free slot (its state is zero); raises Overloaded when none is left."""
        return self._slots.take()

    def release(self, slot: int) -> None:
        """Zeroes a slot and returns it to the free list."""
        self.reset(slot)
        self._slots.give_back(slot)

    def reset(self, slot: int) -> None:
        """Sets a slot's state back to zeros."""
        self._settle()
        self._h[:, slot, :] = 0.0
        self._c[:, slot, :] = 0.0

    def read(self, slot: int) -> SessionState:
        """Returns a copy of one slot's state."""
        self._settle()
        return SessionState(h=self._h[:, slot : slot + 1, :].copy(), c=self._c[:, slot : slot + 1, :].copy())

    def write(self, slot: int, state: SessionState) -> None:
        """Overwrites one slot's state."""
        self._settle()
        self._h[:, slot : slot + 1, :] = state.h
        self._c[:, slot : slot + 1, :] = state.c

    def buffers(self, batch_size: int, lane: int = 0) -> StateBuffers:
        """Contiguous buffers of a lane for a batch of this size: views of the start of four flat arrays.

        Views of one size overlap those of every other size of the lane (one batch at a time uses them).
        A buffer set of its own per size would cost 4 x rows x size x width floats each: about
        260 MB for the default model once the batcher has formed every size from 1 to 256.
        """
        own = self._lanes[lane]
        buffers = own.buffers.get(batch_size)
        if buffers is None:
            widths = (self.h_width, self.c_width, self.h_width, self.c_width)
            if batch_size > own.capacity:  # grow to the next power of two; the old views go
                self._settle_lane(lane)  # nothing may stay only in them
                own.capacity = 1 << (batch_size - 1).bit_length()
                own.flat = tuple(np.empty(self.rows * own.capacity * w, np.float32) for w in widths)
                own.buffers.clear()
                own.swapped.clear()
            h0, c0, hn, cn = (
                flat[: self.rows * batch_size * w].reshape(self.rows, batch_size, w)
                for flat, w in zip(own.flat, widths, strict=True)
            )
            buffers = StateBuffers(h0=h0, c0=c0, hn=hn, cn=cn, lane=lane)
            own.buffers[batch_size] = buffers
            own.swapped[batch_size] = StateBuffers(h0=hn, c0=cn, hn=h0, cn=c0, lane=lane)
        return buffers

    def gather(self, slots: np.ndarray, lane: int = 0) -> StateBuffers:
        """The slots' rows in the input buffers h0 and c0 of a batch in `lane` (in slot order).

        When the lane's last batch had exactly these slots in this order and its new state is still in its
        output buffers, those become this batch's inputs (no copy); otherwise the rows are copied from the pools.
        """
        unsettled = self._unsettled.get(lane)
        if unsettled is not None and len(unsettled[0]) == len(slots) and np.array_equal(unsettled[0], slots):
            last = self.buffers(len(slots), lane)
            if unsettled[1] is last.hn or unsettled[1] is last.h0:
                # The newest state is in hn (a batch ran) or still in h0 (its model call failed): it is the input.
                buffers = self._lanes[lane].swapped[len(slots)] if unsettled[1] is last.hn else last
                if unsettled[1] is buffers.h0:
                    self._unsettled[lane] = (unsettled[0], buffers.h0, buffers.c0)
                    return buffers
        self._settle()
        buffers = self.buffers(len(slots), lane)
        # mode="clip": with the default mode="raise", numpy writes `out` through a temporary buffer (2.5x the
        # time at 124 rows of the default model's state, 2.6x at 2,048); the slots are valid indices anyway.
        np.take(self._h, slots, axis=1, out=buffers.h0, mode="clip")
        np.take(self._c, slots, axis=1, out=buffers.c0, mode="clip")
        return buffers

    def scatter(self, slots: np.ndarray, buffers: StateBuffers) -> None:
        """Takes the batch's new state (in its output buffers hn and cn) as the slots' state. It is written
        into the pools when anything else needs them; the lane's next batch of the same slots reads it in place."""
        # What this replaces is None (a gather of any lane settled it) or an older state of exactly these slots
        # (this batch's gather found it in place).
        self._unsettled[buffers.lane] = (slots, buffers.hn, buffers.cn)

    def _settle(self) -> None:
        """Writes the newest state still held in batch buffers (of every lane) into the pools."""
        for lane in list(self._unsettled):
            self._settle_lane(lane)

    def _settle_lane(self, lane: int) -> None:
        unsettled = self._unsettled.pop(lane, None)
        if unsettled is not None:
            slots, h, c = unsettled
            self._h[:, slots, :] = h
            self._c[:, slots, :] = c
