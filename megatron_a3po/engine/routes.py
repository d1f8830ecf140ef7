"""The CPU engine's HTTP routes, in three routers over the app's ``Engine`` (``app.state.engine``):

* ``serving``: /generate, /health, /ready and the read-only info routes;
* ``control``: pause / continue / abort, versions, cache flush, the weight updates and their sessions;
* ``debug``: the test hooks, mounted only with ``--enable-test-hooks`` (engine/server.py ``build_app``).

Every body is parsed into its route's model (``validate.ROUTE_MODELS``) by ``read_body`` before a handler
acts on it, and the OpenAPI document describes it with the same model (``post``). Anything but a success
is raised as a ``validate.ApiError`` (status and body), which the app's one handler answers.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from megatron_a3po.engine.scheduler import EngineError
from megatron_a3po.engine.validate import ROUTE_MODELS, BadRequest, ErrorReply, body_schema, parse_body

serving, control, debug = APIRouter(), APIRouter(), APIRouter()


def engine_of(request: Request):
    return request.app.state.engine


async def read_json(request: Request):
    """The JSON value a route was sent (None for an empty body); a big body is parsed off the loop."""
    raw = await request.body()
    try:
        return None if not raw else json.loads(raw) if len(raw) < (1 << 20) else await asyncio.to_thread(
            json.loads, raw)
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
        raise BadRequest(f"request body is not valid JSON: {str(e)[:200]}") from None


async def read_body(request: Request):
    """The route's body parsed into its model (``validate.ROUTE_MODELS``); InvalidBody if it fails."""
    return parse_body(request.url.path, await read_json(request))


def post(router: APIRouter, path: str, methods=("POST",), **kw):
    """A route whose JSON body (parsed by ``read_body``) the OpenAPI document describes with its model."""
    extra = None
    if path in ROUTE_MODELS:
        extra = {"requestBody": {"required": path == "/generate",
                                 "content": {"application/json": {"schema": body_schema(path)}}}}
    return router.api_route(path, methods=list(methods), openapi_extra=extra, **kw)


def unavailable():
    return ErrorReply("service unavailable (injected fault)", 503)


# ------------------------------------------------------------------------------- serving
@post(serving, "/generate")
async def generate(request: Request):
    engine = engine_of(request)
    if engine.fault_active("e503"):
        raise unavailable()
    return JSONResponse(await engine.generate(await read_body(request)))


@serving.get("/health")
@serving.get("/health_generate")
async def health(request: Request):
    """As SGLang's: a one-token generation, so it waits out a pause and answers 503 after
    ``--health-check-timeout`` seconds."""
    engine = engine_of(request)
    if engine.fault_active("e503"):
        raise unavailable()
    rid = f"HEALTH_CHECK_{uuid.uuid4().hex[:12]}"
    req = parse_body("/generate", {"input_ids": [1], "rid": rid,
                                   "sampling_params": {"max_new_tokens": 1, "ignore_eos": True}})
    try:
        await asyncio.wait_for(engine.generate(req), engine.args.health_check_timeout)
    except asyncio.TimeoutError:
        await asyncio.to_thread(engine.sched.command, "abort", rid)
        engine.unhealthy = True  # as SGLang: /ready answers 503 until a health check passes again
        raise ErrorReply(f"health check generation did not finish within {engine.args.health_check_timeout:g}s",
                         503) from None
    engine.unhealthy = False
    return PlainTextResponse("")


@serving.get("/ready")
async def ready(request: Request):
    engine = engine_of(request)
    if engine.sched.paused:
        raise ErrorReply("generation is paused", 503)
    if engine.unhealthy:
        raise ErrorReply("the last health check failed", 503)
    return PlainTextResponse("")


@serving.get("/model_info")
@serving.get("/get_model_info")
async def model_info(request: Request):
    engine = engine_of(request)
    return {"model_path": engine.model_path, "tokenizer_path": engine.args.tokenizer_path or engine.args.model_path,
            "is_generation": True, "preferred_sampling_params": None,
            "weight_version": engine.sched.weight_version, "load_format": "auto"}


@serving.get("/server_info")
@serving.get("/get_server_info")
async def server_info(request: Request):
    engine = engine_of(request)
    s = engine.sched
    return {**vars(engine.args), "version": "megatron-a3po-cpu-engine", "weight_version": s.weight_version,
            "internal_states": [{"paused": s.paused, "step": s.step_count, "tokens_generated": s.tokens_generated,
                                 "num_running": len(s.running), "num_waiting": len(s.waiting)}]}


