"""The models the Open Inference Protocol serves, and how Triton's RPCs describe them.

One exported model is served under two names:
- the sequence model (`--model-name`, e.g. `default`): Triton's sequence batcher. Every request
  names a sequence (`sequence_id`) whose state the server keeps; requests without one are refused,
  as Triton refuses them.
- the stateless model (the same name + `-stateless`): each request runs its whole input from zero
  state and keeps nothing, as a Triton model without a sequence batcher. A user who wants that
  names this model, explicitly.
A bidirectional model cannot keep sequences: it is served only under its name, stateless.

Pure functions of the model, the settings and the statistics: no server state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lstmserve.inference import grpc_service_pb2 as pb
from lstmserve.inference import model_config_pb2 as config_pb
from lstmserve.metadata import ModelSpec
from lstmserve.server import oip_messages as messages
from lstmserve.server.config import ServerConfig
from lstmserve.server.statistics import Duration, InferenceStatistics

MODEL_VERSION = "1"
# Triton's names for a model that ONNX Runtime runs: what lstmserve serves.
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
STATELESS_SUFFIX = "-stateless"
# Triton's Open Inference Protocol extensions that lstmserve implements (ServerMetadata).
EXTENSIONS = ("model_configuration", "sequence", "sequence(string_id)", "statistics", "parameters")
# The sequence batcher's control tensors, as a Triton config names them; lstmserve's scheduler acts
# on the flags itself (the ONNX graph has no such inputs).
CONTROL_INPUTS = (
    ("START", config_pb.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START),
    ("END", config_pb.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END),
    ("READY", config_pb.ModelSequenceBatching.Control.CONTROL_SEQUENCE_READY),
)
DATA_TYPES = {"INT64": config_pb.TYPE_INT64, "FP32": config_pb.TYPE_FP32}


@dataclass(frozen=True)
class ServedModel:
    """One name the protocol serves the model under.

    Args:
        name: the model name in requests.
        sequences: True for the sequence model (every request names a sequence), False for a
            stateless one (requests name none).
        statistics: what ModelStatistics reports for it.
    """

    name: str
    sequences: bool
    statistics: InferenceStatistics


def served_models(spec: ModelSpec, name: str, batcher: InferenceStatistics) -> dict[str, ServedModel]:
    """The names the model is served under: the sequence model (whose statistics are the batcher's)
    and its stateless twin, or for a bidirectional model only its stateless self."""
    if not spec.steppable:
        return {name: ServedModel(name, sequences=False, statistics=InferenceStatistics())}
    stateless = name + STATELESS_SUFFIX
    return {
        name: ServedModel(name, sequences=True, statistics=batcher),
        stateless: ServedModel(stateless, sequences=False, statistics=InferenceStatistics()),
    }


def model_metadata(spec: ModelSpec, model: ServedModel) -> pb.ModelMetadataResponse:
    """ModelMetadata: the input and output with the batch and time dimensions as -1."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    inputs, outputs = messages.input_format(spec), messages.output_format(spec)
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[MODEL_VERSION],
        platform=PLATFORM,
        inputs=[tensor(name=inputs.name, datatype=inputs.datatype, shape=inputs.shape)],
        outputs=[tensor(name=outputs.name, datatype=outputs.datatype, shape=outputs.shape)],
    )


def model_config(
    spec: ModelSpec, config: ServerConfig, model: ServedModel, *, on_gpu: bool, device_id: int
) -> config_pb.ModelConfig:
    """The model as a Triton config.pbtxt would describe it (dims exclude the batch dimension).

    The sequence model has a `sequence_batching` section: the START, END and READY controls, and
    the recurrent state as implicit state pairs (h and c, zero at a sequence's start), with the
    scheduler's limits. The stateless one has none (Triton's default scheduler).
    """
    inputs, outputs = messages.input_format(spec), messages.output_format(spec)
    kind = config_pb.ModelInstanceGroup
    message = config_pb.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=config.max_batch_size,
        input=[config_pb.ModelInput(name=inputs.name, data_type=DATA_TYPES[inputs.datatype], dims=inputs.shape[1:])],
        output=[
            config_pb.ModelOutput(name=outputs.name, data_type=DATA_TYPES[outputs.datatype], dims=outputs.shape[1:])
        ],
        instance_group=[
            kind(
                name=f"{model.name}_0",
                count=1,
                kind=kind.KIND_GPU if on_gpu else kind.KIND_CPU,
                gpus=[device_id] if on_gpu else [],
            )
        ],
        default_model_filename=config.model.name,
        model_transaction_policy=config_pb.ModelTransactionPolicy(decoupled=False),
    )
    message.version_policy.latest.num_versions = 1
    if model.sequences:
        _describe_sequence_batching(message.sequence_batching, spec, config)
    details = {
        "kind": spec.kind,
        "head": spec.head,
        "steppable": json.dumps(spec.steppable),
        "fingerprint": spec.fingerprint,
        "vocabulary": json.dumps(list(spec.vocabulary)),
        "max_tokens_per_request": str(config.max_tokens_per_request),
        "server": "lstmserve",
    }
    for key, value in details.items():
        message.parameters[key].string_value = value
    return message


def _describe_sequence_batching(
    batching: config_pb.ModelSequenceBatching, spec: ModelSpec, config: ServerConfig
) -> None:
    batching.max_sequence_idle_microseconds = int(config.session_ttl_s * 1_000_000)
    batching.oldest.max_candidate_sequences = config.max_sessions
    batching.oldest.max_queue_delay_microseconds = config.max_wait_us
    control = config_pb.ModelSequenceBatching.Control
    for name, kind in CONTROL_INPUTS:
        batching.control_input.add(
            name=name, control=[control(kind=kind, int32_false_true=[0, 1], data_type=config_pb.TYPE_INT32)]
        )
    for state in spec.states:  # (h, c) for an LSTM, h alone for a GRU or RNN
        dims = [spec.state_rows, state.width]  # per sequence; the ONNX graph has the batch in the middle
        batching.state.add(
            input_name=state.input_name,
            output_name=state.output_name,
            data_type=config_pb.TYPE_FP32,
            dims=dims,
            initial_state=[
                config_pb.ModelSequenceBatching.InitialState(
                    name="zero", data_type=config_pb.TYPE_FP32, dims=dims, zero_data=True
                )
            ],
        )


def model_statistics(model: ServedModel) -> pb.ModelStatistics:
    """Triton's ModelStatistics from a model's running totals."""
    stats = model.statistics

    def duration(value: Duration) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=value.count, ns=value.ns)

    return pb.ModelStatistics(
        name=model.name,
        version=MODEL_VERSION,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inferences,
        execution_count=stats.executions,
        inference_stats=pb.InferStatistics(
            success=duration(stats.success),
            fail=duration(stats.fail),
            queue=duration(stats.queue),
            compute_input=duration(stats.compute_input),
            compute_infer=duration(stats.compute_infer),
            compute_output=duration(stats.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=duration(totals.compute_input),
                compute_infer=duration(totals.compute_infer),
                compute_output=duration(totals.compute_output),
            )
            for size, totals in sorted(stats.batches.items())
        ],
    )
