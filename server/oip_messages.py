"""Open Inference Protocol messages to plain values and back, with input validation.

Pure functions: no server state; `oip.py` (the gRPC servicer) is their only user. Every
check runs before the request touches a session, so a refused request changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lstmserve.inference import grpc_service_pb2 as pb
from lstmserve.metadata import ModelSpec
from lstmserve.server.errors import InvalidInput

# The request parameter that asks for the logits of the last position only (bool).
LAST_POSITION_ONLY = "last_position_only"
# Request parameters that are accepted and have no effect here (Triton's scheduling hints).
IGNORED_PARAMETERS = frozenset({"priority", "timeout", "binary_data_output"})
# Output parameters that are accepted and have no effect (HTTP's binary flag).
IGNORED_OUTPUT_PARAMETERS = frozenset({"binary_data"})
SHOWN_CHARACTERS = 64


@dataclass(frozen=True)
class TensorFormat:
    """The model's input or output as the protocol describes it.

    Args:
        name: tensor name (`tokens`, `features`, `logits`).
        datatype: protocol datatype (`INT64`, `FP32`).
        shape: full shape with the batch and time dimensions as -1.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Sequence:
    """Triton's sequence controls of a request.

    Args:
        key: the sequence id (int or str); None when the request names no sequence.
        start: `sequence_start`: begin the sequence from zero state.
        end: `sequence_end`: free the sequence after this request.
    """

    key: int | str | None
    start: bool = False
    end: bool = False


@dataclass(frozen=True)
class InferCall:
    """A validated ModelInferRequest.

    Args:
        id: the request id, echoed in the response.
        inputs: int64 tokens [batch, positions] or float32 features [batch, positions, width].
        sequence: the sequence it belongs to, if any (then batch is 1).
        last_position_only: return logits for the last position only.
    """

    id: str
    inputs: np.ndarray
    sequence: Sequence
    last_position_only: bool = False


def input_format(spec: ModelSpec) -> TensorFormat:
    """The model's input tensor."""
    if spec.kind == "tokens":
        return TensorFormat(spec.input_name, "INT64", (-1, -1))
    return TensorFormat(spec.input_name, "FP32", (-1, -1, spec.input_size))


def output_format(spec: ModelSpec) -> TensorFormat:
    """The model's output tensor."""
    return TensorFormat(spec.output_name, "FP32", (-1, -1, spec.output_size))


def show(value: object) -> str:
    """A value for an error message, cut short if long."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS] + "..."


def sequence_key(request: pb.ModelInferRequest) -> int | str | None:
    """The request's sequence id without validating the rest (None if absent, zero or malformed)."""
    if "sequence_id" not in request.parameters:
        return None
    parameter = request.parameters["sequence_id"]
    choice = parameter.WhichOneof("parameter_choice")
    if choice == "string_param":
        return parameter.string_param or None
    if choice in ("int64_param", "uint64_param"):
        # Triton's correlation id is a uint64 and it reads an int64 sequence_id as one: -1 is 2**64 - 1.
        return getattr(parameter, choice) % 2**64 or None
    return None


def decode_sequence(request: pb.ModelInferRequest) -> Sequence:
    """The sequence controls; InvalidInput for a parameter of the wrong type. Whether the model takes
    them (and a start or end without an id) is the servicer's to check."""
    parameters = request.parameters
    if "sequence_id" in parameters:
        choice = parameters["sequence_id"].WhichOneof("parameter_choice")
        if choice not in ("int64_param", "uint64_param", "string_param"):
            raise InvalidInput(f"parameter sequence_id must be an int64, uint64 or string, got {choice or 'no value'}")
    start = _bool_parameter(request, "sequence_start")
    end = _bool_parameter(request, "sequence_end")
    return Sequence(key=sequence_key(request), start=start, end=end)


def sequence_label(key: int | str) -> str:
    """A sequence id as Triton writes it in messages (a string id bare), cut short if long."""
    text = str(key)
    return text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS] + "..."


def not_started_message(key: int | str, model: str) -> str:
    """Triton's words for a request of a sequence that is not active (INVALID_ARGUMENT)."""
    return (
        f"inference request for sequence {sequence_label(key)} to model '{model}' must specify the START flag "
        "on the first request of the sequence"
    )


def no_sequence_message(model: str) -> str:
    """Triton's words for a request without a sequence id to a sequence model (INVALID_ARGUMENT)."""
    return f"inference request to model '{model}' must specify a non-zero or non-empty correlation ID"


def _bool_parameter(request: pb.ModelInferRequest, name: str) -> bool:
    if name not in request.parameters:
        return False
    parameter = request.parameters[name]
    if parameter.WhichOneof("parameter_choice") != "bool_param":
        choice = parameter.WhichOneof("parameter_choice") or "no value"
        raise InvalidInput(f"parameter {name} must be a bool, got {choice}")
    return parameter.bool_param


