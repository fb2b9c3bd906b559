"""The runner: owns the ONNX Runtime session and runs batches. Knows nothing of sessions."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from lstmserve.interface import GraphTensor, check_graph
from lstmserve.metadata import METADATA_KEY, ModelSpec, ModelSpecError, StateSpec


class BindableState(Protocol):
    """Batch state buffers that can bind themselves to the model's state inputs and outputs
    (`c` is None for single-state models: GRU, RNN)."""

    def bind(self, binding: ort.IOBinding, h: StateSpec, c: StateSpec | None) -> None: ...


log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}


class ModelLoadError(ValueError):
    """ONNX Runtime cannot load the model file."""


class ProviderError(ValueError):
    """A requested execution provider is unknown or not available."""


def resolve_providers(requested: tuple[str, ...], available: list[str]) -> list[str]:
    """Turns `--providers` values ("auto", "cuda", "cpu" or full names) into ONNX Runtime names.

    "auto" means CUDA when this ONNX Runtime build has it, else CPU. An explicit
    provider that is not available is an error, unless a later one in the list is.
    """
    if requested == ("auto",):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else [
            "CPUExecutionProvider"
        ]
    names: list[str] = []
    for value in requested:
        name = PROVIDER_NAMES.get(value.lower(), value)
        if name not in PROVIDER_NAMES.values() and name not in available:
            raise ProviderError(f"unknown provider {value!r}; use auto, cuda or cpu")
        if name in available:
            names.append(name)
    if not names:
        raise ProviderError(
            f"none of the providers {list(requested)} is available in this ONNX Runtime build "
            f"(available: {available}); install lstmserve[gpu] for CUDA"
        )
    return names


def read_spec(session: ort.InferenceSession, path: Path) -> ModelSpec:
    """Reads the lstmserve metadata that `lstmserve export` (or `annotate`) stored in the model, and checks
    it against the graph's inputs and outputs (ModelInterfaceError, a ModelSpecError, if they differ)."""
    metadata = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in metadata:
        raise ModelSpecError(
            f"{path} has no {METADATA_KEY!r} metadata: export it with `lstmserve export`, "
            "or describe its inputs and state with `lstmserve annotate`"
        )
    spec = ModelSpec.from_json(metadata[METADATA_KEY])
    check_graph(spec, _tensors(session.get_inputs()), _tensors(session.get_outputs()), where=str(path))
    return spec


def _tensors(args: list[ort.NodeArg]) -> list[GraphTensor]:
    return [GraphTensor(a.name, a.type, tuple(a.shape)) for a in args]


@dataclass(frozen=True)
class RunnerOptions:
    """How to create the ONNX Runtime session."""

    providers: tuple[str, ...] = ("auto",)
    device_id: int = 0
    intra_op_threads: int = 0


@dataclass(frozen=True)
class PreparedCall:
    """A model call bound to its buffers (`Runner.prepare`), ready for `Runner.execute`.

    Args:
        binding: the IO binding of inputs, logits and state.
        output: the logits buffer the call writes.
        inputs: the bound input buffer (kept alive while bound).
        time_major: the output is [time, batch, ...] and `logits` transposes it.
    """

    binding: ort.IOBinding
    output: np.ndarray
    inputs: np.ndarray
    time_major: bool = False

    @property
    def positions(self) -> int:
        """Positions per row."""
        return self.output.shape[0] if self.time_major else self.output.shape[1]

    def logits(self) -> np.ndarray:
        """The call's logits [batch, time, output_size], once it ran."""
        return np.ascontiguousarray(np.swapaxes(self.output, 0, 1)) if self.time_major else self.output


