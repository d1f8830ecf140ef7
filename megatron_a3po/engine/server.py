"""HTTP front end of the CPU engine: the subset of SGLang's native API an RL trainer uses.

Request/response shapes and behaviour follow SGLang 0.5.23 (the project's SGLang API notes,
"Behaviour", and tests/test_engine_contract.py):
unknown top-level /generate keys are ignored (unknown sampling_params keys are a 400); the distributed
and tensor weight updates need a ``/begin_weight_update`` .. ``/end_weight_update`` session; a weight
update with ``flush_cache`` (default true) while requests hold KV caches (pause mode ``in_place``)
loads the weights and then fails with 400; with ``n > 1`` every sample has its own rid; ``/health``
is a one-token generation (waits out a pause, 503 after ``--health-check-timeout``); ``/ready`` is 503
while paused; ``/update_weight_version`` aborts all requests unless told not to. Differences from
SGLang, all deliberate:

* CPU only, HF transformers forward, one KV cache per sequence, no prefix cache (cached_tokens = 0);
* no streaming, no text-in-logprobs, no penalties / grammars / logit bias (HTTP 400 if set to
  non-default values); ``/update_weights_from_tensor`` is refused (inside a session) with 400;
* ``meta_info.weight_versions`` is always present when a request produced tokens (one span when the
  version did not change);
* test hooks (only with ``--enable-test-hooks``): ``POST /debug/fault`` to make /generate and /health
  return 503 or hang for N seconds, to fail the next K weight updates, or to slow every decode step
  (so that a fast machine still has requests in flight when a weight update lands); ``GET /debug/version_log``
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from megatron_a3po.engine.auth import KeyMiddleware
from megatron_a3po.engine.scheduler import EngineError, Scheduler, Seq
from megatron_a3po.platform.keys import ADMIN_API_KEY_ENV, API_KEY_ENV
from megatron_a3po.engine.validate import (GENERATE_SCHEMA, BadRequest, InvalidBody, Limits, body_object,
                                           check_generate, control_body, control_schema, openapi_body)

log = logging.getLogger("megatron_a3po.engine")


def load_model(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model path {path!r} is not a directory")
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=getattr(torch, dtype))
    model.eval()
    return model


class EngineFailure(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status) if 400 <= int(status) <= 599 else 500


def _default_prompt_chars(tokenizer, max_context: int | None) -> int | None:
    """A text longer than this cannot fit the context: every token covers at most the longest vocabulary
    entry's characters (x2 for normalisers that merge characters)."""
    if tokenizer is None or max_context is None:
        return None
    try:
        longest = max(len(t) for t in tokenizer.get_vocab())
    except Exception:  # noqa: BLE001 - a tokenizer without a vocabulary listing: no raw bound
        return None
    return 2 * max(1, longest) * max_context


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
        self.limits = Limits(max_n=args.max_n, max_batch_prompts=args.max_batch_prompts, max_context=self.max_context,
                             max_prompt_chars=args.max_prompt_chars or _default_prompt_chars(self.tokenizer,
                                                                                             self.max_context))
        if args.enable_deterministic_inference:  # engine/replay.py: weights in fresh, 64-byte-aligned memory
            from megatron_a3po.engine.replay import VersionStore

            model = VersionStore.fork(model)
        self.sched = Scheduler(model, weight_version=args.weight_version, eos_ids=eos_ids,
                               tokenizer=self.tokenizer, max_context=self.max_context,
                               version_log=args.version_log, seed=args.random_seed,
                               max_batch=1 if args.enable_deterministic_inference else 64)
        if args.keep_weight_versions:  # engine/replay.py: requests may name a held version
            from megatron_a3po.engine.replay import VersionStore

            self.sched.store = VersionStore(args.keep_weight_versions)
            self.sched.store.add(self.sched.weight_version, model)
        self.update_lock = threading.Lock()
        self.fault: dict[str, Any] = {}
        self.unhealthy = False  # the last /health failed: /ready answers 503 until one passes (as SGLang)
        self.groups: dict[str, Any] = {}  # weight-update process groups by name
        self.session_lock = threading.Lock()
        self.session_open = False  # between /begin_weight_update and /end_weight_update
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
        # unknown top-level keys are ignored, as SGLang does (sglang-router adds several: background,
        # log_metrics, model, no_logs, return_bytes, return_entropy, ...); only sampling_params is strict
        vocab = self.sched.model.config.vocab_size
        prompts, is_text, single, parsed, rids, ret_lp = check_generate(body, vocab, self.limits)
        pins = None
        if "replay" in body:  # engine/replay.py: each sample's weight versions (and cut) as recorded
            from megatron_a3po.engine.replay import parse_replay

            pins = parse_replay(body, sum(n for _, n in parsed), self.sched.store,
                                self.args.enable_deterministic_inference)
        if is_text:
            if self.tokenizer is None:
                raise BadRequest("text input needs a tokenizer (server started with --skip-tokenizer-init)")
            # off the event loop (/health stays responsive); the raw length was checked first
            prompts = await asyncio.to_thread(
                lambda: [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts])
            for i, p in enumerate(prompts):
                name = "text" if single else f"text[{i}]"
                if not p:
                    raise BadRequest(f"{name} is empty after tokenising")
                if self.max_context is not None and len(p) >= self.max_context:
                    raise BadRequest(f"{name} has {len(p)} tokens; the context length is {self.max_context}")
        rids = [r if r is not None else uuid.uuid4().hex for r in rids]

        if self.fault_active("hang"):
            await asyncio.sleep(max(0.0, self.fault["hang"] - time.time()))

        loop = asyncio.get_running_loop()
        per_item_sp = isinstance(body.get("sampling_params"), list)
        futs, seqs, meta = [], [], []
        for i, (p, (sp, n)) in enumerate(zip(prompts, parsed)):
            for j in range(n):
                fut = loop.create_future()

                def done(s, fut=fut):
                    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(s))

                gen = None
                if sp.seed is not None:
                    # sample j of an n > 1 request, or item i of a batch that shares one sampling_params
                    # object, gets its own seed (SGLang would give them all the same: identical samples;
                    # the rollout seeds only the CPU engine)
                    k = j if per_item_sp else i * n + j
                    gen = torch.Generator().manual_seed((sp.seed * 1000003 + k) % (1 << 63))
                # replay: the pins are per sample of the request, in order (a group's request is a batch of
                # n copies of its prompt, or one prompt with n samples)
                pin, cut = pins[len(seqs)] if pins is not None else (None, None)
                # n > 1: every sample gets its own uuid4 rid (meta_info.id), as in SGLang
                seq = Seq(rid=rids[i] if n == 1 else uuid.uuid4().hex, prompt=list(p),
                          sp=sp if cut is None else replace(sp, max_new_tokens=min(cut, sp.max_new_tokens)),
                          on_done=done, gen=gen, pin=pin)
                futs.append(fut)
                seqs.append(seq)
                meta.append((i, bool(ret_lp[i])))
        for s, fut in zip(seqs, futs):
            if s.sp.max_new_tokens == 0:
                s.finish = {"type": "length", "length": 0}
                s.versions = []
                fut.set_result(s)
            else:
                self.sched.submit(s)
        try:
            done_seqs = await asyncio.gather(*futs)
        except asyncio.CancelledError:  # client went away: abort its sequences
            for s in seqs:
                self.sched._commands.put(("abort", (s.rid, "client disconnected"), threading.Event(), {}))
            raise
        failed = [s for s in done_seqs if (s.finish or {}).get("status_code") not in (None, 200)]
        if failed:  # an error inside the engine (not an abort): an HTTP error, as SGLang turns it into
            raise EngineFailure(failed[0].finish["status_code"], failed[0].finish.get("message", "engine error"))
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
        if not spans:  # no token: one empty span of the version served when it finished, as SGLang
            spans = [{"version": self.sched.weight_version, "start": 0, "end": 0}]
        meta = {
            "id": s.rid,
            "finish_reason": s.finish,
            "prompt_tokens": len(s.prompt),
            "completion_tokens": len(out),
            "cached_tokens": 0,
            "weight_version": s.versions[-1] if s.versions else self.sched.weight_version,
            "e2e_latency": time.time() - s.created,
        }
        meta["weight_versions"] = spans  # on every finished response, as in SGLang (also with 0 tokens)
        if with_lp:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(s.logprobs, out)]
        return {"text": text, "output_ids": out, "meta_info": meta}

    # ---- weights
    def update_from_disk(self, body: dict) -> tuple[int, dict]:
        path = body["model_path"]
        if not path:
            return 400, {"success": False, "message": "model_path must not be empty", "num_paused_requests": 0}
        root = Path(self.args.weights_root or Path(self.args.model_path).resolve().parent).resolve()
        try:
            inside = Path(path).resolve().is_relative_to(root)
        except (OSError, ValueError):
            inside = False
        if not inside:
            return 400, {"success": False, "message": f"model_path {path!r} is not below the engine's weights root "
                         f"{str(root)!r} (--weights-root)", "num_paused_requests": 0}
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
            flush = bool(body.get("flush_cache", True))
            if sd is not None:  # same architecture: copied into the served model in place, between steps
                n, why = self.sched.command("load", list(sd.items()), version, abort_all, flush)
            else:
                old_shapes = {k: tuple(v.shape) for k, v in self.sched.model.state_dict().items()}
                new_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
                if type(model) is not type(self.sched.model) or old_shapes != new_shapes:
                    diff = sorted(set(old_shapes.items()) ^ set(new_shapes.items()))[:3]
                    return 400, {"success": False, "message": f"{path!r} does not match the served model's "
                                 f"architecture ({type(model).__name__} vs {type(self.sched.model).__name__}; "
                                 f"differing params: {diff})", "num_paused_requests": 0}
                n, why = self.sched.command("swap", model, version, abort_all, flush)
            self.model_path = path
        if why is not None:
            return 400, {"success": False, "message": f"weights loaded, but the cache flush failed: {why}",
                         "num_paused_requests": n}
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
        from megatron_a3po.platform.stores import init_update_group

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

    # ---- weight-update session (SGLang 0.5.23: the distributed and tensor updates need one)
    def begin_update(self, body: dict) -> tuple[int, dict]:
        with self.session_lock:
            if self.session_open:
                return 400, {"success": False, "message": "a weight-update session is already open"}
            self.session_open = True
        return 200, {"success": True, "message": "weight-update session opened"}

    def end_update(self, body: dict) -> tuple[int, dict]:
        with self.session_lock:
            if not self.session_open:
                return 400, {"success": False, "message": "no weight-update session is open"}
            self.session_open = False
        return 200, {"success": True, "message": "weight-update session closed"}

    def _no_session(self, what: str) -> tuple[int, dict] | None:
        if self.session_open:
            return None
        return 400, {"success": False, "message": f"{what} must run between begin_weight_update() and "
                     "end_weight_update()"}

    def update_from_distributed(self, body: dict) -> tuple[int, dict]:

        refused = self._no_session("update_weights_from_distributed")
        if refused is not None:  # before the broadcast: this server never joins it
            return refused
        name = body["group_name"]
        if name not in self.groups:
            return 400, {"success": False, "message": f"group {name!r} not initialised (call /init_weights_update_group)"}
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if body.get("load_format") not in (None, "auto"):
            return 400, {"success": False, "message": f"load_format={body['load_format']!r} is not supported"}
        with self.update_lock:
            recv = []
            pg = self.groups.get(name)
            try:
                for n, dt, shp in zip(names, dtypes, shapes):  # receive every tensor before any check can bail out
                    t = torch.empty(shp, dtype=getattr(torch, dt))
                    self._receive(t, pg, name)
                    recv.append((n, t))
            except Exception as e:  # noqa: BLE001 - the group broke (a peer died, the trainer gave it up)
                return 500, {"success": False, "message": f"update_weights_from_distributed: the broadcast on "
                             f"group {name!r} failed after {len(recv)} of {len(names)} tensors: {e}"}
            params = dict(self.sched.model.named_parameters())
            bad = [n for n, t in recv if n not in params or tuple(params[n].shape) != tuple(t.shape)]
            if bad:
                return 400, {"success": False, "message": f"unknown parameter or wrong shape: {bad[:3]}"}
            v = body.get("weight_version")
            n_ab, why = self.sched.command("load", recv, None if v is None else str(v),
                                           bool(body.get("abort_all_requests", False)),
                                           bool(body.get("flush_cache", True)))
        if why is not None:
            return 400, {"success": False, "message": f"weights loaded, but the cache flush failed: {why}",
                         "num_paused_requests": n_ab}
        return 200, {"success": True, "message": f"Succeeded to update {len(recv)} parameters.",
                     "num_paused_requests": n_ab}

    def _receive(self, t: torch.Tensor, pg, name: str):
        """One tensor of the trainer's broadcast. A receive whose sender gave the group up (its push failed:
        a peer died) would wait for gloo's timeout, holding the update lock; it ends as soon as the group
        is destroyed (``/destroy_weights_update_group``, which the trainer sends before making a new one),
        as SGLang's NCCL receive ends when the communicator is aborted."""
        import torch.distributed as dist

        work = dist.broadcast(t, src=0, group=pg, async_op=True)
        pause = 0.0005
        while not work.is_completed():
            if self.groups.get(name) is not pg:
                raise RuntimeError(f"group {name!r} was destroyed during the receive")
            time.sleep(pause)
            pause = min(2 * pause, 0.02)
        work.wait()

    def destroy_group(self, body: dict) -> tuple[int, dict]:
        import torch.distributed as dist

        name = body["group_name"]
        pg = self.groups.pop(name, None)
        if pg is None:
            return 400, {"success": False, "message": f"group {name!r} does not exist"}
        dist.destroy_process_group(pg)  # returns at once; a receive still pending on it gives up (_receive)
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}