@serving.get("/v1/loads")
async def loads(request: Request):
    """SGLang's load report (the fields a client or test reads; one data-parallel rank)."""
    s = engine_of(request).sched
    return {"version": "megatron-a3po-cpu-engine", "loads": [{
        "dp_rank": 0, "num_running_reqs": len(s.running), "num_waiting_reqs": len(s.waiting),
        "max_running_requests": s.max_running,
        "queues": {"waiting": len(s.waiting), "paused": len(s.running) if s.paused else 0}}]}


@serving.get("/get_weight_version")
@serving.get("/weight_version")
async def weight_version(request: Request):
    return {"weight_version": engine_of(request).sched.weight_version}


@serving.get("/weights_digest")
async def weights_digest(request: Request):
    """Not in SGLang: sha256 digest of the served parameters under their HF names (order-free), so a
    trainer can check that every engine holds exactly the weights it exported."""
    from megatron_a3po.convert.digest import state_digest

    s = engine_of(request).sched
    return {"digest": state_digest(s.model.named_parameters()), "weight_version": s.weight_version}


# ------------------------------------------------------------------------------- control
@post(control, "/slow_down", methods=("GET", "POST"))
async def slow_down(request: Request):
    """As SGLang's (for tests): every forward step sleeps ``forward_sleep_time`` seconds (null: no sleep)."""
    body = await read_body(request)
    engine_of(request).sched.step_delay_s = float(body.forward_sleep_time or 0.0)
    return PlainTextResponse("")


@control.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request):
    try:
        await asyncio.to_thread(engine_of(request).sched.command, "flush")
    except EngineError as e:
        return PlainTextResponse(f"Cache not flushed: {e}\n", status_code=400)
    return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details. "
                             "(When there are running or waiting requests, the operation will not be performed.)\n")


@post(control, "/pause_generation")
async def pause(request: Request):
    body = await read_body(request)
    await asyncio.to_thread(engine_of(request).sched.command, "pause", body.mode)
    return {"message": "Generation paused successfully.", "status": "ok"}


@post(control, "/continue_generation")
async def cont(request: Request):
    await read_body(request)
    await asyncio.to_thread(engine_of(request).sched.command, "continue")
    return {"message": "Generation continued successfully.", "status": "ok"}


@post(control, "/abort_request")
async def abort(request: Request):
    body = await read_body(request)
    if not body.abort_all and not body.rid:
        raise BadRequest("abort_request needs rid or abort_all=true")
    await asyncio.to_thread(engine_of(request).sched.command, "abort", None if body.abort_all else body.rid)
    return PlainTextResponse("")


@post(control, "/update_weight_version")
async def update_version(request: Request):
    body = await read_body(request)
    v = body.new_version
    await asyncio.to_thread(engine_of(request).sched.command, "set_version", v, body.abort_all_requests)
    return {"success": True, "message": f"Weight version updated to {v}", "new_version": v}


# the weight-update routes: each hands its parsed body to one Engine method (which raises
# validate.Refused when it does not do what it was asked); the slow ones (a load, a collective) off the loop
_WEIGHT_ROUTES = (("/update_weights_from_disk", "update_from_disk", True),
                  ("/init_weights_update_group", "init_group", True),
                  ("/update_weights_from_distributed", "update_from_distributed", True),
                  ("/destroy_weights_update_group", "destroy_group", True),
                  ("/begin_weight_update", "begin_update", False),
                  ("/end_weight_update", "end_update", False),
                  ("/update_weights_from_tensor", "update_from_tensor", False))


def _weight_route(path: str, method: str, off_loop: bool):
    async def route(request: Request):
        body = await read_body(request)
        fn = getattr(engine_of(request), method)
        return await asyncio.to_thread(fn, body) if off_loop else fn(body)

    post(control, path, name=path.strip("/"))(route)


for _path, _method, _off_loop in _WEIGHT_ROUTES:
    _weight_route(_path, _method, _off_loop)


# ------------------------------------------------------------------------------- debug (test hooks)
@debug.post("/debug/fault")
async def fault(request: Request):
    """TEST HOOK. {"mode": "503"|"hang"|"fail_update"|"slow"|"none", "duration_s": s, "count": k,
    "step_delay_s": s}"""
    body = await read_json(request) or {}
    if not isinstance(body, dict):
        raise BadRequest("/debug/fault: the request body must be a JSON object")
    engine, mode, now = engine_of(request), body.get("mode"), time.time()
    if mode in ("503", "hang"):
        engine.fault["e503" if mode == "503" else "hang"] = now + float(body.get("duration_s", 5))
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


@debug.get("/debug/version_log")
async def version_log(request: Request):
    """TEST HOOK: which weight version produced each output token of recent requests."""
    sched = engine_of(request).sched
    with sched._log_lock:
        return {"records": list(sched.recent_log)}