class Runner:
    """Runs the exported model on batches: inputs plus initial state in, logits and new state out.

    The state goes in and out through IO binding on caller-owned buffers, so the
    runner allocates only the logits it returns.
    """

    def __init__(self, model_path: Path, options: RunnerOptions = RunnerOptions()) -> None:
        available = ort.get_available_providers()
        providers = resolve_providers(options.providers, available)
        if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN libraries shipped as Python wheels (e.g. with torch)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = 1
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        provider_options = [{"device_id": str(options.device_id)} if p == "CUDAExecutionProvider" else {} for p in providers]
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=session_options, providers=providers, provider_options=provider_options
            )
        except Exception as exc:  # ONNX Runtime's load errors (InvalidProtobuf, Fail, ...) share no base class
            raise ModelLoadError(f"cannot load {str(model_path)!r}: {exc}") from exc
        self.spec = read_spec(self.session, model_path)
        self.provider = self.session.get_providers()[0]
        self.providers = providers
        self.provider_options = provider_options
        self.device_id = options.device_id
        self._input_dtype = np.int64 if self.spec.kind == "tokens" else np.float32
        # For single-position batches (see _run_single_position): per lane, input and logits buffers, and bindings.
        self._position = (1,) if self.spec.kind == "tokens" else (1, self.spec.input_size)
        self._step_inputs: dict[int, np.ndarray] = {}
        self._step_logits: dict[int, np.ndarray] = {}
        self._step_bindings: dict[tuple[int, int, int], tuple[BindableState, ort.IOBinding]] = {}
        log.info("model %s loaded on %s (providers asked: %s)", model_path, self.provider, providers)

    def run(self, inputs: np.ndarray, state: BindableState, lane: int = 0) -> np.ndarray:
        """Runs one batch: `prepare`, `execute`, then the call's logits.

        Args:
            inputs: int64 tokens [batch, time] or float32 features [batch, time, input_size].
            state: buffers whose h0/c0 hold the initial state and whose hn/cn receive the new
                state, on the host (`StateBuffers`) or the device (`DeviceStateBuffers`).
            lane: which batch in flight this is (see `StateStore.max_lanes`): each lane has its own logits buffer.
        Returns:
            float32 logits [batch, time, output_size]. For single-position batches this is a
            buffer that the next single-position run of the same lane overwrites: copy what you keep.
        """
        call = self.prepare(inputs, state, lane)
        self.execute(call)
        return call.logits()

    def prepare(self, inputs: np.ndarray, state: BindableState, lane: int = 0) -> PreparedCall:
        """Binds a batch's inputs, logits and state for `execute` (arguments as for `run`).

        All the Python of a model call is here, so that the thread that executes it (the scheduler's worker)
        holds the GIL only for a moment: a worker that runs Python makes the event loop wait for the GIL.
        """
        if inputs.shape[1] == 1:
            return self._prepare_single_position(inputs, state, lane)
        if self.spec.time_major:  # the graph takes [time, batch, ...]: transpose in and out
            inputs = np.ascontiguousarray(np.swapaxes(inputs, 0, 1), dtype=self._input_dtype)
            logits = np.empty((inputs.shape[0], inputs.shape[1], self.spec.output_size), dtype=np.float32)
            return PreparedCall(self._bind(inputs, logits, state), logits, inputs, time_major=True)
        inputs = np.ascontiguousarray(inputs, dtype=self._input_dtype)
        logits = np.empty((inputs.shape[0], inputs.shape[1], self.spec.output_size), dtype=np.float32)
        return PreparedCall(self._bind(inputs, logits, state), logits, inputs)

    def execute(self, call: PreparedCall) -> None:
        """Runs a prepared model call (on any thread; ONNX Runtime releases the GIL while it computes)."""
        self.session.run_with_iobinding(call.binding)

    def _prepare_single_position(self, inputs: np.ndarray, state: BindableState, lane: int) -> PreparedCall:
        """Single steps, the hot path: an IO binding kept per lane and batch size (binding anew costs about
        30 microseconds, a quarter of a batch-1 step), over the lane's input and logits buffers sized for its
        largest batch so far; the state stores hand out the same buffers per batch size."""
        batch = inputs.shape[0]
        step_inputs = self._step_inputs.get(lane)
        if step_inputs is None or step_inputs.shape[0] < batch:  # grow the lane's buffers; bindings over the old go
            capacity = 1 << (batch - 1).bit_length()
            step_inputs = self._step_inputs[lane] = np.empty((capacity, *self._position), dtype=self._input_dtype)
            self._step_logits[lane] = np.empty((capacity, 1, self.spec.output_size), dtype=np.float32)
            for key in [k for k in self._step_bindings if k[0] == lane]:
                del self._step_bindings[key]
        step_logits = self._step_logits[lane]
        # Keyed on the state buffers too: a store may alternate two buffer sets of one size (see HostStateStore.gather).
        key = (lane, batch, id(state))
        cached = self._step_bindings.get(key)
        if cached is None or cached[0] is not state:
            swap = self.spec.time_major
            cached = (state, self._bind(step_inputs[:batch], step_logits[:batch], state, swap_axes=swap))
            self._step_bindings[key] = cached
        step_inputs[:batch] = inputs
        return PreparedCall(cached[1], step_logits[:batch], step_inputs)

    def _bind(
        self, inputs: np.ndarray, logits: np.ndarray, state: BindableState, *, swap_axes: bool = False
    ) -> ort.IOBinding:
        """An IO binding of the model's input, logits and state to these contiguous buffers (no copies).

        `swap_axes`: bind [batch, 1, ...] buffers as [1, batch, ...], the same memory, for a time-major
        graph's single position (multi-position batches for such a graph come transposed already).
        """
        spec = self.spec
        in_shape, out_shape = list(inputs.shape), list(logits.shape)
        if swap_axes:
            in_shape[0], in_shape[1] = in_shape[1], in_shape[0]
            out_shape[0], out_shape[1] = out_shape[1], out_shape[0]
        binding = self.session.io_binding()
        binding.bind_input(spec.input_name, "cpu", 0, self._input_dtype, in_shape, inputs.ctypes.data)
        binding.bind_output(spec.output_name, "cpu", 0, np.float32, out_shape, logits.ctypes.data)
        state.bind(binding, spec.h, spec.c)
        return binding

    def run_stateless(self, inputs: np.ndarray) -> np.ndarray:
        """Runs whole sequences from zero state (for Infer and bidirectional models)."""
        spec = self.spec
        batch = inputs.shape[0]
        data = np.swapaxes(inputs, 0, 1) if spec.time_major else inputs
        feeds = {spec.input_name: np.ascontiguousarray(data, dtype=self._input_dtype)}
        for state in spec.states:
            feeds[state.input_name] = np.zeros((spec.state_rows, batch, state.width), np.float32)
        (logits,) = self.session.run([spec.output_name], feeds)
        logits = np.asarray(logits, dtype=np.float32)
        return np.ascontiguousarray(np.swapaxes(logits, 0, 1)) if spec.time_major else logits