def build_app(engine: Engine):

    app = FastAPI(title="megatron-a3po CPU engine")
    app.add_middleware(KeyMiddleware, api_key=engine.args.api_key, admin_key=engine.args.admin_api_key)

    async def body_of(request: Request) -> dict:
        """The JSON object a route was sent ({} for an empty body); a big body is parsed off the loop."""
        import json

        raw = await request.body()
        try:
            body = {} if not raw else json.loads(raw) if len(raw) < (1 << 20) else await asyncio.to_thread(
                json.loads, raw)
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
            raise BadRequest(f"request body is not valid JSON: {str(e)[:200]}") from None
        # a control route's body is checked against its model (validate.CONTROL_MODELS) before any handler
        # sees it; the handlers read the checked dict (defaults filled in)
        return control_body(request.url.path, body_object(body, request.url.path))

    def post(path: str, **kw):
        """A POST route whose (raw-parsed) JSON body is described in the OpenAPI document by its model."""
        return app.post(path, openapi_extra=openapi_body(control_schema(path)), **kw)

    @app.exception_handler(InvalidBody)
    async def _invalid(request, exc: InvalidBody):  # SGLang 0.5.23's answer to a body that fails validation
        return JSONResponse({"object": "error", "message": str(exc), "type": "Bad Request", "param": None,
                             "code": 400}, status_code=400)

    @app.exception_handler(BadRequest)
    async def _bad(request, exc: BadRequest):
        return JSONResponse({"error": {"message": str(exc), "code": 400}}, status_code=400)

    @app.exception_handler(EngineFailure)
    async def _failed(request, exc: EngineFailure):
        return JSONResponse({"error": {"message": str(exc), "code": exc.status}}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("%s failed", request.url.path)
        return JSONResponse({"error": {"message": f"internal error in {request.url.path}: {type(exc).__name__}: "
                                                  f"{str(exc)[:300]}", "code": 500}}, status_code=500)

    def unavailable():
        return JSONResponse({"error": {"message": "service unavailable (injected fault)", "code": 503}},
                            status_code=503)

    @app.post("/generate", openapi_extra=openapi_body(GENERATE_SCHEMA, required=True))
    async def generate(request: Request):
        if engine.fault_active("e503"):
            return unavailable()
        return JSONResponse(await engine.generate(await body_of(request)))

    @app.get("/health")
    @app.get("/health_generate")
    async def health():
        """As SGLang's: a one-token generation, so it waits out a pause and answers 503 after
        ``--health-check-timeout`` seconds."""
        if engine.fault_active("e503"):
            return unavailable()
        rid = f"HEALTH_CHECK_{uuid.uuid4().hex[:12]}"
        try:
            await asyncio.wait_for(engine.generate({"input_ids": [1], "rid": rid, "sampling_params": {
                "max_new_tokens": 1, "ignore_eos": True}}), engine.args.health_check_timeout)
        except asyncio.TimeoutError:
            await asyncio.to_thread(engine.sched.command, "abort", rid)
            engine.unhealthy = True  # as SGLang: /ready answers 503 until a health check passes again
            return JSONResponse({"error": {"message": f"health check generation did not finish within "
                                           f"{engine.args.health_check_timeout:g}s", "code": 503}}, status_code=503)
        engine.unhealthy = False
        return PlainTextResponse("")

    @app.get("/ready")
    async def ready():
        if engine.sched.paused:
            return JSONResponse({"error": {"message": "generation is paused", "code": 503}}, status_code=503)
        if engine.unhealthy:
            return JSONResponse({"error": {"message": "the last health check failed", "code": 503}}, status_code=503)
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

    @app.get("/v1/loads")
    async def loads():
        """SGLang's load report (the fields a client or test reads; one data-parallel rank)."""
        return {"version": "megatron-a3po-cpu-engine", "loads": [{
            "dp_rank": 0, "num_running_reqs": len(engine.sched.running), "num_waiting_reqs": len(engine.sched.waiting),
            "max_running_requests": engine.sched.max_running,
            "queues": {"waiting": len(engine.sched.waiting), "paused": len(engine.sched.running) if engine.sched.paused
                       else 0}}]}

    @app.api_route("/slow_down", methods=["GET", "POST"],
                   openapi_extra=openapi_body(control_schema("/slow_down")))
    async def slow_down(request: Request):
        """As SGLang's (for tests): every forward step sleeps ``forward_sleep_time`` seconds (null: no sleep)."""
        body = await body_of(request)
        engine.sched.step_delay_s = float(body["forward_sleep_time"] or 0.0)
        return PlainTextResponse("")

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        try:
            await asyncio.to_thread(engine.sched.command, "flush")
        except EngineError as e:
            return PlainTextResponse(f"Cache not flushed: {e}\n", status_code=400)
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details. "
                                 "(When there are running or waiting requests, the operation will not be performed.)\n")

    @post("/pause_generation")
    async def pause(request: Request):
        body = await body_of(request)
        await asyncio.to_thread(engine.sched.command, "pause", body["mode"])
        return {"message": "Generation paused successfully.", "status": "ok"}

    @post("/continue_generation")
    async def cont(request: Request):
        await body_of(request)
        await asyncio.to_thread(engine.sched.command, "continue")
        return {"message": "Generation continued successfully.", "status": "ok"}

    @post("/abort_request")
    async def abort(request: Request):
        body = await body_of(request)
        if body.get("abort_all"):
            await asyncio.to_thread(engine.sched.command, "abort", None)
        elif body.get("rid"):
            await asyncio.to_thread(engine.sched.command, "abort", str(body["rid"]))
        else:
            raise BadRequest("abort_request needs rid or abort_all=true")
        return PlainTextResponse("")

    @post("/update_weight_version")
    async def update_version(request: Request):
        body = await body_of(request)
        v = body["new_version"]
        await asyncio.to_thread(engine.sched.command, "set_version", v, body["abort_all_requests"])
        return {"success": True, "message": f"Weight version updated to {v}", "new_version": str(v)}

    @app.get("/get_weight_version")
    @app.get("/weight_version")
    async def weight_version():
        return {"weight_version": engine.sched.weight_version}

    # the weight-update control routes: each hands its JSON body to one Engine method, which answers
    # (status, body); the slow ones (a load from disk, a collective) run off the event loop
    def engine_route(path: str, method, *, off_loop: bool):
        async def route(request: Request):
            body = await body_of(request)
            code, out = await asyncio.to_thread(method, body) if off_loop else method(body)
            return JSONResponse(out, status_code=code)

        post(path, name=path.strip("/"))(route)

    for path, method, off_loop in (("/update_weights_from_disk", engine.update_from_disk, True),
                                   ("/init_weights_update_group", engine.init_group, True),
                                   ("/update_weights_from_distributed", engine.update_from_distributed, True),
                                   ("/destroy_weights_update_group", engine.destroy_group, True),
                                   ("/begin_weight_update", engine.begin_update, False),
                                   ("/end_weight_update", engine.end_update, False)):
        engine_route(path, method, off_loop=off_loop)

    @post("/update_weights_from_tensor")
    async def _from_tensor(request: Request):
        await body_of(request)  # checked against its model like every control route's body
        refused = engine._no_session("update_weights_from_tensor")
        if refused is not None:
            return JSONResponse(refused[1], status_code=refused[0])
        return JSONResponse({"success": False, "message": "update_weights_from_tensor is not supported by the CPU "
                             "engine (use update_weights_from_disk or update_weights_from_distributed)"},
                            status_code=400)

    if engine.args.enable_test_hooks:
        @app.post("/debug/fault")
        async def fault(request: Request):
            """TEST HOOK. {"mode": "503"|"hang"|"fail_update"|"slow"|"none", "duration_s": s, "count": k,
            "step_delay_s": s}"""
            body = await body_of(request)
            mode = body.get("mode")
            now = time.time()
            if mode == "503":
                engine.fault["e503"] = now + float(body.get("duration_s", 5))
            elif mode == "hang":
                engine.fault["hang"] = now + float(body.get("duration_s", 5))
            elif mode == "fail_update":
                engine.fault["fail_update"] = int(body.get("count", 1))
            elif mode == "slow":
                delay = body.get("step_delay_s", 0.02)
                if not isinstance(delay, (int, float)) or not 0 <= delay <= 10:
                    raise BadRequest(f"step_delay_s {delay!r}: expected seconds in [0, 10]")
                engine.sched.step_delay_s = float(delay)
            elif mode == "none":
                engine.fault.clear()
                engine.sched.step_delay_s = 0.0
            else:
                raise BadRequest(f"fault mode {mode!r}: expected 503, hang, fail_update, slow or none")
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
    p.add_argument("--listen-fd", type=int, default=None,
                   help="serve on this inherited listening socket (bound to --host:--port by the launcher, "
                        "engine/launch.py) instead of binding one; ignored unless it is a socket on --port")
    p.add_argument("--weight-version", default="default")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--skip-tokenizer-init", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--version-log", default=None, help="append a jsonl record per finished request "
                   "(rid, output_ids, per-token versions)")
    p.add_argument("--enable-test-hooks", action="store_true", help="TESTS ONLY: /debug/fault, /debug/version_log")
    p.add_argument("--health-check-timeout", type=float, default=20.0,
                   help="seconds /health waits for its one-token generation before answering 503")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"key for every route but /health*, /ready* (default ${API_KEY_ENV}; a flag shows in ps)")
    p.add_argument("--admin-api-key", default=os.environ.get(ADMIN_API_KEY_ENV) or None,
                   help=f"key for the control routes (weight updates, pause, ...) (default ${ADMIN_API_KEY_ENV})")
    p.add_argument("--weights-root", default=None,
                   help="/update_weights_from_disk loads only below this directory (default: the parent of "
                        "--model-path)")
    p.add_argument("--max-n", type=int, default=64, help="largest sampling_params.n a request may ask for")
    p.add_argument("--max-batch-prompts", type=int, default=256, help="most prompts in one /generate request")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest text prompt in characters, checked before tokenising (default: the context "
                        "length x 2 x the longest vocabulary entry)")
    p.add_argument("--shutdown-timeout", type=float, default=3.0,
                   help="seconds SIGTERM waits for open requests before the engine exits anyway")
    p.add_argument("--enable-deterministic-inference", action="store_true",
                   help="one sequence per forward pass: a sequence's tokens and log-probs do not depend on what "
                        "else is served (record and replay of asynchronous runs; engine/replay.py)")
    p.add_argument("--keep-weight-versions", type=int, default=0,
                   help="keep this many newest weight versions; a request's top-level 'replay' field may name "
                        "them per output token (engine/replay.py; 0: off)")
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    engine = Engine(args)
    app = build_app(engine)
    serve(app, engine, args)


def serve(app, engine: Engine, args) -> None:
    """uvicorn until SIGTERM/SIGINT. Open requests get ``--shutdown-timeout`` seconds; a watchdog then
    ends the process whatever still runs (a request waiting on a paused engine, a forward pass), so an
    engine always dies with the trainer that sends it SIGTERM."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not getattr(self, "_watchdog", None):
                self._watchdog = threading.Timer(args.shutdown_timeout + 2.0, os._exit, args=(0,))
                self._watchdog.daemon = True
                self._watchdog.start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    sock = inherited_socket(args.listen_fd, args.port)
    _Server(config).run(sockets=None if sock is None else [sock])
    engine.sched.stop()


def inherited_socket(fd: int | None, port: int):
    """The listening socket the launcher handed down (``--listen-fd``), if ``fd`` is one on ``port``; else
    None and the server binds ``--host:--port`` itself (the same command line run again, e.g. to restart
    an engine on its port, has no such descriptor)."""
    import socket

    if fd is None:
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if sock.type == socket.SOCK_STREAM and sock.getsockname()[1] == port:
            return sock
    except OSError:
        pass
    sock.detach()  # not ours to close
    return None


if __name__ == "__main__":
    main()
