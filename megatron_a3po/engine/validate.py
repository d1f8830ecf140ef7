"""Input checks of the CPU engine's HTTP API: every body is parsed into its pydantic model before any
handler acts on it, so nothing reaches the scheduler (or the tokenizer) unchecked.

* One model per route (``ROUTE_MODELS``): ``GenerateRequest`` (with ``SamplingParams``) for /generate, and
  one per control route. Strict types ("no" is not a boolean, 7 is not a string, 2.0 is not an integer),
  no NaN/inf. A body that fails its model is an ``InvalidBody``, answered as SGLang 0.5.23 answers a
  request that fails its request model: HTTP 400 ``{"object": "error", "message", "type": "Bad Request",
  "param": null, "code": 400}``, the message naming every bad field. SGLang validates in pydantic's lax
  mode and then (for /generate) against its strict JSON contract; this engine is at least as strict.
* The engine's OpenAPI document (``/openapi.json``) takes each route's body schema from the same model
  (``body_schema``), so the fuzz test (tests/engine_fuzz.py) drives the real validator.
* What depends on the loaded model or the server's flags is checked after the parse, here and only
  here: ``admit`` (prompt counts, context length, vocabulary, ``n``; flags ``--max-n``,
  ``--max-batch-prompts``, ``--max-prompt-chars``, ``--context-length``) and ``check_tokenized``. Such a
  refusal is a ``BadRequest``: HTTP 400 ``{"error": {"message"}}``, as SGLang answers a ValueError raised
  while it admits a request (its context-length check, for one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      model_validator)

from megatron_a3po.engine.scheduler import Sampling


class ApiError(Exception):
    """Any answer but a success: HTTP ``status`` with the JSON ``body``. Raised anywhere below a route and
    answered by the app's one exception handler (engine/server.py)."""

    def __init__(self, status: int, body: dict, message: str | None = None):
        super().__init__(message if message is not None else body.get("message", ""))
        self.status, self.body = int(status), body


class ErrorReply(ApiError):
    """``{"error": {"message", "code"}}``: SGLang's answer to a ValueError raised while it admits a request,
    and to a request that fails inside the engine (an HTTP 5xx)."""

    def __init__(self, message: str, status: int = 400):
        status = int(status) if 400 <= int(status) <= 599 else 500
        super().__init__(status, {"error": {"message": message, "code": status}}, message)


class BadRequest(ErrorReply):
    """A request beyond a limit of the server or the loaded model (HTTP 400)."""

    def __init__(self, message: str):
        super().__init__(message, 400)


class InvalidBody(ApiError):
    """A body that failed its route's model: answered as SGLang 0.5.23 answers a request that fails its
    request model."""

    def __init__(self, message: str):
        super().__init__(400, {"object": "error", "message": message, "type": "Bad Request", "param": None,
                               "code": 400}, message)


class Refused(ApiError):
    """A weight or session route that did not do what it was asked: ``{"success": false, "message", ...}``,
    as SGLang's weight routes answer."""

    def __init__(self, message: str, status: int = 400, **extra):
        super().__init__(status, {"success": False, "message": message, **extra}, message)


@dataclass
class Limits:
    max_n: int = 64  # sampling_params.n
    max_batch_prompts: int = 256  # prompts in one request
    max_context: int | None = None  # prompt tokens must be fewer
    max_prompt_chars: int | None = None  # text prompts, checked before tokenising


