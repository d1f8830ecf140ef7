"""HTTP front end of the CPU engine: the subset of SGLang's native API an RL trainer uses.

Request/response shapes and behaviour follow SGLang 0.5.23 (../shared/spec/sglang_api.md,
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
* test hooks (only with ``--enable-test-hooks``; no ``/debug/*`` route exists without it): ``POST
  /debug/fault`` to make /generate and /health return 503 or hang for N seconds, to fail the next K weight
  updates, or to slow every decode step (so that a fast machine still has requests in flight when a
  weight update lands); ``GET /debug/version_log`` returns which version produced each token of the
  recent requests (also written to ``--version-log FILE`` as jsonl);
* ``GET /weights_digest`` (not SGLang's): a digest of the served weights, for ``trainer.verify_weight_sync``.

The routes are in engine/routes.py; every body is parsed by its model in engine/validate.py first.
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
from fastapi.responses import JSONResponse

from megatron_a3po.engine import routes
from megatron_a3po.engine.auth import KeyMiddleware
from megatron_a3po.engine.scheduler import Scheduler, Seq
from megatron_a3po.platform.keys import ADMIN_API_KEY_ENV, API_KEY_ENV
from megatron_a3po.engine.validate import (ApiError, BadRequest, ErrorReply, GenerateRequest, Limits, Refused,
                                           admit, check_tokenized)

log = logging.getLogger("megatron_a3po.engine")


def load_model(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model path {path!r} is not a directory")
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=getattr(torch, dtype))
    model.eval()
    return model


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
        # destroyed groups, kept: a gloo group whose peer died blocks in its destructor until its timeout,
        # and the last reference could otherwise drop while the update lock is held (the failed receive's
        # frame) or on the event loop (an error's traceback): the next update would wait for it
        self.retired_groups: list[Any] = []
        self.session_lock = threading.Lock()
        self.session_open = False  # between /begin_weight_update and /end_weight_update
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
    async def generate(self, req: GenerateRequest) -> Any:
        """Serve a parsed /generate body (validate.GenerateRequest) within the server's limits
        (validate.admit); the answer SGLang gives: one object for one prompt and one sample, else a list."""
        adm = admit(req, self.sched.model.config.vocab_size, self.limits)
        pins = None
        if req.replay is not None:  # engine/replay.py: each sample's weight versions (and cut) as recorded
            from megatron_a3po.engine.replay import parse_replay

            pins = parse_replay(req.replay, sum(n for _, n in adm.sampling), self.sched.store,
                                self.args.enable_deterministic_inference)
        prompts = adm.prompts
        if adm.is_text:
            if self.tokenizer is None:
                raise BadRequest("text input needs a tokenizer (server started with --skip-tokenizer-init)")
            # off the event loop (/health stays responsive); the raw length was checked first
            prompts = await asyncio.to_thread(
                lambda: [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in adm.prompts])
            check_tokenized(prompts, adm.single, self.limits)
        rids = [r if r is not None else uuid.uuid4().hex for r in adm.rids]

        if self.fault_active("hang"):
            await asyncio.sleep(max(0.0, self.fault["hang"] - time.time()))
        seqs, futs, with_lp = self._sequences(prompts, adm, rids, pins)
        try:
            done_seqs = await asyncio.gather(*futs)
        except asyncio.CancelledError:  # client went away: abort its sequences
            for s in seqs:
                self.sched._commands.put(("abort", (s.rid, "client disconnected"), threading.Event(), {}))
            raise
        failed = [s for s in done_seqs if (s.finish or {}).get("status_code") not in (None, 200)]
        if failed:  # an error inside the engine (not an abort): an HTTP error, as SGLang turns it into
            raise ErrorReply(failed[0].finish.get("message", "engine error"), failed[0].finish["status_code"])
        outs = [self._response(s, lp) for s, lp in zip(done_seqs, with_lp)]
        return outs[0] if adm.single and len(outs) == 1 else outs

    def _sequences(self, prompts, adm, rids, pins):
        """One Seq per sample of every prompt, submitted to the scheduler (a sample with max_new_tokens 0
        is finished at once); returns them, their futures and their return_logprob flags."""
        loop = asyncio.get_running_loop()
        futs, seqs, with_lp = [], [], []
        for i, (p, (sp, n)) in enumerate(zip(prompts, adm.sampling)):
            for j in range(n):
                fut = loop.create_future()

                def done(s, fut=fut):
                    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(s))

                gen = None
                if sp.seed is not None:
                    # sample j of an n > 1 request, or item i of a batch that shares one sampling_params
                    # object, gets its own seed (SGLang would give them all the same: identical samples;
                    # the rollout seeds only the CPU engine)
                    k = j if adm.per_item_sampling else i * n + j
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
                with_lp.append(bool(adm.return_logprob[i]))
        for s, fut in zip(seqs, futs):
            if s.sp.max_new_tokens == 0:
                s.finish = {"type": "length", "length": 0}
                s.versions = []
                fut.set_result(s)
            else:
                self.sched.submit(s)
        return seqs, futs, with_lp

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
    def update_from_disk(self, body) -> dict:
        """``/update_weights_from_disk`` (validate.UpdateWeightsFromDisk). Raises Refused."""
        path = body.model_path

        def refuse(message: str, n: int = 0):
            return Refused(message, num_paused_requests=n)
        if not path:
            raise refuse("model_path must not be empty")
        root = Path(self.args.weights_root or Path(self.args.model_path).resolve().parent).resolve()
        try:
            inside = Path(path).resolve().is_relative_to(root)
        except (OSError, ValueError):
            inside = False
        if not inside:
            raise refuse(f"model_path {path!r} is not below the engine's weights root {str(root)!r} (--weights-root)")
        if body.load_format not in (None, "auto", "safetensors", "pt"):
            raise refuse(f"load_format={body.load_format!r} is not supported by the CPU engine")
        with self.update_lock:
            if self.take_update_failure():
                raise refuse("injected weight-update failure (test hook)")
            try:
                sd = self._read_same_arch(path)
                model = load_model(path, self.args.dtype) if sd is None else None
            except Exception as e:  # noqa: BLE001 - any failure to read the directory is the caller's answer
                raise refuse(f"failed to load weights from {path!r}: {e}") from None
            args = (body.weight_version, body.abort_all_requests, body.flush_cache)
            if sd is not None:  # same architecture: copied into the served model in place, between steps
                n, why = self.sched.command("load", list(sd.items()), *args)
            else:
                old_shapes = {k: tuple(v.shape) for k, v in self.sched.model.state_dict().items()}
                new_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
                if type(model) is not type(self.sched.model) or old_shapes != new_shapes:
                    diff = sorted(set(old_shapes.items()) ^ set(new_shapes.items()))[:3]
                    raise refuse(f"{path!r} does not match the served model's architecture ({type(model).__name__} "
                                 f"vs {type(self.sched.model).__name__}; differing params: {diff})")
                n, why = self.sched.command("swap", model, *args)
            self.model_path = path
        if why is not None:
            raise refuse(f"weights loaded, but the cache flush failed: {why}", n)
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": n}

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
    def init_group(self, body) -> dict:
        """``/init_weights_update_group`` (validate.InitWeightsUpdateGroup). Raises Refused."""
        from megatron_a3po.platform.stores import init_update_group

        if body.backend != "gloo":
            raise Refused(f"backend={body.backend!r}: the CPU engine joins weight-update groups with "
                          "backend='gloo' only")
        name = body.group_name
        if name in self.groups:
            raise Refused(f"group {name!r} already exists")
        try:
            self.groups[name] = init_update_group(body.master_address, body.master_port, body.rank_offset,
                                                  body.world_size, name, body.backend)
        except Exception as e:  # noqa: BLE001 - any failure to join is the caller's answer
            raise Refused(f"failed to join group {name!r}: {e}") from None
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    # ---- weight-update session (SGLang 0.5.23: the distributed and tensor updates need one)
    def begin_update(self, body) -> dict:
        with self.session_lock:
            if self.session_open:
                raise Refused("a weight-update session is already open")
            self.session_open = True
        return {"success": True, "message": "weight-update session opened"}

    def end_update(self, body) -> dict:
        with self.session_lock:
            if not self.session_open:
                raise Refused("no weight-update session is open")
            self.session_open = False
        return {"success": True, "message": "weight-update session closed"}

    def _need_session(self, what: str) -> None:
        if not self.session_open:
            raise Refused(f"{what} must run between begin_weight_update() and end_weight_update()")

    def update_from_tensor(self, body) -> dict:
        """Refused (inside a session, with 400 as any failure): the CPU engine has no tensor transport."""
        self._need_session("update_weights_from_tensor")
        raise Refused("update_weights_from_tensor is not supported by the CPU engine (use update_weights_from_disk "
                      "or update_weights_from_distributed)")

    def update_from_distributed(self, body) -> dict:
        """``/update_weights_from_distributed`` (validate.UpdateWeightsFromDistributed). Raises Refused."""
        self._need_session("update_weights_from_distributed")  # before the broadcast: never joins it
        name = body.group_name
        if name not in self.groups:
            raise Refused(f"group {name!r} not initialised (call /init_weights_update_group)")
        if body.load_format not in (None, "auto"):
            raise Refused(f"load_format={body.load_format!r} is not supported")
        with self.update_lock:
            recv, failed = [], None
            pg = self.groups.get(name)
            try:
                for n, dt, shp in zip(body.names, body.dtypes, body.shapes):  # every tensor before any check
                    t = torch.empty(shp, dtype=getattr(torch, dt))
                    self._receive(t, pg, name)
                    recv.append((n, t))
            except Exception as e:  # noqa: BLE001 - the group broke (a peer died, the trainer gave it up)
                failed = f"the broadcast on group {name!r} failed after {len(recv)} of {len(body.names)} tensors: {e}"
            # raised here, not in the except block: the error reaching the event loop carries no traceback
            # of the receive (a destroyed group is kept alive anyway: ``retired_groups``)
            pg = None
            if failed is not None:
                raise Refused(f"update_weights_from_distributed: {failed}", 500)
            params = dict(self.sched.model.named_parameters())
            bad = [n for n, t in recv if n not in params or tuple(params[n].shape) != tuple(t.shape)]
            if bad:
                raise Refused(f"unknown parameter or wrong shape: {bad[:3]}")
            n_ab, why = self.sched.command("load", recv, body.weight_version, body.abort_all_requests,
                                           body.flush_cache)
        if why is not None:
            raise Refused(f"weights loaded, but the cache flush failed: {why}", num_paused_requests=n_ab)
        return {"success": True, "message": f"Succeeded to update {len(recv)} parameters.",
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

    def destroy_group(self, body) -> dict:
        import torch.distributed as dist

        pg = self.groups.pop(body.group_name, None)
        if pg is None:
            raise Refused(f"group {body.group_name!r} does not exist")
        dist.destroy_process_group(pg)  # returns at once; a receive still pending on it gives up (_receive)
        self.retired_groups.append(pg)
        return {"success": True, "message": "Succeeded to destroy custom process group."}


def build_app(engine: Engine) -> FastAPI:
    """The engine's app: the routers of engine/routes.py over ``engine`` (the test hooks' only with
    ``--enable-test-hooks``), the API keys, and one handler that answers every ``ApiError``."""
    app = FastAPI(title="megatron-a3po CPU engine")
    app.state.engine = engine
    app.add_middleware(KeyMiddleware, api_key=engine.args.api_key, admin_key=engine.args.admin_api_key)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(Exception, _internal)
    app.include_router(routes.serving)
    app.include_router(routes.control)
    if engine.args.enable_test_hooks:
        app.include_router(routes.debug)
    return app


async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body, status_code=exc.status)


async def _internal(request: Request, exc: Exception):
    log.exception("%s failed", request.url.path)
    return JSONResponse({"error": {"message": f"internal error in {request.url.path}: {type(exc).__name__}: "
                                              f"{str(exc)[:300]}", "code": 500}}, status_code=500)


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
