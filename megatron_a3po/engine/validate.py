"""Input checks of the CPU engine's HTTP API: every field's type and range, before admission.

A bad request is a ``BadRequest`` (HTTP 400, ``{"error": {"message": ...}}``) whose message names the
field; nothing reaches the scheduler (or the tokenizer) unchecked. Limits a client cannot exceed are
``Limits`` (engine flags ``--max-n``, ``--max-batch-prompts``, ``--max-prompt-chars``, the context length).
The control routes' bodies are pydantic models (``CONTROL_MODELS``, one per route: strict types, no
NaN/inf); the same models give their schemas in the engine's OpenAPI document (``/openapi.json``), which
the fuzz test drives. A control body that fails its model is answered as SGLang answers one (HTTP 400,
``{"object": "error", "message", "type": "Bad Request", "param": null, "code": 400}``) and nothing is stored.
The handlers parse the raw body themselves, so a malformed body is a 400 like SGLang's, not FastAPI's 422.
The /generate checks are still hand-written here (``check_generate``), with the JSON schema beside them that
describes its body in the OpenAPI document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from megatron_a3po.engine.scheduler import Sampling


class BadRequest(ValueError):
    pass


@dataclass
class Limits:
    max_n: int = 64  # sampling_params.n
    max_batch_prompts: int = 256  # prompts in one request
    max_context: int | None = None  # prompt tokens must be fewer
    max_prompt_chars: int | None = None  # text prompts, checked before tokenising


# SGLang 0.5.23 SamplingParams keys (any other key -> HTTP 400, as SGLang does).
SAMPLING_KEYS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width",
    "watermark", "choice",
}
# known keys this engine does not implement: accepted only at their neutral value
_NEUTRAL = {
    "stop_regex": (None, [], ""), "frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None),
    "repetition_penalty": (1, 1.0, None), "json_schema": (None,), "regex": (None,), "ebnf": (None,),
    "structural_tag": (None,), "logit_bias": (None, {}), "custom_params": (None,), "beam_width": (None,),
    "watermark": (None,), "choice": (None, []), "stream_interval": (None,),
    "spaces_between_special_tokens": (None, True),
}
_SEED_MOD = 1 << 63


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(v, name, lo=None, hi=None):
    if not _is_int(v):
        raise BadRequest(f"{name} must be an integer, got {v!r:.80}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise BadRequest(f"{name} must be {rng}, got {v}")
    return v


def _num(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"{name} must be a number, got {v!r:.80}")
    if not math.isfinite(v):
        raise BadRequest(f"{name} must be a finite number, got {v}")
    return float(v)


def _strs(v, name) -> list[str]:
    vals = [v] if isinstance(v, str) else v
    if not isinstance(vals, list) or not all(isinstance(x, str) for x in vals):
        raise BadRequest(f"{name} must be a string or a list of strings, got {v!r:.80}")
    return list(vals)


def _neutral_ok(v, ok) -> bool:
    try:
        return v in ok
    except TypeError:  # unhashable / incomparable: not a neutral value
        return False


def parse_sampling(d, limits: Limits | None = None, where: str = "sampling_params") -> tuple[Sampling, int]:
    """Validate a sampling_params object; returns (Sampling, n). Raises BadRequest naming the key."""
    limits = limits or Limits()
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise BadRequest(f"{where} must be an object, got {d!r:.80}")
    unknown = sorted(set(d) - SAMPLING_KEYS)
    if unknown:
        raise BadRequest(f"unknown field `{unknown[0]}` in {where} (SGLang rejects unknown keys)")
    for k, ok in _NEUTRAL.items():
        if k in d and not _neutral_ok(d[k], ok):
            raise BadRequest(f"{where}.{k}={d[k]!r:.80} is not supported by the CPU engine")
    sp = Sampling()
    f = lambda k: f"{where}.{k}"  # noqa: E731
    if d.get("max_new_tokens") is not None:
        sp.max_new_tokens = _int(d["max_new_tokens"], f("max_new_tokens"), 0)
    if d.get("temperature") is not None:
        sp.temperature = _num(d["temperature"], f("temperature"))
        if sp.temperature < 0:
            raise BadRequest(f"{f('temperature')} must be >= 0, got {sp.temperature}")
    if d.get("top_p") is not None:
        sp.top_p = _num(d["top_p"], f("top_p"))
        if not 0 < sp.top_p <= 1:
            raise BadRequest(f"{f('top_p')} must be in (0, 1], got {sp.top_p}")
    if d.get("top_k") is not None:
        sp.top_k = _int(d["top_k"], f("top_k"), -1)
        if sp.top_k == 0:
            raise BadRequest(f"{f('top_k')} must be -1 or >= 1, got 0")
    if d.get("min_p") is not None:
        sp.min_p = _num(d["min_p"], f("min_p"))
        if not 0 <= sp.min_p <= 1:
            raise BadRequest(f"{f('min_p')} must be in [0, 1], got {sp.min_p}")
    if d.get("min_new_tokens") is not None:
        sp.min_new_tokens = _int(d["min_new_tokens"], f("min_new_tokens"), 0)
    if d.get("stop") is not None:
        sp.stop = _strs(d["stop"], f("stop"))
    if d.get("stop_token_ids") is not None:
        ids = d["stop_token_ids"]
        if not isinstance(ids, list):
            raise BadRequest(f"{f('stop_token_ids')} must be a list of integers, got {ids!r:.80}")
        sp.stop_token_ids = [_int(x, f("stop_token_ids"), 0) for x in ids]
    for k in ("ignore_eos", "skip_special_tokens", "no_stop_trim"):
        if d.get(k) is not None:
            if not isinstance(d[k], bool):
                raise BadRequest(f"{f(k)} must be a boolean, got {d[k]!r:.80}")
            setattr(sp, k, d[k])
    if d.get("sampling_seed") is not None:
        sp.seed = _int(d["sampling_seed"], f("sampling_seed")) % _SEED_MOD
    n = d.get("n", 1)
    n = 1 if n is None else _int(n, f("n"), 1, limits.max_n)
    return sp, n


def _token_lists(ids, vocab: int, limits: Limits) -> tuple[list[list[int]], bool]:
    if not isinstance(ids, list) or not ids:
        raise BadRequest("input_ids must be a non-empty list of ints or a list of such lists")
    single = not isinstance(ids[0], list)
    prompts = [ids] if single else ids
    if len(prompts) > limits.max_batch_prompts:
        raise BadRequest(f"input_ids holds {len(prompts)} prompts; at most {limits.max_batch_prompts} per request "
                         "(--max-batch-prompts)")
    for i, p in enumerate(prompts):
        name = "input_ids" if single else f"input_ids[{i}]"
        if not isinstance(p, list) or not p:
            raise BadRequest(f"{name} must be a non-empty list of ints")
        if limits.max_context is not None and len(p) >= limits.max_context:
            raise BadRequest(f"{name} has {len(p)} tokens; the context length is {limits.max_context}")
        if not all(_is_int(t) for t in p):
            raise BadRequest(f"{name} must be a list of ints")
        bad = [t for t in p if t < 0 or t >= vocab]
        if bad:
            raise BadRequest(f"{name} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    return prompts, single


def check_texts(text, limits: Limits) -> tuple[list[str], bool]:
    """Type and raw length of ``text`` (before any tokenising)."""
    single = isinstance(text, str)
    texts = [text] if single else text
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest(f"text must be a string or a non-empty list of strings, got {text!r:.80}")
    if len(texts) > limits.max_batch_prompts:
        raise BadRequest(f"text holds {len(texts)} prompts; at most {limits.max_batch_prompts} per request "
                         "(--max-batch-prompts)")
    if limits.max_prompt_chars is not None:
        for i, t in enumerate(texts):
            if len(t) > limits.max_prompt_chars:
                name = "text" if single else f"text[{i}]"
                raise BadRequest(f"{name} has {len(t)} characters; at most {limits.max_prompt_chars} "
                                 "(--max-prompt-chars; the context length in tokens bounds it)")
    return texts, single


def check_generate(body, vocab: int, limits: Limits):
    """Everything of a /generate body except tokenising ``text``. Returns (input: token lists or texts,
    is_text, single, parsed sampling params per prompt, rids, return_logprob flags)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if body.get("stream") not in (None, False):
        if not isinstance(body["stream"], bool):
            raise BadRequest(f"stream must be a boolean, got {body['stream']!r:.80}")
        raise BadRequest("stream=true is not supported by the CPU engine")
    ids, text = body.get("input_ids"), body.get("text")
    if ids is None and text is None:
        raise BadRequest("one of input_ids or text is required")
    if ids is not None and text is not None:
        raise BadRequest("give either input_ids or text, not both")
    if ids is not None:
        prompts, single = _token_lists(ids, vocab, limits)
    else:
        prompts, single = check_texts(text, limits)
    B = len(prompts)
    sps = body.get("sampling_params")
    if isinstance(sps, list):
        if len(sps) != B:
            raise BadRequest(f"sampling_params has {len(sps)} entries for {B} prompts")
        parsed = [parse_sampling(s, limits, f"sampling_params[{i}]") for i, s in enumerate(sps)]
    else:
        parsed = [parse_sampling(sps, limits) for _ in range(B)]
    total = sum(n for _, n in parsed)
    if total > limits.max_batch_prompts * limits.max_n:
        raise BadRequest(f"the request asks for {total} sequences; at most {limits.max_batch_prompts * limits.max_n}")
    rid = body.get("rid")
    if rid is None:
        rids = [None] * B
    elif isinstance(rid, str):  # a batch with one rid: SGLang names its samples <rid>_<i>
        rids = [rid] if single else [f"{rid}_{i}" for i in range(B)]
    elif isinstance(rid, list) and all(isinstance(r, str) or r is None for r in rid):
        rids = rid
    else:
        raise BadRequest(f"rid must be a string or a list of strings, got {rid!r:.80}")
    if rids is None or len(rids) != B:
        raise BadRequest(f"rid has {1 if isinstance(rid, str) else len(rid)} entries for {B} prompts")
    lp = body.get("return_logprob")
    if lp is None or isinstance(lp, bool):
        ret_lp = [bool(lp)] * B
    elif isinstance(lp, list) and len(lp) == B and all(isinstance(x, bool) for x in lp):
        ret_lp = lp
    else:
        raise BadRequest(f"return_logprob must be a boolean or a list of {B} booleans, got {lp!r:.80}")
    for k in ("logprob_start_len", "top_logprobs_num"):
        v = body.get(k)
        if v is not None and not (_is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v))):
            raise BadRequest(f"{k} must be an integer, got {v!r:.80}")
    return prompts, ids is None, single, parsed, rids, ret_lp