# ------------------------------------------------------------------------------- types
class _Body(BaseModel):
    """A route's body: unknown keys are ignored, as SGLang 0.5.23 does (its request structs ignore extra
    keys; sglang-router adds several to /generate: background, log_metrics, model, ...)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


_ONE, _MANY = "one", "many"  # union tags: left out of the field names in error messages


def _one_or_many(one, many, is_many=lambda v: isinstance(v, list)):
    """``one`` or a list form ``many`` (a batch): a tagged union, so an error names the form that applies."""
    return Annotated[Annotated[one, Tag(_ONE)] | Annotated[many, Tag(_MANY)],
                     Discriminator(lambda v: _MANY if is_many(v) else _ONE)]


NonNegInt = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[NonNegInt], Field(min_length=1)]
Texts = _one_or_many(str, Annotated[list[str], Field(min_length=1)])
Strs = _one_or_many(str, list[str])
InputIds = _one_or_many(TokenIds, Annotated[list[TokenIds], Field(min_length=1)],
                        lambda v: isinstance(v, list) and bool(v) and isinstance(v[0], list))


def _only(*neutral):
    """A SGLang sampling key this engine does not implement: accepted at a neutral value only (the type is
    checked first, so ``False`` is never taken for 0)."""
    def check(v):
        if not any(v == n for n in neutral):
            raise ValueError(f"{v!r:.80} is not supported by the CPU engine (only {' or '.join(map(repr, neutral))})")
        return v
    return AfterValidator(check)


def _top_k(k: int) -> int:
    if k == 0:
        raise ValueError("top_k must be -1 (no limit) or >= 1")
    return k


class SamplingParams(BaseModel):
    """SGLang 0.5.23's sampling_params (any other key is a 400, as SGLang answers)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    max_new_tokens: NonNegInt | None = None
    min_new_tokens: NonNegInt | None = None
    n: Annotated[int, Field(ge=1)] | None = None  # at most --max-n: admit()
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1), AfterValidator(_top_k)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stop: Strs | None = None
    stop_token_ids: list[NonNegInt] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    sampling_seed: int | None = None  # taken modulo 2**63
    # known to SGLang, not implemented here: neutral values only
    frequency_penalty: Annotated[float, _only(0)] | None = None
    presence_penalty: Annotated[float, _only(0)] | None = None
    repetition_penalty: Annotated[float, _only(1)] | None = None
    spaces_between_special_tokens: Annotated[bool, _only(True)] | None = None
    stop_regex: Annotated[Strs, _only("", [])] | None = None
    logit_bias: Annotated[dict[str, float], _only({})] | None = None
    choice: Annotated[list[str], _only([])] | None = None
    json_schema: None = None
    regex: None = None
    ebnf: None = None
    structural_tag: None = None
    custom_params: None = None
    beam_width: None = None
    watermark: None = None
    stream_interval: None = None

    def sampling(self) -> tuple[Sampling, int]:
        """The scheduler's ``Sampling`` (defaults for what is unset) and ``n``."""
        sp = Sampling()
        for k in ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "ignore_eos",
                  "skip_special_tokens", "no_stop_trim", "stop_token_ids"):
            if getattr(self, k) is not None:
                setattr(sp, k, getattr(self, k))
        if self.stop is not None:
            sp.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.sampling_seed is not None:
            sp.seed = self.sampling_seed % (1 << 63)
        return sp, 1 if self.n is None else self.n


