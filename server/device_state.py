"""Session state kept on the accelerator: pools as ONNX Runtime device buffers.

With the CUDA execution provider, h and c stay on the GPU between steps. The
pools are `OrtValue`s shaped [capacity, rows, width] (slot-major), and two tiny
ONNX graphs, run by ONNX Runtime on the same device, move rows:
- gather: `Gather(pool, slots, axis=0)` then `Transpose` -> h0/c0 [rows, batch, width];
- scatter: `Transpose(hn)` then `ScatterND(pool, slots, rows)`, with the pool bound
  as both input and output so that the CUDA kernel updates it in place (it skips
  its input-to-output copy when both are the same buffer).
The runner binds h0/c0/hn/cn as device buffers, so only the token ids go to the
device and only the logits come back. A single-state model (GRU, RNN; c_width 0)
has no c pool, buffers or graph nodes. As in `HostStateStore`, the batch buffers of
every size are the start of four flat device buffers sized for the largest batch
(bound by pointer and shape), so device memory holds one largest batch's worth.
The same code runs on the CPU provider, which is how the tests check it without
a GPU (there the scatter copies the pool).

Only the scheduler touches the store, from one thread at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from lstmserve.metadata import StateSpec
from lstmserve.server.state import SessionState, SlotList

OPSET = 17


@dataclass(frozen=True)
class DeviceTensor:
    """A contiguous float32 tensor of `shape` at the start of a device buffer (`memory`, kept alive here)."""

    memory: ort.OrtValue
    shape: tuple[int, ...]
    device: str
    device_id: int

    def bind_input(self, binding: ort.IOBinding, name: str) -> None:
        """Binds this tensor as the input `name` (by pointer: no copy)."""
        binding.bind_input(name, self.device, self.device_id, np.float32, list(self.shape), self.memory.data_ptr())

    def bind_output(self, binding: ort.IOBinding, name: str) -> None:
        """Binds this tensor as the output `name`, which the run writes in place."""
        binding.bind_output(name, self.device, self.device_id, np.float32, list(self.shape), self.memory.data_ptr())

    def to_host(self) -> np.ndarray:
        """A host copy of the tensor."""
        return self.memory.numpy().reshape(-1)[: math.prod(self.shape)].reshape(self.shape).copy()


@dataclass(frozen=True)
class DeviceStateBuffers:
    """Device buffers for one batch size: h0/c0 (gathered) and hn/cn (written by the model);
    c0 and cn are None for a single-state model."""

    h0: DeviceTensor
    c0: DeviceTensor | None
    hn: DeviceTensor
    cn: DeviceTensor | None

    def bind(self, binding: ort.IOBinding, h: StateSpec, c: StateSpec | None) -> None:
        """Binds the buffers to the model's state inputs and outputs."""
        self.h0.bind_input(binding, h.input_name)
        self.hn.bind_output(binding, h.output_name)
        if c is not None and self.c0 is not None and self.cn is not None:
            self.c0.bind_input(binding, c.input_name)
            self.cn.bind_output(binding, c.output_name)


def _gather_graph(names: tuple[str, ...]) -> onnx.ModelProto:
    nodes = []
    for name in names:
        nodes += [
            helper.make_node("Gather", [f"pool_{name}", "slots"], [f"rows_{name}"], axis=0),
            helper.make_node("Transpose", [f"rows_{name}"], [f"{name}0"], perm=[1, 0, 2]),
        ]
    inputs = [*(_float(f"pool_{n}", ["n", "r", f"w{n}"]) for n in names), _int64("slots", ["b"])]
    outputs = [_float(f"{n}0", ["r", "b", f"w{n}"]) for n in names]
    return _model(helper.make_graph(nodes, "lstmserve_gather", inputs, outputs))


def _scatter_graph(names: tuple[str, ...]) -> onnx.ModelProto:
    nodes = [helper.make_node("Unsqueeze", ["slots", "axis1"], ["index"])]
    for name in names:
        nodes += [
            helper.make_node("Transpose", [f"{name}n"], [f"rows_{name}"], perm=[1, 0, 2]),
            helper.make_node("ScatterND", [f"pool_{name}", "index", f"rows_{name}"], [f"pool_{name}_out"]),
        ]
    inputs = [
        *(_float(f"pool_{n}", ["n", "r", f"w{n}"]) for n in names),
        _int64("slots", ["b"]),
        *(_float(f"{n}n", ["r", "b", f"w{n}"]) for n in names),
    ]
    outputs = [_float(f"pool_{n}_out", ["n", "r", f"w{n}"]) for n in names]
    axis = helper.make_tensor("axis1", TensorProto.INT64, [1], [1])
    return _model(helper.make_graph(nodes, "lstmserve_scatter", inputs, outputs, initializer=[axis]))