def body_object(body, route: str) -> dict:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest(f"{route}: the request body must be a JSON object, got {type(body).__name__}")
    return body


# ------------------------------------------------------------------------------- OpenAPI documents
_INT, _NUM, _BOOL, _STR = {"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "string"}
_STRS = {"anyOf": [_STR, {"type": "array", "items": _STR}]}
SAMPLING_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "max_new_tokens": _INT, "temperature": _NUM, "top_p": _NUM, "top_k": _INT, "min_p": _NUM,
        "min_new_tokens": _INT, "n": _INT, "stop": _STRS, "stop_token_ids": {"type": "array", "items": _INT},
        "ignore_eos": _BOOL, "skip_special_tokens": _BOOL, "no_stop_trim": _BOOL, "sampling_seed": _INT,
    },
}
_IDS = {"type": "array", "items": _INT}
GENERATE_SCHEMA = {
    "type": "object",
    "properties": {
        "input_ids": {"anyOf": [_IDS, {"type": "array", "items": _IDS}]},
        "text": _STRS,
        "sampling_params": {"anyOf": [SAMPLING_SCHEMA, {"type": "array", "items": SAMPLING_SCHEMA}]},
        "return_logprob": {"anyOf": [_BOOL, {"type": "array", "items": _BOOL}]},
        "rid": _STRS, "logprob_start_len": _INT, "top_logprobs_num": _INT, "stream": _BOOL,
    },
}


