"""HTTP front end of the CPU engine: the subset of SGLang's native API an RL trainer uses.

Request/response shapes follow SGLang 0.5.23 (the facts are in the project's SGLang API notes and the
contract tests in tests/test_engine_contract.py). Differences from SGLang, all deliberate:

* CPU only, HF transformers forward, one KV cache per sequence, no prefix cache (cached_tokens = 0);
* no streaming, no text-in-logprobs, no penalties / grammars / logit bias (HTTP 400 if set to
  non-default values);
* ``/pause_generation`` mode ``retract`` behaves like ``in_place`` (requests keep their KV caches and
  resume on ``/continue_generation``); ``abort`` ends running and queued requests with finish_reason
  ``abort`` and their partial output;
* ``meta_info.weight_versions`` is always present when a request produced tokens (one span when the
  version did not change);
* test hooks (only with ``--enable-test-hooks``): ``POST /debug/fault`` to make /generate and /health
  return 503 or hang for N seconds, or to fail the next K weight updates; ``GET /debug/version_log``
  returns which version produced each token of the recent requests (also written to
  ``--version-log FILE`` as jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from megatron_a3po.engine.scheduler import Sampling, Scheduler, Seq

log = logging.getLogger("megatron_a3po.engine")

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
GENERATE_KEYS = {
    "rid", "text", "input_ids", "stream", "sampling_params", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "token_ids_logprob", "return_text_in_logprobs", "return_hidden_states",
    "custom_logit_processor", "priority", "extra_key", "cache_salt", "return_prompt_token_ids",
    "lora_path", "routing_key", "custom_labels",
}


class BadRequest(ValueError):
    pass


def _int(v, name):
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"sampling_params.{name} must be an integer, got {v!r}")
    return v


def _num(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"sampling_params.{name} must be a number, got {v!r}")
    return float(v)


def parse_sampling(d: dict | None) -> tuple[Sampling, int]:
    """Validate a sampling_params object; returns (Sampling, n). Raises BadRequest naming the key."""
    d = dict(d or {})
    if not isinstance(d, dict):
        raise BadRequest("sampling_params must be an object")
    unknown = sorted(set(d) - SAMPLING_KEYS)
    if unknown:
        raise BadRequest(f"unknown field `{unknown[0]}` in sampling_params (SGLang rejects unknown keys)")
    for k, ok in _NEUTRAL.items():
        if k in d and d[k] not in ok:
            raise BadRequest(f"sampling_params.{k}={d[k]!r} is not supported by the CPU engine")
    sp = Sampling()
    if d.get("max_new_tokens") is not None:
        sp.max_new_tokens = _int(d["max_new_tokens"], "max_new_tokens")
        if sp.max_new_tokens < 0:
            raise BadRequest(f"sampling_params.max_new_tokens must be >= 0, got {sp.max_new_tokens}")
    if d.get("temperature") is not None:
        sp.temperature = _num(d["temperature"], "temperature")
        if sp.temperature < 0:
            raise BadRequest(f"sampling_params.temperature must be >= 0, got {sp.temperature}")
    if d.get("top_p") is not None:
        sp.top_p = _num(d["top_p"], "top_p")
        if not 0 < sp.top_p <= 1:
            raise BadRequest(f"sampling_params.top_p must be in (0, 1], got {sp.top_p}")
    if d.get("top_k") is not None:
        sp.top_k = _int(d["top_k"], "top_k")
        if sp.top_k == 0 or sp.top_k < -1:
            raise BadRequest(f"sampling_params.top_k must be -1 or >= 1, got {sp.top_k}")
    if d.get("min_p") is not None:
        sp.min_p = _num(d["min_p"], "min_p")
        if not 0 <= sp.min_p <= 1:
            raise BadRequest(f"sampling_params.min_p must be in [0, 1], got {sp.min_p}")
    if d.get("min_new_tokens") is not None:
        sp.min_new_tokens = _int(d["min_new_tokens"], "min_new_tokens")
    stop = d.get("stop")
    if stop is not None:
        sp.stop = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(x, str) for x in sp.stop):
            raise BadRequest(f"sampling_params.stop must be a string or list of strings, got {stop!r}")
    if d.get("stop_token_ids") is not None:
        sp.stop_token_ids = [_int(x, "stop_token_ids") for x in d["stop_token_ids"]]
    for k in ("ignore_eos", "skip_special_tokens", "no_stop_trim"):
        if d.get(k) is not None:
            if not isinstance(d[k], bool):
                raise BadRequest(f"sampling_params.{k} must be a boolean, got {d[k]!r}")
            setattr(sp, k, d[k])
    if d.get("sampling_seed") is not None:
        sp.seed = _int(d["sampling_seed"], "sampling_seed")
    n = d.get("n", 1)
    n = 1 if n is None else _int(n, "n")
    if n < 1:
        raise BadRequest(f"sampling_params.n must be >= 1, got {n}")
    return sp, n


def load_model(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model path {path!r} is not a directory")
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=getattr(torch, dtype))
    model.eval()
    return model


class Engine:
    """Glue between the HTTP handlers (asyncio) and the scheduler thread."""

    def __init__(self, args):
        self.args = args
        self.model_path = args.model_path
        model = load_model(args.model_path, args.dtype)
        self.tokenizer = None
        if not args.skip_tokenizer_init:
            try:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path)
            except Exception as e:  # noqa: BLE001
                log.warning("no tokenizer loaded (%s): responses will have empty text", e)
        cfg = model.config
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(cfg, "eos_token_id", None)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.max_context = args.context_length or getattr(cfg, "max_position_embeddings", None)
        self.sched = Scheduler(model, weight_version=args.weight_version, eos_ids=eos_ids,
                               tokenizer=self.tokenizer, max_context=self.max_context,
                               version_log=args.version_log, seed=args.random_seed)
        self.update_lock = threading.Lock()
        self.fault: dict[str, Any] = {}
        self.groups: dict[str, Any] = {}  # weight-update process groups by name
        self.started = time.time()
        self.sched.start()

    # ---- fault hooks (test only)
    def fault_active(self, kind: str) -> bool:
        f = self.fault.get(kind)
        return f is not None and time.time() < f

    def take_update_failure(self) -> bool:
        n = self.fault.get("fail_update", 0)
        if n > 0:
            self.fault["fail_update"] = n - 1
            return True
        return False

    # ---- generate
    async def generate(self, body: dict) -> Any:
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        unknown = sorted(set(body) - GENERATE_KEYS)
        if unknown:
            raise BadRequest(f"unknown field `{unknown[0]}` in /generate request")
        if body.get("stream"):
            raise BadRequest("stream=true is not supported by the CPU engine")
        ids = body.get("input_ids")
        text = body.get("text")
        if ids is None and text is None:
            raise BadRequest("one of input_ids or text is required")
        if ids is not None and text is not None:
            raise BadRequest("give either input_ids or text, not both")
        if ids is None:
            if self.tokenizer is None:
                raise BadRequest("text input needs a tokenizer (server started with --skip-tokenizer-init)")
            single = isinstance(text, str)
            texts = [text] if single else list(text)
            prompts = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        else:
            if not isinstance(ids, list) or not ids:
                raise BadRequest("input_ids must be a non-empty list of ints or a list of such lists")
            single = not isinstance(ids[0], list)
            prompts = [ids] if single else ids
            vocab = self.sched.model.config.vocab_size
            for i, p in enumerate(prompts):
                if not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                    raise BadRequest(f"input_ids[{i}] must be a non-empty list of ints")
                bad = [t for t in p if t < 0 or t >= vocab]
                if bad:
                    raise BadRequest(f"input_ids[{i}] has token id {bad[0]} outside the vocabulary [0, {vocab})")
        B = len(prompts)
        sps = body.get("sampling_params")
        sps = sps if isinstance(sps, list) else [sps] * B
        if len(sps) != B:
            raise BadRequest(f"sampling_params has {len(sps)} entries for {B} prompts")
        parsed = [parse_sampling(s) for s in sps]
        for i, p in enumerate(prompts):
            if self.max_context is not None and len(p) >= self.max_context:
                raise BadRequest(f"input_ids[{i}] has {len(p)} tokens; the context length is {self.max_context}")
        rid = body.get("rid")
        rids = [rid] if isinstance(rid, str) else (list(rid) if isinstance(rid, list) else [None] * B)
        if len(rids) != B:
            raise BadRequest(f"rid has {len(rids)} entries for {B} prompts")
        rids = [r if r is not None else uuid.uuid4().hex for r in rids]
        ret_lp = body.get("return_logprob")
        ret_lp = ret_lp if isinstance(ret_lp, list) else [bool(ret_lp)] * B

        if self.fault_active("hang"):
            await asyncio.sleep(max(0.0, self.fault["hang"] - time.time()))

        loop = asyncio.get_running_loop()
        futs, seqs, meta = [], [], []
        for i, (p, (sp, n)) in enumerate(zip(prompts, parsed)):
            for j in range(n):
                fut = loop.create_future()

                def done(s, fut=fut):
                    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(s))

                gen = None
                if sp.seed is not None:
                    gen = torch.Generator().manual_seed(sp.seed * 1000003 + j)
                seq = Seq(rid=rids[i] if n == 1 else f"{rids[i]}_{j}", prompt=list(p), sp=sp, on_done=done,
                          gen=gen)
                futs.append(fut)
                seqs.append(seq)
                meta.append((i, bool(ret_lp[i])))
        for s in seqs:
            if s.sp.max_new_tokens == 0:
                s.finish = {"type": "length", "length": 0}
                s.versions = []
                futs[seqs.index(s)].set_result(s)
            else:
                self.sched.submit(s)
        try:
            done_seqs = await asyncio.gather(*futs)
        except asyncio.CancelledError:  # client went away: abort its sequences
            for s in seqs:
                self.sched._commands.put(("abort", (s.rid, "client disconnected"), threading.Event(), {}))
            raise
        outs = [self._response(s, lp) for s, (_, lp) in zip(done_seqs, meta)]
        return outs[0] if single and len(outs) == 1 else outs

    def _response(self, s: Seq, with_lp: bool) -> dict:
        out = list(s.output)
        if s.finish and s.finish.get("type") == "stop" and not s.sp.no_stop_trim and isinstance(
                s.finish.get("matched"), int) and out and out[-1] == s.finish["matched"]:
            text_ids = out[:-1]
        else:
            text_ids = out
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(text_ids, skip_special_tokens=s.sp.skip_special_tokens)
        spans: list[dict] = []
        for k, v in enumerate(s.versions):
            if spans and spans[-1]["version"] == v:
                spans[-1]["end"] = k + 1
            else:
                spans.append({"version": v, "start": k, "end": k + 1})
        meta = {
            "id": s.rid,
            "finish_reason": s.finish,
            "prompt_tokens": len(s.prompt),
            "completion_tokens": len(out),
            "cached_tokens": 0,
            "weight_version": s.versions[-1] if s.versions else self.sched.weight_version,
            "e2e_latency": time.time() - s.created,
        }
        if spans:
            meta["weight_versions"] = spans
        if with_lp:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(s.logprobs, out)]
        return {"text": text, "output_ids": out, "meta_info": meta}

    # ---- weights
    def update_from_disk(self, body: dict) -> tuple[int, dict]:
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            return 400, {"success": False, "message": "model_path (a string) is required", "num_paused_requests": 0}
        lf = body.get("load_format")
        if lf not in (None, "auto", "safetensors", "pt"):
            return 400, {"success": False, "message": f"load_format={lf!r} is not supported by the CPU engine",
                         "num_paused_requests": 0}
        with self.update_lock:
            if self.take_update_failure():
                return 400, {"success": False, "message": "injected weight-update failure (test hook)",
                             "num_paused_requests": 0}
            try:
                sd = self._read_same_arch(path)
                model = load_model(path, self.args.dtype) if sd is None else None
            except Exception as e:  # noqa: BLE001
                return 400, {"success": False, "message": f"failed to load weights from {path!r}: {e}",
                             "num_paused_requests": 0}
            version = None if body.get("weight_version") is None else str(body["weight_version"])
            abort_all = bool(body.get("abort_all_requests", False))
            if sd is not None:  # same architecture: copied into the served model in place, between steps
                n = self.sched.command("load", list(sd.items()), version, abort_all)
            else:
                old_shapes = {k: tuple(v.shape) for k, v in self.sched.model.state_dict().items()}
                new_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
                if type(model) is not type(self.sched.model) or old_shapes != new_shapes:
                    diff = sorted(set(old_shapes.items()) ^ set(new_shapes.items()))[:3]
                    return 400, {"success": False, "message": f"{path!r} does not match the served model's "
                                 f"architecture ({type(model).__name__} vs {type(self.sched.model).__name__}; "
                                 f"differing params: {diff})", "num_paused_requests": 0}
                n = self.sched.command("swap", model, version, abort_all)
            self.model_path = path
        return 200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": n}


    def _read_same_arch(self, path: str) -> dict | None:
        """Fast path: same architecture (config.json) and safetensors files -> the new tensors, checked
        against the served model's parameter names and shapes (nothing is changed here). None if the fast
        path does not apply."""
        import json

        p = Path(path)
        files = sorted(p.glob("*.safetensors"))
        cfg_file = p / "config.json"
        if not files or not cfg_file.exists():
            return None
        new_cfg = json.loads(cfg_file.read_text())
        old_cfg = self.sched.model.config.to_dict()
        keys = ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "intermediate_size", "tie_word_embeddings")
        if any(new_cfg.get(k) != old_cfg.get(k) for k in keys):
            return None
        from safetensors.torch import load_file

        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
        params = dict(self.sched.model.named_parameters())  # tied weights appear once
        tied = {"lm_head.weight"} if old_cfg.get("tie_word_embeddings") else set()
        sd = {k: v for k, v in sd.items() if k not in tied or k in params}
        missing, unexpected = sorted(set(params) - set(sd)), sorted(set(sd) - set(params))
        shapes = [k for k in sd if k in params and tuple(sd[k].shape) != tuple(params[k].shape)]
        if missing or unexpected or shapes:
            raise ValueError(f"weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                             f"wrong shape {shapes[:3]}")
        return sd

    # ---- distributed weight update (the NCCL path of SGLang; gloo on CPU)
    def init_group(self, body: dict) -> tuple[int, dict]:
        from megatron_a3po.rollout.weights import init_update_group

        need = ("master_address", "master_port", "rank_offset", "world_size", "group_name")
        missing = [k for k in need if k not in body]
        if missing:
            return 400, {"success": False, "message": f"init_weights_update_group: missing {missing}"}
        backend = body.get("backend", "nccl")
        if backend != "gloo":
            return 400, {"success": False, "message": f"backend={backend!r}: the CPU engine joins weight-update "
                         "groups with backend='gloo' only"}
        name = str(body["group_name"])
        if name in self.groups:
            return 400, {"success": False, "message": f"group {name!r} already exists"}
        try:
            self.groups[name] = init_update_group(body["master_address"], int(body["master_port"]),
                                                  int(body["rank_offset"]), int(body["world_size"]), name, backend)
        except Exception as e:  # noqa: BLE001
            return 400, {"success": False, "message": f"failed to join group {name!r}: {e}"}
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def update_from_distributed(self, body: dict) -> tuple[int, dict]:
        import torch.distributed as dist

        name = body.get("group_name")
        if name not in self.groups:
            return 400, {"success": False, "message": f"group {name!r} not initialised (call /init_weights_update_group)"}
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
                and len(names) == len(dtypes) == len(shapes)):
            return 400, {"success": False, "message": "names, dtypes and shapes must be lists of equal length"}
        if body.get("load_format") not in (None, "auto"):
            return 400, {"success": False, "message": f"load_format={body['load_format']!r} is not supported"}
        with self.update_lock:
            recv = []
            for n, dt, shp in zip(names, dtypes, shapes):  # receive every tensor before any check can bail out
                t = torch.empty(shp, dtype=getattr(torch, dt))
                dist.broadcast(t, src=0, group=self.groups[name])
                recv.append((n, t))
            params = dict(self.sched.model.named_parameters())
            bad = [n for n, t in recv if n not in params or tuple(params[n].shape) != tuple(t.shape)]
            if bad:
                return 400, {"success": False, "message": f"unknown parameter or wrong shape: {bad[:3]}"}
            v = body.get("weight_version")
            n_ab = self.sched.command("load", recv, None if v is None else str(v),
                                      bool(body.get("abort_all_requests", False)))
        return 200, {"success": True, "message": f"Succeeded to update {len(recv)} parameters.",
                     "num_paused_requests": n_ab}

    def destroy_group(self, body: dict) -> tuple[int, dict]:
        import torch.distributed as dist

        name = body.get("group_name")
        pg = self.groups.pop(name, None)
        if pg is None:
            return 400, {"success": False, "message": f"group {name!r} does not exist"}
        dist.destroy_process_group(pg)
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}


def build_app(engine: Engine):

    app = FastAPI(title="megatron-a3po CPU engine")

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        if not raw:
            return {}
        import json

        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None

    @app.exception_handler(BadRequest)
    async def _bad(request, exc: BadRequest):
        return JSONResponse({"error": {"message": str(exc), "code": 400}}, status_code=400)

    def unavailable():
        return JSONResponse({"error": {"message": "service unavailable (injected fault)", "code": 503}},
                            status_code=503)

    @app.post("/generate")
    async def generate(request: Request):
        if engine.fault_active("e503"):
            return unavailable()
        return JSONResponse(await engine.generate(await body_of(request)))

    @app.get("/health")
    async def health():
        if engine.fault_active("e503"):
            return unavailable()
        if engine.fault_active("hang"):
            await asyncio.sleep(max(0.0, engine.fault["hang"] - time.time()))
        return PlainTextResponse("")

    @app.get("/health_generate")
    async def health_generate():
        if engine.fault_active("e503"):
            return unavailable()
        if engine.sched.paused:
            return PlainTextResponse("")
        await engine.generate({"input_ids": [1], "sampling_params": {"max_new_tokens": 1, "ignore_eos": True},
                               "rid": f"health-{uuid.uuid4().hex[:8]}"})
        return PlainTextResponse("")

    @app.get("/ready")
    async def ready():
        return PlainTextResponse("")

    def model_info():
        return {"model_path": engine.model_path, "tokenizer_path": engine.args.tokenizer_path or engine.args.model_path,
                "is_generation": True, "preferred_sampling_params": None,
                "weight_version": engine.sched.weight_version, "load_format": "auto"}

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def _model_info():
        return model_info()

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        a = vars(engine.args).copy()
        return {**a, "version": "megatron-a3po-cpu-engine", "weight_version": engine.sched.weight_version,
                "internal_states": [{"paused": engine.sched.paused, "step": engine.sched.step_count,
                                     "tokens_generated": engine.sched.tokens_generated,
                                     "num_running": len(engine.sched.running),
                                     "num_waiting": len(engine.sched.waiting)}]}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        await asyncio.to_thread(engine.sched.command, "flush")
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details. "
                                 "(When there are running or waiting requests, the operation will not be performed.)\n")

    @app.post("/pause_generation")
    async def pause(request: Request):
        body = await body_of(request)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise BadRequest(f"mode={mode!r}: expected one of abort, retract, in_place")
        await asyncio.to_thread(engine.sched.command, "pause", mode)
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    async def cont(request: Request):
        await body_of(request)
        await asyncio.to_thread(engine.sched.command, "continue")
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.post("/abort_request")
    async def abort(request: Request):
        body = await body_of(request)
        if body.get("abort_all"):
            await asyncio.to_thread(engine.sched.command, "abort", None)
        elif body.get("rid"):
            await asyncio.to_thread(engine.sched.command, "abort", str(body["rid"]))
        else:
            raise BadRequest("abort_request needs rid or abort_all=true")
        return PlainTextResponse("")

    @app.post("/update_weights_from_disk")
    async def update_disk(request: Request):
        body = await body_of(request)
        code, out = await asyncio.to_thread(engine.update_from_disk, body)
        return JSONResponse(out, status_code=code)

    @app.post("/update_weight_version")
    async def update_version(request: Request):
        body = await body_of(request)
        v = body.get("new_version")
        if v is None:
            raise BadRequest("new_version is required")
        await asyncio.to_thread(engine.sched.command, "set_version", str(v), bool(body.get("abort_all_requests", False)))
        return {"success": True, "message": f"Weight version updated to {v}", "new_version": str(v)}

    @app.get("/get_weight_version")
    @app.get("/weight_version")
    async def weight_version():
        return {"weight_version": engine.sched.weight_version}

    @app.post("/init_weights_update_group")
    async def init_group(request: Request):
        body = await body_of(request)
        code, out = await asyncio.to_thread(engine.init_group, body)
        return JSONResponse(out, status_code=code)

    @app.post("/update_weights_from_distributed")
    async def update_dist(request: Request):
        body = await body_of(request)
        code, out = await asyncio.to_thread(engine.update_from_distributed, body)
        return JSONResponse(out, status_code=code)

    @app.post("/destroy_weights_update_group")
    async def destroy_group(request: Request):
        body = await body_of(request)
        code, out = await asyncio.to_thread(engine.destroy_group, body)
        return JSONResponse(out, status_code=code)

    @app.post("/update_weights_from_tensor")
    async def _from_tensor():
        return JSONResponse({"success": False, "message": "update_weights_from_tensor is not supported by the CPU "
                             "engine (use update_weights_from_disk or update_weights_from_distributed)"},
                            status_code=400)

    if engine.args.enable_test_hooks:
        @app.post("/debug/fault")
        async def fault(request: Request):
            """TEST HOOK. {"mode": "503"|"hang"|"fail_update"|"none", "duration_s": s, "count": k}"""
            body = await body_of(request)
            mode = body.get("mode")
            now = time.time()
            if mode == "503":
                engine.fault["e503"] = now + float(body.get("duration_s", 5))
            elif mode == "hang":
                engine.fault["hang"] = now + float(body.get("duration_s", 5))
            elif mode == "fail_update":
                engine.fault["fail_update"] = int(body.get("count", 1))
            elif mode == "none":
                engine.fault.clear()
            else:
                raise BadRequest(f"fault mode {mode!r}: expected 503, hang, fail_update or none")
            return {"status": "ok", "fault": engine.fault}

        @app.get("/debug/version_log")
        async def version_log():
            """TEST HOOK: which weight version produced each output token of recent requests."""
            with engine.sched._log_lock:
                return {"records": list(engine.sched.recent_log)}

    @app.get("/debug/weights_digest")
    async def weights_digest():
        """Not in SGLang: sha256 digest of the served parameters under their HF names (order-free), so a
        trainer can check that every engine holds exactly the weights it exported."""
        from megatron_a3po.convert.digest import state_digest

        model = engine.sched.model
        return {"digest": state_digest(model.named_parameters()), "weight_version": engine.sched.weight_version}

    return app


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m megatron_a3po.engine",
                                description="CPU rollout engine speaking SGLang's native HTTP API (subset)")
    p.add_argument("--model-path", required=True, help="HF model directory")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--weight-version", default="default")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--skip-tokenizer-init", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--version-log", default=None, help="append a jsonl record per finished request "
                   "(rid, output_ids, per-token versions)")
    p.add_argument("--enable-test-hooks", action="store_true", help="TESTS ONLY: /debug/fault, /debug/version_log")
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    engine = Engine(args)
    app = build_app(engine)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    engine.sched.stop()


if __name__ == "__main__":
    main()