class ReplaySample(BaseModel):
    """engine/replay.py: one sample's weight versions, as (version, token count) spans, and its own cut."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    versions: list[Annotated[tuple[str | int, NonNegInt], Field(strict=False)]] = []  # a JSON array is a pair
    max_new_tokens: NonNegInt | None = None


class Replay(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    samples: list[ReplaySample]


class GenerateRequest(_Body):
    """The body of /generate: the keys of SGLang 0.5.23's GenerateReqInput this engine serves, and
    ``replay`` (engine/replay.py; not SGLang's)."""

    input_ids: InputIds | None = None
    text: Texts | None = None
    sampling_params: _one_or_many(SamplingParams, list[SamplingParams]) | None = None
    rid: Strs | None = None  # a list holds no null (as SGLang's contract)
    return_logprob: _one_or_many(bool, list[bool]) | None = None
    logprob_start_len: _one_or_many(int, list[int]) | None = None
    top_logprobs_num: _one_or_many(int, list[int]) | None = None
    stream: bool | None = None
    replay: Replay | None = None

    @property
    def single(self) -> bool:
        """One prompt (not a batch): the answer is one object."""
        return isinstance(self.text, str) if self.input_ids is None else not isinstance(self.input_ids[0], list)

    @property
    def prompts(self) -> list:
        """The prompts: token lists, or texts (``input_ids`` is None)."""
        p = self.text if self.input_ids is None else self.input_ids
        return [p] if self.single else list(p)

    @model_validator(mode="after")
    def _consistent(self):
        if self.stream:
            raise ValueError("stream=true is not supported by the CPU engine")
        if (self.input_ids is None) == (self.text is None):
            raise ValueError("give exactly one of input_ids or text")
        B = len(self.prompts)
        for k in ("sampling_params", "rid", "return_logprob"):
            v = getattr(self, k)
            if isinstance(v, list) and len(v) != B:
                raise ValueError(f"{k} has {len(v)} entries for {B} prompts")
        return self


# ------------------------------------------------------------------------------- runtime limits
@dataclass
class Admitted:
    """A parsed /generate request within the server's limits: per prompt its tokens (or text, before
    tokenising), Sampling and n, rid and return_logprob flag."""

    prompts: list
    is_text: bool
    single: bool
    sampling: list[tuple[Sampling, int]]
    rids: list[str] | list[None]
    return_logprob: list[bool]
    per_item_sampling: bool  # sampling_params was a list (one object per prompt)


def admit(req: GenerateRequest, vocab: int, limits: Limits) -> Admitted:
    """The checks of a parsed /generate body that depend on the loaded model or the server's flags.
    Raises BadRequest naming the field and the limit."""
    prompts, single, is_text = req.prompts, req.single, req.input_ids is None
    B = len(prompts)
    src = "text" if is_text else "input_ids"
    if B > limits.max_batch_prompts:
        raise BadRequest(f"{src} holds {B} prompts; at most {limits.max_batch_prompts} per request "
                         "(--max-batch-prompts)")
    for i, p in enumerate(prompts):
        name = src if single else f"{src}[{i}]"
        if is_text:
            if limits.max_prompt_chars is not None and len(p) > limits.max_prompt_chars:
                raise BadRequest(f"{name} has {len(p)} characters; at most {limits.max_prompt_chars} "
                                 "(--max-prompt-chars; the context length in tokens bounds it)")
            continue
        _check_context(p, name, limits)
        bad = [t for t in p if t >= vocab]
        if bad:
            raise BadRequest(f"{name} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    sps = req.sampling_params
    if isinstance(sps, list):
        parsed = [(sp or SamplingParams()).sampling() for sp in sps]
    else:
        parsed = [(sps or SamplingParams()).sampling()] * B
    for i, (_, n) in enumerate(parsed):
        if n > limits.max_n:
            where = "sampling_params" if not isinstance(sps, list) else f"sampling_params[{i}]"
            raise BadRequest(f"{where}.n={n}: at most {limits.max_n} (--max-n)")
    total = sum(n for _, n in parsed)
    if total > limits.max_batch_prompts * limits.max_n:
        raise BadRequest(f"the request asks for {total} sequences; at most {limits.max_batch_prompts * limits.max_n}")
    rid = req.rid
    if rid is None:
        rids = [None] * B
    elif isinstance(rid, str):  # a batch with one rid: SGLang names its samples <rid>_<i>
        rids = [rid] if single else [f"{rid}_{i}" for i in range(B)]
    else:
        rids = list(rid)
    lp = req.return_logprob
    ret_lp = list(lp) if isinstance(lp, list) else [bool(lp)] * B
    return Admitted(prompts, is_text, single, [(replace(sp), n) for sp, n in parsed], rids, ret_lp,
                    isinstance(sps, list))


def _check_context(tokens: list[int], name: str, limits: Limits) -> None:
    if limits.max_context is not None and len(tokens) >= limits.max_context:
        raise BadRequest(f"{name} has {len(tokens)} tokens; the context length is {limits.max_context}")


def check_tokenized(prompts: list[list[int]], single: bool, limits: Limits) -> None:
    """Text prompts after tokenising: none empty, each within the context length."""
    for i, p in enumerate(prompts):
        name = "text" if single else f"text[{i}]"
        if not p:
            raise BadRequest(f"{name} is empty after tokenising")
        _check_context(p, name, limits)


# ------------------------------------------------------------------------------- control routes
class PauseGeneration(_Body):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueGeneration(_Body):
    torch_empty_cache: bool = False


class AbortRequest(_Body):
    rid: str | None = None
    abort_all: bool = False


class UpdateWeightVersion(_Body):
    new_version: str
    abort_all_requests: bool = True


class UpdateWeightsFromDisk(_Body):
    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False


class InitWeightsUpdateGroup(_Body):
    master_address: str = Field(min_length=1)
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)
    world_size: int = Field(ge=2)
    group_name: str = Field(min_length=1)
    backend: str = "nccl"

    @model_validator(mode="after")
    def _rank_in_world(self):
        if self.rank_offset >= self.world_size:
            raise ValueError(f"rank_offset {self.rank_offset} must be below world_size {self.world_size}")
        return self


DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")


class UpdateWeightsFromDistributed(_Body):
    names: list[str]
    dtypes: list[Literal[DTYPES]]
    shapes: list[list[Annotated[int, Field(ge=0)]]]
    group_name: str
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    load_format: str | None = None

    @model_validator(mode="after")
    def _same_length(self):
        if not len(self.names) == len(self.dtypes) == len(self.shapes):
            raise ValueError(f"names, dtypes and shapes must have equal lengths, got {len(self.names)}, "
                             f"{len(self.dtypes)} and {len(self.shapes)}")
        return self


class DestroyWeightsUpdateGroup(_Body):
    group_name: str


class UpdateWeightsFromTensor(_Body):
    serialized_named_tensors: list[str] = []
    load_format: str | None = None
    flush_cache: bool = True
    weight_version: str | None = None


class BeginWeightUpdate(_Body):
    selector: Literal["target", "draft", "all"] = "all"


class EndWeightUpdate(_Body):
    pass


class SlowDown(_Body):
    forward_sleep_time: float | None = Field(None, ge=0, le=10)


ROUTE_MODELS: dict[str, type[BaseModel]] = {
    "/generate": GenerateRequest,
    "/pause_generation": PauseGeneration, "/continue_generation": ContinueGeneration,
    "/abort_request": AbortRequest, "/update_weight_version": UpdateWeightVersion,
    "/update_weights_from_disk": UpdateWeightsFromDisk, "/init_weights_update_group": InitWeightsUpdateGroup,
    "/update_weights_from_distributed": UpdateWeightsFromDistributed,
    "/destroy_weights_update_group": DestroyWeightsUpdateGroup, "/update_weights_from_tensor": UpdateWeightsFromTensor,
    "/begin_weight_update": BeginWeightUpdate, "/end_weight_update": EndWeightUpdate, "/slow_down": SlowDown,
}


def parse_body(route: str, body: Any) -> BaseModel:
    """``body`` (parsed JSON; None for an empty body) checked against ``route``'s model (``ROUTE_MODELS``).
    Raises ``InvalidBody`` naming every bad field."""
    model = ROUTE_MODELS[route]
    try:
        return model.model_validate({} if body is None else body)
    except ValidationError as e:
        raise InvalidBody(f"{route}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: dict) -> str:
    loc = ".".join(str(x) for x in err["loc"] if x not in (_ONE, _MANY)) or "body"
    got = "" if err["type"] == "missing" or isinstance(err["input"], dict) else f" (got {err['input']!r:.60})"
    return f"{loc}: {err['msg']}{got}"


def body_schema(route: str) -> dict:
    """The JSON schema of ``route``'s body: its model's, with nested models inlined (the OpenAPI
    document has no place for the model's own ``$defs``) and without ``default: null`` (which the
    document leaves out)."""
    schema = ROUTE_MODELS[route].model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(x):
        if isinstance(x, dict):
            if "$ref" in x:
                return inline(defs[x["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in x.items() if not (k == "default" and v is None)}
        return [inline(v) for v in x] if isinstance(x, list) else x
    return inline(schema)