def _float(name: str, shape: list[str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _int64(name: str, shape: list[str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, shape)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


class DeviceStateStore:
    """Pools of h and c rows on an ONNX Runtime device ("cuda" or "cpu"), one slot per session.

    Args:
        rows, h_width, c_width, capacity: as for `HostStateStore`.
        providers: the ONNX Runtime providers of the model's session (the row graphs run on the same).
        device: "cuda" or "cpu"; device_id: the device index.
    """

    # One batch in flight at a time: its gather and scatter run ONNX Runtime graphs on the device, which have
    # not been checked beside a model call computing on the worker thread.
    max_lanes = 1

    def __init__(
        self,
        rows: int,
        h_width: int,
        c_width: int,
        capacity: int,
        *,
        providers: list[str],
        provider_options: list[dict[str, str]],
        device: str,
        device_id: int = 0,
    ) -> None:
        self.rows = rows
        self.h_width = h_width
        self.c_width = c_width
        self.capacity = capacity
        self.device = device
        self.device_id = device_id
        names = ("h", "c") if c_width else ("h",)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._gather = ort.InferenceSession(
            _gather_graph(names).SerializeToString(), options, providers=providers, provider_options=provider_options
        )
        self._scatter = ort.InferenceSession(
            _scatter_graph(names).SerializeToString(), options, providers=providers, provider_options=provider_options
        )
        self._pool_h = self._zeros((capacity, rows, h_width))
        self._pool_c = self._zeros((capacity, rows, c_width)) if c_width else None
        self._slots = SlotList(capacity)
        # Batch buffers as in HostStateStore: flat device buffers for `_batch_capacity` rows, and per batch
        # size tensors at their start. Reading and writing one slot use exactly sized buffers of their own.
        self._batch_capacity = 0
        self._flat: tuple[ort.OrtValue | None, ...] = ()
        self._buffers: dict[int, DeviceStateBuffers] = {}
        self._single = self._make_buffers(
            tuple(self._empty((rows, 1, w)) if w else None for w in (h_width, c_width, h_width, c_width)), 1
        )

    def _zeros(self, shape: tuple[int, ...]) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32), self.device, self.device_id)

    def _empty(self, shape: tuple[int, ...]) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, self.device, self.device_id)

    def _tensor(self, memory: ort.OrtValue, shape: tuple[int, ...]) -> DeviceTensor:
        return DeviceTensor(memory=memory, shape=shape, device=self.device, device_id=self.device_id)

    def _make_buffers(self, memories: tuple[ort.OrtValue | None, ...], batch_size: int) -> DeviceStateBuffers:
        """Buffers h0, c0, hn, cn for `batch_size` rows at the start of `memories` (c's are None without c)."""
        h0, c0, hn, cn = memories
        if h0 is None or hn is None:
            raise ValueError("the h buffers are missing")
        h_shape, c_shape = (self.rows, batch_size, self.h_width), (self.rows, batch_size, self.c_width)
        return DeviceStateBuffers(
            h0=self._tensor(h0, h_shape),
            c0=None if c0 is None else self._tensor(c0, c_shape),
            hn=self._tensor(hn, h_shape),
            cn=None if cn is None else self._tensor(cn, c_shape),
        )

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
        self.write(
            slot,
            SessionState(
                h=np.zeros((self.rows, 1, self.h_width), np.float32), c=np.zeros((self.rows, 1, self.c_width), np.float32)
            ),
        )

    def read(self, slot: int) -> SessionState:
        """Copies one slot's state to the host."""
        buffers = self._single
        self._run_gather(np.array([slot], np.int64), buffers)
        c = buffers.c0.to_host() if buffers.c0 is not None else np.zeros((self.rows, 1, 0), np.float32)
        return SessionState(h=buffers.h0.to_host(), c=c)

    def write(self, slot: int, state: SessionState) -> None:
        """Overwrites one slot's state from host arrays."""
        buffers = self._single
        buffers.hn.memory.update_inplace(np.ascontiguousarray(state.h, np.float32))
        if buffers.cn is not None:
            buffers.cn.memory.update_inplace(np.ascontiguousarray(state.c, np.float32))
        self.scatter(np.array([slot], np.int64), buffers)

    def buffers(self, batch_size: int) -> DeviceStateBuffers:
        """Device buffers for a batch of this size: tensors at the start of four flat device buffers
        (those of one size overlap those of every other size: one batch at a time uses them)."""
        buffers = self._buffers.get(batch_size)
        if buffers is None:
            widths = (self.h_width, self.c_width, self.h_width, self.c_width)
            if batch_size > self._batch_capacity:  # grow to the next power of two; the old tensors go
                self._batch_capacity = 1 << (batch_size - 1).bit_length()
                self._flat = tuple(self._empty((self.rows * self._batch_capacity * w,)) if w else None for w in widths)
                self._buffers.clear()
            buffers = self._make_buffers(self._flat, batch_size)
            self._buffers[batch_size] = buffers
        return buffers

    def gather(self, slots: np.ndarray, lane: int = 0) -> DeviceStateBuffers:
        """Gathers the slots' rows into the batch's h0/c0 device buffers (one lane: see `max_lanes`)."""
        if lane >= self.max_lanes:
            raise ValueError(f"the device state store has {self.max_lanes} lane(s), not lane {lane}")
        buffers = self.buffers(len(slots))
        self._run_gather(slots, buffers)
        return buffers

    def _run_gather(self, slots: np.ndarray, buffers: DeviceStateBuffers) -> None:
        binding = self._gather.io_binding()
        binding.bind_ortvalue_input("pool_h", self._pool_h)
        binding.bind_cpu_input("slots", np.ascontiguousarray(slots, np.int64))
        buffers.h0.bind_output(binding, "h0")
        if self._pool_c is not None and buffers.c0 is not None:
            binding.bind_ortvalue_input("pool_c", self._pool_c)
            buffers.c0.bind_output(binding, "c0")
        self._gather.run_with_iobinding(binding)

    def scatter(self, slots: np.ndarray, buffers: DeviceStateBuffers) -> None:
        """Writes the batch's hn/cn device buffers back into the slots' rows, in place."""
        binding = self._scatter.io_binding()
        binding.bind_ortvalue_input("pool_h", self._pool_h)
        binding.bind_cpu_input("slots", np.ascontiguousarray(slots, np.int64))
        buffers.hn.bind_input(binding, "hn")
        binding.bind_ortvalue_output("pool_h_out", self._pool_h)
        if self._pool_c is not None and buffers.cn is not None:
            binding.bind_ortvalue_input("pool_c", self._pool_c)
            buffers.cn.bind_input(binding, "cn")
            binding.bind_ortvalue_output("pool_c_out", self._pool_c)
        self._scatter.run_with_iobinding(binding)