# ------------------------------------------------------------------------------- control routes
# One pydantic model per control route: the route's body is validated with it before anything is stored
# (strict types: "no" is not a boolean, 7 is not a string; no NaN/inf), and its OpenAPI schema is the
# model's. Unknown keys are ignored, as SGLang 0.5.23 does (its request structs ignore extra keys; they
# validate in pydantic's lax mode, so this engine is the stricter of the two).
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


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


CONTROL_MODELS: dict[str, type[_Body]] = {
    "/pause_generation": PauseGeneration, "/continue_generation": ContinueGeneration,
    "/abort_request": AbortRequest, "/update_weight_version": UpdateWeightVersion,
    "/update_weights_from_disk": UpdateWeightsFromDisk, "/init_weights_update_group": InitWeightsUpdateGroup,
    "/update_weights_from_distributed": UpdateWeightsFromDistributed,
    "/destroy_weights_update_group": DestroyWeightsUpdateGroup, "/update_weights_from_tensor": UpdateWeightsFromTensor,
    "/begin_weight_update": BeginWeightUpdate, "/end_weight_update": EndWeightUpdate, "/slow_down": SlowDown,
}


class InvalidBody(BadRequest):
    """A control route's body failed its model: answered as SGLang answers a request that fails its
    validation (HTTP 400, ``{"object": "error", "message", "type": "Bad Request", "param": null,
    "code": 400}``), the message naming each field."""


def control_body(route: str, body: dict) -> dict:
    """``body`` checked against ``route``'s model (``CONTROL_MODELS``), with its defaults filled in; a
    route without a model gets ``body`` as it is. Raises ``InvalidBody`` naming every bad field."""
    model = CONTROL_MODELS.get(route)
    if model is None:
        return body
    try:
        return model.model_validate(body).model_dump()
    except ValidationError as e:
        parts = [f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']} (got {err['input']!r:.60})"
                 for err in e.errors()]
        raise InvalidBody(f"{route}: " + "; ".join(parts)) from None


def control_schema(route: str) -> dict:
    """The OpenAPI schema of ``route``'s body: its model's JSON schema (any object for a route without one)."""
    model = CONTROL_MODELS.get(route)
    return model.model_json_schema() if model is not None else {"type": "object"}


def openapi_body(schema: dict, required: bool = False) -> dict:
    """``openapi_extra`` for a route that parses its raw JSON body itself."""
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}