def decode_infer(request: pb.ModelInferRequest, spec: ModelSpec, max_positions: int, max_batch: int) -> InferCall:
    """Validates a request against the model and limits; returns its plain form."""
    sequence = decode_sequence(request)
    last_only = _bool_parameter(request, LAST_POSITION_ONLY)
    _check_outputs(request, spec)
    expected = input_format(spec)
    names = [tensor.name for tensor in request.inputs]
    if names != [expected.name]:
        raise InvalidInput(
            f"inputs {show(names)}: this model takes exactly one input, {expected.name!r} "
            f"{expected.datatype} {_shape_text(expected.shape)}"
        )
    tensor = request.inputs[0]
    if tensor.datatype != expected.datatype:
        raise InvalidInput(f"input {expected.name!r} has datatype {show(tensor.datatype)}; this model takes {expected.datatype}")
    shape = tuple(int(d) for d in tensor.shape)
    _check_shape(shape, expected, spec, max_positions, max_batch, in_sequence=sequence.key is not None)
    array = _tensor_data(request, tensor, shape)
    if spec.kind == "tokens":
        vocab = len(spec.vocabulary) or spec.output_size
        bad = np.flatnonzero((array < 0) | (array >= vocab))
        if bad.size:
            raise InvalidInput(
                f"token id {int(array.flat[bad[0]])} at flat index {int(bad[0])} is outside the vocabulary [0, {vocab})"
            )
    elif not np.all(np.isfinite(array)):
        raise InvalidInput(f"input {expected.name!r} contains NaN or infinity")
    return InferCall(id=request.id, inputs=array, sequence=sequence, last_position_only=last_only)


def _check_outputs(request: pb.ModelInferRequest, spec: ModelSpec) -> None:
    for output in request.outputs:
        if output.name != spec.output_name:
            raise InvalidInput(f"requested output {show(output.name)} does not exist; this model has {spec.output_name!r}")
        for name in output.parameters:
            if name == "classification":
                raise InvalidInput(f"output {spec.output_name!r}: the classification parameter is not supported")
            if name not in IGNORED_OUTPUT_PARAMETERS:
                raise InvalidInput(f"output {spec.output_name!r}: unknown parameter {show(name)}")


def _check_shape(
    shape: tuple[int, ...], expected: TensorFormat, spec: ModelSpec, max_positions: int, max_batch: int, *,
    in_sequence: bool,
) -> None:
    name = expected.name
    if len(shape) != len(expected.shape) or any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r} has shape {list(shape)}; this model takes {_shape_text(expected.shape)}")
    batch, positions = shape[0], shape[1]
    if spec.kind == "features" and shape[2] != spec.input_size:
        raise InvalidInput(f"input {name!r} has {shape[2]} features per row; this model takes {spec.input_size}")
    if in_sequence:
        max_batch = 1
    if not 1 <= batch <= max_batch:
        where = "a sequence request carries batch size 1" if in_sequence else f"batch size must be 1..{max_batch}"
        raise InvalidInput(f"input {name!r} has batch size {batch}: {where}")
    if positions == 0:
        raise InvalidInput(f"input {name!r} has no positions (shape {list(shape)})")
    if batch * positions > max_positions:
        raise InvalidInput(
            f"input {name!r} has {batch * positions} positions in all, more than max_tokens_per_request={max_positions}"
        )


def _tensor_data(request: pb.ModelInferRequest, tensor: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...]) -> np.ndarray:
    """The input's values from raw_input_contents or typed contents, shaped; InvalidInput if they disagree."""
    count = math.prod(shape)  # Python ints: a huge shape cannot wrap around
    dtype = np.dtype("<i8") if tensor.datatype == "INT64" else np.dtype("<f4")
    filled = [field.name for field, _ in tensor.contents.ListFields()]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInput(
                f"raw_input_contents has {len(request.raw_input_contents)} entries for {len(request.inputs)} input(s)"
            )
        if filled:
            raise InvalidInput(f"input {tensor.name!r} has both raw_input_contents and contents.{filled[0]}")
        raw = request.raw_input_contents[0]
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {tensor.name!r}: raw_input_contents has {len(raw)} bytes but shape {list(shape)} "
                f"needs {count * dtype.itemsize} ({tensor.datatype})"
            )
        array = np.frombuffer(raw, dtype=dtype)
    else:
        field = "int64_contents" if tensor.datatype == "INT64" else "fp32_contents"
        if any(name != field for name in filled):
            raise InvalidInput(f"input {tensor.name!r} is {tensor.datatype}: put its values in contents.{field}")
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise InvalidInput(
                f"input {tensor.name!r}: contents.{field} has {len(values)} values but shape {list(shape)} needs {count}"
            )
        array = np.array(values, dtype=dtype)
    native = np.int64 if tensor.datatype == "INT64" else np.float32
    return array.astype(native, copy=False).reshape(shape)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("batch" if i == 0 else "positions" if d < 0 else str(d) for i, d in enumerate(shape)) + "]"


def infer_response(
    call: InferCall, logits: np.ndarray, spec: ModelSpec, model_name: str, version: str
) -> pb.ModelInferResponse:
    """The response for a call: float32 logits [batch, positions, output_size] in raw_output_contents."""
    if call.last_position_only:
        logits = logits[:, -1:]
    response = pb.ModelInferResponse(model_name=model_name, model_version=version, id=call.id)
    response.outputs.add(name=spec.output_name, datatype="FP32", shape=logits.shape)
    response.raw_output_contents.append(np.ascontiguousarray(logits, dtype="<f4").tobytes())
    return response
