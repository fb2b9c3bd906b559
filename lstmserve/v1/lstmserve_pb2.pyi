from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_UNSPECIFIED: _ClassVar[OutputKind]
    OUTPUT_LOGITS: _ClassVar[OutputKind]
    OUTPUT_TOPK: _ClassVar[OutputKind]
    OUTPUT_SAMPLE: _ClassVar[OutputKind]
    OUTPUT_NONE: _ClassVar[OutputKind]
OUTPUT_UNSPECIFIED: OutputKind
OUTPUT_LOGITS: OutputKind
OUTPUT_TOPK: OutputKind
OUTPUT_SAMPLE: OutputKind
OUTPUT_NONE: OutputKind

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Generate(_message.Message):
    __slots__ = ("max_tokens", "sampling", "stop", "coalesce")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    COALESCE_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    sampling: Sampling
    stop: _containers.RepeatedScalarFieldContainer[str]
    coalesce: bool
    def __init__(self, max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., stop: _Optional[_Iterable[str]] = ..., coalesce: _Optional[bool] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("kind", "vocabulary", "input_size", "hidden_size", "num_layers", "num_directions", "proj_size", "output_size", "steppable", "provider", "fingerprint", "head", "max_tokens_per_request", "max_generate_tokens", "session_ttl_s", "max_sessions", "cell", "classes", "state_tensors", "max_sessions_per_request")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    PROJ_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEPPABLE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    STATE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    kind: str
    vocabulary: _containers.RepeatedScalarFieldContainer[str]
    input_size: int
    hidden_size: int
    num_layers: int
    num_directions: int
    proj_size: int
    output_size: int
    steppable: bool
    provider: str
    fingerprint: str
    head: str
    max_tokens_per_request: int
    max_generate_tokens: int
    session_ttl_s: float
    max_sessions: int
    cell: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    state_tensors: int
    max_sessions_per_request: int
    def __init__(self, kind: _Optional[str] = ..., vocabulary: _Optional[_Iterable[str]] = ..., input_size: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_directions: _Optional[int] = ..., proj_size: _Optional[int] = ..., output_size: _Optional[int] = ..., steppable: _Optional[bool] = ..., provider: _Optional[str] = ..., fingerprint: _Optional[str] = ..., head: _Optional[str] = ..., max_tokens_per_request: _Optional[int] = ..., max_generate_tokens: _Optional[int] = ..., session_ttl_s: _Optional[float] = ..., max_sessions: _Optional[int] = ..., cell: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., state_tensors: _Optional[int] = ..., max_sessions_per_request: _Optional[int] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "step", "idle_s", "expires_in_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    idle_s: float
    expires_in_s: float
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., idle_s: _Optional[float] = ..., expires_in_s: _Optional[float] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionSnapshot(_message.Message):
    __slots__ = ("blob", "step")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    blob: bytes
    step: int
    def __init__(self, blob: _Optional[bytes] = ..., step: _Optional[int] = ...) -> None: ...

class RestoreSessionRequest(_message.Message):
    __slots__ = ("blob", "session_id")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    blob: bytes
    session_id: str
    def __init__(self, blob: _Optional[bytes] = ..., session_id: _Optional[str] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "tokens", "features", "output", "top_k", "sampling", "generate", "expected_step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    features: Tensor
    output: OutputKind
    top_k: int
    sampling: Sampling
    generate: Generate
    expected_step: int
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., output: _Optional[_Union[OutputKind, str]] = ..., top_k: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., generate: _Optional[_Union[Generate, _Mapping]] = ..., expected_step: _Optional[int] = ...) -> None: ...

class TopK(_message.Message):
    __slots__ = ("ids", "logprobs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session_id", "request_id", "step", "logits", "topk", "token", "text", "finished", "finish_reason", "batch_size", "tokens", "texts")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOPK_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: int
    step: int
    logits: Tensor
    topk: _containers.RepeatedCompositeFieldContainer[TopK]
    token: int
    text: str
    finished: bool
    finish_reason: str
    batch_size: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[int] = ..., step: _Optional[int] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., topk: _Optional[_Iterable[_Union[TopK, _Mapping]]] = ..., token: _Optional[int] = ..., text: _Optional[str] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., batch_size: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class StepSessionsRequest(_message.Message):
    __slots__ = ("steps", "columns")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[SessionStep]
    columns: SessionColumns
    def __init__(self, steps: _Optional[_Iterable[_Union[SessionStep, _Mapping]]] = ..., columns: _Optional[_Union[SessionColumns, _Mapping]] = ...) -> None: ...

class SessionColumns(_message.Message):
    __slots__ = ("session_ids", "tokens", "features", "expected_steps", "output", "top_k", "sampling")
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    features: Tensor
    expected_steps: _containers.RepeatedScalarFieldContainer[int]
    output: OutputKind
    top_k: int
    sampling: Sampling
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ..., tokens: _Optional[_Iterable[int]] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., expected_steps: _Optional[_Iterable[int]] = ..., output: _Optional[_Union[OutputKind, str]] = ..., top_k: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ...) -> None: ...

class SessionStep(_message.Message):
    __slots__ = ("session_id", "request_id", "tokens", "features", "output", "top_k", "sampling", "expected_step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    features: Tensor
    output: OutputKind
    top_k: int
    sampling: Sampling
    expected_step: int
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., output: _Optional[_Union[OutputKind, str]] = ..., top_k: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., expected_step: _Optional[int] = ...) -> None: ...

class StepSessionsResponse(_message.Message):
    __slots__ = ("results", "columns")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SessionStepResult]
    columns: SessionColumnsResult
    def __init__(self, results: _Optional[_Iterable[_Union[SessionStepResult, _Mapping]]] = ..., columns: _Optional[_Union[SessionColumnsResult, _Mapping]] = ...) -> None: ...

class SessionColumnsResult(_message.Message):
    __slots__ = ("steps", "batch_sizes", "logits", "topk_ids", "topk_logprobs", "tokens", "errors")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPK_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedScalarFieldContainer[int]
    batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    logits: Tensor
    topk_ids: Tensor
    topk_logprobs: Tensor
    tokens: _containers.RepeatedScalarFieldContainer[int]
    errors: _containers.RepeatedCompositeFieldContainer[StepError]
    def __init__(self, steps: _Optional[_Iterable[int]] = ..., batch_sizes: _Optional[_Iterable[int]] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., topk_ids: _Optional[_Union[Tensor, _Mapping]] = ..., topk_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., tokens: _Optional[_Iterable[int]] = ..., errors: _Optional[_Iterable[_Union[StepError, _Mapping]]] = ...) -> None: ...

class SessionStepResult(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: StepResponse
    error: StepError
    def __init__(self, response: _Optional[_Union[StepResponse, _Mapping]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("session_id", "code", "message", "index")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    code: int
    message: str
    index: int
    def __init__(self, session_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("tokens", "features")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    features: Tensor
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("logits",)
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    logits: Tensor
    def __init__(self, logits: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
