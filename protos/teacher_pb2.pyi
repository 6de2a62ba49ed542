from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    BF16: _ClassVar[DType]
    FP16: _ClassVar[DType]
    FP32: _ClassVar[DType]
    INT32: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
BF16: DType
FP16: DType
FP32: DType
INT32: DType

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    sha256: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class TensorPart(_message.Message):
    __slots__ = ("name", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PackedTokens(_message.Message):
    __slots__ = ("ids", "lengths")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    ids: bytes
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[bytes] = ..., lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TeacherInfo(_message.Message):
    __slots__ = ("protocol_version", "server_version", "capabilities", "model_id", "revision", "fingerprint", "compute_dtype", "hidden_size", "num_layers", "lm_head_rows", "tokenizer_size", "lm_head_has_bias", "logit_scale", "final_logit_softcap", "bos_id", "eos_id", "pad_id", "max_seq_len", "max_batch_tokens", "max_top_k", "max_response_bytes", "max_message_bytes", "part_bytes", "tokenizer_fingerprint", "replica_id", "max_new_tokens")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LM_HEAD_ROWS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SIZE_FIELD_NUMBER: _ClassVar[int]
    LM_HEAD_HAS_BIAS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOGIT_SOFTCAP_FIELD_NUMBER: _ClassVar[int]
    BOS_ID_FIELD_NUMBER: _ClassVar[int]
    EOS_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PART_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: str
    server_version: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    model_id: str
    revision: str
    fingerprint: str
    compute_dtype: DType
    hidden_size: int
    num_layers: int
    lm_head_rows: int
    tokenizer_size: int
    lm_head_has_bias: bool
    logit_scale: float
    final_logit_softcap: float
    bos_id: int
    eos_id: int
    pad_id: int
    max_seq_len: int
    max_batch_tokens: int
    max_top_k: int
    max_response_bytes: int
    max_message_bytes: int
    part_bytes: int
    tokenizer_fingerprint: str
    replica_id: str
    max_new_tokens: int
    def __init__(self, protocol_version: _Optional[str] = ..., server_version: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., model_id: _Optional[str] = ..., revision: _Optional[str] = ..., fingerprint: _Optional[str] = ..., compute_dtype: _Optional[_Union[DType, str]] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., lm_head_rows: _Optional[int] = ..., tokenizer_size: _Optional[int] = ..., lm_head_has_bias: _Optional[bool] = ..., logit_scale: _Optional[float] = ..., final_logit_softcap: _Optional[float] = ..., bos_id: _Optional[int] = ..., eos_id: _Optional[int] = ..., pad_id: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_top_k: _Optional[int] = ..., max_response_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., part_bytes: _Optional[int] = ..., tokenizer_fingerprint: _Optional[str] = ..., replica_id: _Optional[str] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class FetchTokenizerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("path", "offset", "data", "total", "sha256", "last")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    data: bytes
    total: int
    sha256: bytes
    last: bool
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total: _Optional[int] = ..., sha256: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class FetchHeadRequest(_message.Message):
    __slots__ = ("dtype",)
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class HeadHeader(_message.Message):
    __slots__ = ("fingerprint", "tensors", "scale", "softcap")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SOFTCAP_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    scale: float
    softcap: float
    def __init__(self, fingerprint: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., scale: _Optional[float] = ..., softcap: _Optional[float] = ...) -> None: ...

class HeadPart(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: HeadHeader
    tensor: TensorPart
    def __init__(self, header: _Optional[_Union[HeadHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorPart, _Mapping]] = ...) -> None: ...

class OutputSpec(_message.Message):
    __slots__ = ("hidden_states", "top_k", "logits", "wire_dtype")
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    hidden_states: bool
    top_k: int
    logits: bool
    wire_dtype: DType
    def __init__(self, hidden_states: _Optional[bool] = ..., top_k: _Optional[int] = ..., logits: _Optional[bool] = ..., wire_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "tokens", "positions", "position_counts", "outputs", "expected_fingerprint")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    POSITION_COUNTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tokens: PackedTokens
    positions: bytes
    position_counts: _containers.RepeatedScalarFieldContainer[int]
    outputs: OutputSpec
    expected_fingerprint: str
    def __init__(self, request_id: _Optional[str] = ..., tokens: _Optional[_Union[PackedTokens, _Mapping]] = ..., positions: _Optional[bytes] = ..., position_counts: _Optional[_Iterable[int]] = ..., outputs: _Optional[_Union[OutputSpec, _Mapping]] = ..., expected_fingerprint: _Optional[str] = ...) -> None: ...

class ScoreHeader(_message.Message):
    __slots__ = ("request_id", "fingerprint", "replica_id", "tensors", "rows_per_sequence")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    fingerprint: str
    replica_id: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    rows_per_sequence: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., replica_id: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., rows_per_sequence: _Optional[_Iterable[int]] = ...) -> None: ...

class ScoreTrailer(_message.Message):
    __slots__ = ("queue_ns", "forward_ns", "encode_ns", "num_tokens", "batch_requests", "batch_tokens")
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_NS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    queue_ns: int
    forward_ns: int
    encode_ns: int
    num_tokens: int
    batch_requests: int
    batch_tokens: int
    def __init__(self, queue_ns: _Optional[int] = ..., forward_ns: _Optional[int] = ..., encode_ns: _Optional[int] = ..., num_tokens: _Optional[int] = ..., batch_requests: _Optional[int] = ..., batch_tokens: _Optional[int] = ...) -> None: ...

class ScorePart(_message.Message):
    __slots__ = ("header", "tensor", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: ScoreHeader
    tensor: TensorPart
    trailer: ScoreTrailer
    def __init__(self, header: _Optional[_Union[ScoreHeader, _Mapping]] = ..., tensor: _Optional[_Union[TensorPart, _Mapping]] = ..., trailer: _Optional[_Union[ScoreTrailer, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompts", "max_new_tokens", "temperature", "top_p", "seed", "expected_fingerprint")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompts: PackedTokens
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    expected_fingerprint: str
    def __init__(self, request_id: _Optional[str] = ..., prompts: _Optional[_Union[PackedTokens, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., expected_fingerprint: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "fingerprint", "tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    fingerprint: str
    tokens: PackedTokens
    def __init__(self, request_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., tokens: _Optional[_Union[PackedTokens, _Mapping]] = ...) -> None: ...
