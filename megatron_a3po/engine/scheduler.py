"""The CPU engine's model runner and scheduler (HF transformers, one thread, continuous batching).

One scheduler thread owns the model. Each loop iteration ("step"):

1. applies queued control commands (abort, pause, continue, weight swap, version change) -- so a
   weight update always lands *between* two decode steps and never inside a forward pass;
2. admits queued requests (unless paused): a prefill forward with a fresh KV cache (prompts of equal
   length batched together), which samples the first output token;
3. decodes one token for every active sequence in one batched forward (each sequence keeps its own
   KV cache; they are left-padded into a batch for the step, pads masked out).

Every sampled token records the weight version current at that step, so a request that lives across
an update reports ``weight_versions`` spans ``[{"version", "start", "end"}]`` (end exclusive) over its
output tokens. The log-prob returned for a token is ``log_softmax(logits / T)`` at the sampled id (the
behaviour policy; top-k/top-p/min-p only restrict which ids may be sampled). ``T == 0`` means greedy
with ``log_softmax(logits)``.

A weight update is a command too, so no forward pass ever sees half-updated weights. The tensors are
read off-thread first (from disk, or one bucket of a broadcast per command) and then copied into the served
model's parameters in place (``load``). Only an update from a directory the in-place path cannot read (no
safetensors files, or a config that differs in a compared key) loads a whole model object, checked to
have the served architecture, and swaps it in (``swap``).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from megatron_a3po.errors import RunFailure

log = logging.getLogger("megatron_a3po.engine")


# --------------------------------------------------------------------------------------------------
# sampling


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None


def sample_token(logits: torch.Tensor, sp: Sampling, gen: torch.Generator | None,
                 banned: list[int] | None = None) -> tuple[int, float]:
    """Sample one id from 1-D ``logits``; returns (id, log_softmax(logits / T)[id])."""
    logits = logits.float()
    if banned:
        logits = logits.clone()
        logits[banned] = float("-inf")
    if sp.temperature <= 0.0:
        logp = torch.log_softmax(logits, dim=-1)
        tok = int(torch.argmax(logits))
        return tok, float(logp[tok])
    logp = torch.log_softmax(logits / sp.temperature, dim=-1)
    probs = logp.exp()
    keep = torch.ones_like(probs, dtype=torch.bool)
    if sp.top_k is not None and 0 < sp.top_k < probs.numel():
        kth = torch.topk(probs, sp.top_k).values[-1]
        keep &= probs >= kth
    if sp.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=0)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop_sorted = (cum - sorted_p) >= sp.top_p
        drop = torch.zeros_like(keep)
        drop[order] = drop_sorted
        keep &= ~drop
    if sp.min_p > 0.0:
        keep &= probs >= sp.min_p * probs.max()
    p = torch.where(keep, probs, torch.zeros_like(probs))
    tok = int(torch.multinomial(p / p.sum(), 1, generator=gen))
    return tok, float(logp[tok])


# --------------------------------------------------------------------------------------------------
# requests


@dataclass
class Seq:
    """One output sequence (a request with n > 1 becomes n of these)."""

    rid: str
    prompt: list[int]
    sp: Sampling
    on_done: Callable[["Seq"], None]
    gen: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    cache: Any = None
    finish: dict | None = None
    created: float = field(default_factory=time.time)
    pin: Any = None  # engine/replay.py Pin: the weight version of each output token (replay)


class EngineError(RunFailure, RuntimeError):
    pass


class Scheduler:
    """Owns the model; see the module docstring. Thread-safe entry points: submit, command."""

    def __init__(self, model, *, weight_version: str = "default", eos_ids=(), tokenizer=None,
                 max_context: int | None = None, version_log: str | None = None, seed: int = 0,
                 max_running: int = 256, max_batch: int = 64):
        self.model = model
        self.weight_version = str(weight_version)
        self.eos_ids = set(int(e) for e in eos_ids)
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.max_running = max_running
        self.max_batch = max_batch
        self.global_gen = torch.Generator().manual_seed(seed)
        self._incoming: "queue.Queue[Seq]" = queue.Queue()
        self._commands: "queue.Queue[tuple]" = queue.Queue()
        self._wake = threading.Event()
        self.waiting: list[Seq] = []
        self.running: list[Seq] = []
        self._admitting: list[Seq] = []  # taken from ``waiting`` for this step's prefill
        self.paused = False
        self.pause_mode: str | None = None
        self.step_count = 0
        self.tokens_generated = 0
        self.step_delay_s = 0.0  # test hook ("slow" fault): sleep after each decode step
        self.store = None  # engine/replay.py VersionStore (--keep-weight-versions): older versions kept
        self._forked = False  # the served model is a copy that an update in progress writes into
        self._stop = False
        self._log_lock = threading.Lock()
        self._log_f = open(version_log, "a", buffering=1) if version_log else None
        self.recent_log: list[dict] = []  # last records, served at /debug/version_log
        self.thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)

    # ---- thread-safe API
    def start(self):
        self.thread.start()

    def stop(self):
        self._stop = True
        self._wake.set()

    def submit(self, seq: Seq):
        self._incoming.put(seq)
        self._wake.set()

    def command(self, name: str, *args) -> Any:
        """Run a control command on the scheduler thread between steps; blocks until applied."""
        done = threading.Event()
        box: dict = {}
        self._commands.put((name, args, done, box))
        self._wake.set()
        if not done.wait(timeout=600):
            raise EngineError(f"scheduler did not apply command {name!r} within 600 s")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    # ---- commands (scheduler thread)
    def _cmd_abort(self, rid: str | None, message: str = "Abort request", status_code: int = 200):
        n = 0
        for lst in (self.running, self.waiting):
            keep = []
            for s in lst:
                if rid is None or s.rid == rid:
                    self._finish(s, {"type": "abort", "message": message, "status_code": status_code,
                                     "err_type": None})
                    n += 1
                else:
                    keep.append(s)
            lst[:] = keep
        return n

    def _cmd_pause(self, mode: str):
        """abort: end running and queued requests (partial output); retract: running requests drop their
        KV caches and go back to the queue (recomputed from prompt + output on continue); in_place: they
        keep their KV caches and wait."""
        n = 0
        if mode == "abort":
            n = self._cmd_abort(None, "Abort in pause_generation")
        elif mode == "retract":
            for s in self.running:
                s.cache = None
            self.waiting[:0] = self.running
            self.running = []
        self.paused = True
        self.pause_mode = mode
        return n

    def _cmd_continue(self):
        self.paused = False
        self.pause_mode = None
        return 0

    def _flush_blocked(self) -> str | None:
        """Why a cache flush cannot run now (None: it can): requests holding KV caches block it."""
        if self.running:
            how = f" (paused with mode {self.pause_mode})" if self.paused else ""
            return (f"{len(self.running)} request(s) still running{how}: the cache cannot be flushed; pause "
                    "with mode 'abort' or 'retract' before a flush, or send flush_cache=false")
        return None

    def _cmd_swap(self, model, version: str | None, abort_all: bool, flush: bool = False):
        n = self._cmd_abort(None, "Abort for weight update") if abort_all else 0
        self.model = model
        self._forked = True
        return self._after_update(n, version, flush)

    def _after_update(self, n_aborted: int, version: str | None, flush: bool) -> tuple[int, str | None]:
        """Weights are loaded; flush the cache if asked. A flush that cannot run fails the update (the
        weights stay loaded, the version is not changed), as in SGLang."""
        why = self._flush_blocked() if flush else None
        if why is None and version is not None:
            self.weight_version = str(version)
            if self.store is not None:  # the update's copy is this version from now on
                self.store.add(self.weight_version, self.model)
                self._forked = False
        return n_aborted, why

    def _cmd_load(self, named_tensors: list, version: str | None, abort_all: bool, flush: bool = False):
        """Copy received tensors into the served model in place, between steps (the distributed update:
        one bucket per call, so no whole-model copy per bucket). Returns (aborted, flush failure)."""
        n = self._cmd_abort(None, "Abort for weight update") if abort_all else 0
        if self.store is not None and not self._forked:
            self.model = self.store.fork(self.model)  # the held versions stay as they were
            self._forked = True
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in named_tensors:
                params[name].copy_(t)
        return self._after_update(n, version, flush)

    def _cmd_set_version(self, version: str, abort_all: bool):
        n = self._cmd_abort(None, "Abort for weight version update") if abort_all else 0
        self.weight_version = str(version)
        return n

    def _cmd_flush(self):
        why = self._flush_blocked()  # no prefix cache to drop, but the same refusal as SGLang's
        if why is not None:
            raise EngineError(why)
        return 0

    # ---- internals
    def _finish(self, s: Seq, reason: dict):
        s.finish = reason
        s.cache = None
        rec = {"rid": s.rid, "prompt_len": len(s.prompt), "output_ids": s.output, "versions": s.versions,
               "finish": reason.get("type"), "t": time.time()}
        with self._log_lock:
            if self._log_f is not None:
                self._log_f.write(json.dumps(rec) + "\n")
            self.recent_log.append(rec)
            if len(self.recent_log) > 10000:
                del self.recent_log[:5000]
        try:
            s.on_done(s)
        except Exception:  # a dead HTTP waiter must not kill the scheduler (logged)
            log.exception("on_done callback failed for %s", s.rid)

    def _check_stop(self, s: Seq, tok: int) -> dict | None:
        n = len(s.output)
        if n >= s.sp.min_new_tokens:
            if tok in s.sp.stop_token_ids:
                return {"type": "stop", "matched": tok}
            if not s.sp.ignore_eos and tok in self.eos_ids:
                return {"type": "stop", "matched": tok}
            if s.sp.stop and self.tokenizer is not None:
                tail = self.tokenizer.decode(s.output[-64:], skip_special_tokens=s.sp.skip_special_tokens)
                for st in s.sp.stop:
                    if st and tail.endswith(st):
                        return {"type": "stop", "matched": st}
        if n >= s.sp.max_new_tokens:
            return {"type": "length", "length": n}
        if self.max_context is not None and len(s.prompt) + n >= self.max_context:
            return {"type": "length", "length": n}
        return None

    def _banned(self, s: Seq) -> list[int] | None:
        if len(s.output) < s.sp.min_new_tokens:
            ban = set(s.sp.stop_token_ids)
            if not s.sp.ignore_eos:
                ban |= self.eos_ids
            return sorted(ban) or None
        return None

    def _emit(self, s: Seq, logits: torch.Tensor) -> bool:
        gen = s.gen if s.gen is not None else self.global_gen
        tok, lp = sample_token(logits, s.sp, gen, self._banned(s))
        s.output.append(tok)
        s.logprobs.append(lp)
        s.versions.append(self.weight_version if s.pin is None else s.pin.version_at(len(s.versions)))
        self.tokens_generated += 1
        reason = self._check_stop(s, tok)
        if reason is not None:
            self._finish(s, reason)
            return True
        return False

    @staticmethod
    def _kv_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    @torch.inference_mode()
    def _prefill_batch(self, seqs: list[Seq]) -> list[tuple[Seq, bool]]:
        """Prefill newly admitted sequences: prompts of equal length share one forward pass (no padding,
        so the result is the same as one pass each); a retracted sequence is prefilled with its prompt
        and its output so far. Returns (seq, finished) pairs."""
        from transformers import DynamicCache

        by_len: dict[int, list[Seq]] = {}
        for s in seqs:
            by_len.setdefault(len(s.prompt) + len(s.output), []).append(s)

        def forward(chunk):
            ids = torch.tensor([s.prompt + s.output for s in chunk], dtype=torch.long)
            out = self._model_for(chunk)(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
            kv = self._kv_of(out.past_key_values)
            return [([(K[b:b + 1].clone(), V[b:b + 1].clone()) for K, V in kv], out.logits[b, -1])
                    for b in range(len(chunk))]

        out_pairs = []
        for group in by_len.values():
            for i in range(0, len(group), self.max_batch):
                out_pairs += self._isolated(group[i:i + self.max_batch], forward)
        return out_pairs

    def _fail(self, s: Seq, e: BaseException):
        log.error("request %s failed inside the engine: %s: %s", s.rid, type(e).__name__, e)
        self._finish(s, {"type": "abort", "message": f"engine error: {type(e).__name__}: {str(e)[:300]}",
                         "status_code": 500, "err_type": "InternalServerError"})

    def _isolated(self, chunk: list[Seq], forward) -> list[tuple[Seq, bool]]:
        """Run ``forward(chunk) -> [(new cache, last logits)]`` (no side effects) and emit a token for each
        sequence. A failing batched forward is retried one sequence at a time, so a failure ends exactly
        the sequences it belongs to (with an error reply); the others go on."""
        try:
            res = forward(chunk)
        except Exception as e:  # noqa: BLE001
            if len(chunk) > 1:
                return [pair for s in chunk for pair in self._isolated([s], forward)]
            self._fail(chunk[0], e)
            return [(chunk[0], True)]
        pairs = []
        for s, (cache, logits) in zip(chunk, res):
            try:
                s.cache = cache
                pairs.append((s, self._emit(s, logits)))
            except Exception as e:  # noqa: BLE001 - e.g. sampling from non-finite logits
                self._fail(s, e)
                pairs.append((s, True))
        return pairs

    @torch.inference_mode()
    def _decode_batch(self, seqs: list[Seq]) -> list[bool]:
        """One decode step for all ``seqs`` together (see ``_decode_forward``); a failure ends only the
        sequences it belongs to."""
        return [fin for _, fin in self._isolated(seqs, self._decode_forward)]

    def _decode_forward(self, seqs: list[Seq]) -> list[tuple[list, torch.Tensor]]:
        """Their per-sequence KV caches are left-padded into one batch (pads masked out), positions are
        each sequence's true positions; returns each one's new cache and last logits."""
        from transformers import DynamicCache

        B = len(seqs)
        lens = [s.cache[0][0].shape[2] for s in seqs]
        Lmax = max(lens)
        cache = DynamicCache()
        for li in range(len(seqs[0].cache)):
            k0, v0 = seqs[0].cache[li]
            K = k0.new_zeros((B, k0.shape[1], Lmax, k0.shape[3]))
            V = v0.new_zeros((B, v0.shape[1], Lmax, v0.shape[3]))
            for b, s in enumerate(seqs):
                k, v = s.cache[li]
                K[b, :, Lmax - lens[b]:] = k[0]
                V[b, :, Lmax - lens[b]:] = v[0]
            cache.update(K, V, li)
        mask = torch.ones((B, Lmax + 1), dtype=torch.long)
        for b, L in enumerate(lens):
            mask[b, :Lmax - L] = 0
        ids = torch.tensor([[s.output[-1]] for s in seqs], dtype=torch.long)
        pos = torch.tensor([[L] for L in lens], dtype=torch.long)
        out = self._model_for(seqs)(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, cache_position=torch.tensor([Lmax], dtype=torch.long))
        kv = self._kv_of(out.past_key_values)
        return [([(K[b:b + 1, :, Lmax - lens[b]:].clone(), V[b:b + 1, :, Lmax - lens[b]:].clone()) for K, V in kv],
                 out.logits[b, -1]) for b in range(B)]

    def _model_for(self, seqs: list[Seq]):
        """The weights of a forward pass over ``seqs``: the served model, or, for a pinned sequence (replay,
        engine/replay.py; one sequence per pass), the held version named for the token it generates next."""
        if seqs[0].pin is None:
            return self.model
        if len(seqs) != 1:
            raise EngineError("a pinned (replay) sequence is forwarded alone (--enable-deterministic-inference)")
        return self.store.get(seqs[0].pin.version_at(len(seqs[0].output)))

    @torch.inference_mode()
    def _apply_commands(self):
        while True:
            try:
                name, args, done, box = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                box["result"] = getattr(self, f"_cmd_{name}")(*args)
            except Exception as e:  # noqa: BLE001
                box["error"] = e
            done.set()

    def _loop(self):
        while not self._stop:
            try:
                self._apply_commands()
                while True:
                    try:
                        self.waiting.append(self._incoming.get_nowait())
                    except queue.Empty:
                        break
                if not self.paused:
                    admit = self._admitting
                    while self.waiting and len(self.running) + len(admit) < self.max_running:
                        admit.append(self.waiting.pop(0))
                    self.running += [s for s, fin in self._prefill_batch(admit) if not fin]
                    admit.clear()
                    still = []
                    for i in range(0, len(self.running), self.max_batch):
                        chunk = self.running[i:i + self.max_batch]
                        still += [s for s, fin in zip(chunk, self._decode_batch(chunk)) if not fin]
                    self.running = still
                    self.step_count += 1
                    if self.step_delay_s and self.running:
                        time.sleep(self.step_delay_s)
                if self.paused or not (self.running or self.waiting):
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
            except Exception as e:  # outside any one request (logged): fail those in the engine, keep serving
                log.exception("scheduler step failed")
                for s in self._admitting + self.running + self.waiting:
                    if s.finish is None:
                        self._fail(s, e)
                self._admitting, self.running, self.waiting = [], [], []
        if self._log_f is not None:
            self._log_f.close()
