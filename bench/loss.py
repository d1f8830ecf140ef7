"""Loss-kernel benchmarks.

(b) ``python -m bench.loss``: per-token log-prob + entropy, forward + backward, at T tokens x V vocab
    (default 4096 x 151936; fp32 logits on CPU, bf16 on GPU), three/four ways:
      ours      megatron_a3po.ops.vocab_parallel_logprobs_entropy (one fused autograd function)
      naive     log_softmax over the full vocab + gather + entropy from the same log_softmax
      mcore_ce  megatron.core.tensor_parallel.vocab_parallel_cross_entropy alone (no entropy)
      mcore_ce+H Megatron CE on a clone of the logits (its forward modifies fp32 input in place, so RL
                trainers clone) plus a separate entropy (logsumexp - sum softmax * z)
    Each variant runs in a fresh subprocess. Then, because a shared machine's speed drifts by tens of
    percent within a minute, ours and mcore_ce are also timed PAIRED: one process, alternating order,
    each repetition timing both on fresh copies of the same logits; the time ratio reported against the
    target is the median of the per-pair ratios. Peak memory on CPU = RSS high-water (Linux VmHWM, reset
    after the logits are allocated) minus RSS at that point; on GPU = torch.cuda.max_memory_allocated
    minus the allocation before the call. Both include the [T, V] logits gradient.
(a) ``python -m bench.loss --part a``: cost of the proximal log-probs: one recompute forward pass of a
    2-layer Megatron GPTModel (project model builder) vs ``approximate_prox_logp`` on the same batch
    (see :func:`bench_prox_cost`).

Results: a rich table on stdout and JSON in bench/results/loss.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS as _RESULTS_DIR, machine
from megatron_a3po.platform.procs import free_port

RESULTS = _RESULTS_DIR / "loss.json"
VARIANTS = ("ours", "naive", "mcore_ce", "mcore_ce+H")


# ------------------------------------------------------------------------------------------ helpers

def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:   # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")


def _rss_peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found")


def _init_megatron_tp1(dev):
    """World-size-1 process group + Megatron parallel state (Megatron's CE needs a TP group)."""
    import datetime

    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_a3po.platform.stores import init_default_group

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        init_default_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


# ------------------------------------------------------------------------------------------ part (b)

def _variant_fn(name, chunk):
    import torch

    def ours(x, labels):
        from megatron_a3po.ops import vocab_parallel_logprobs_entropy

        return vocab_parallel_logprobs_entropy(x, labels, chunk_size=chunk)

    def naive(x, labels):
        logsm = torch.log_softmax(x.float(), dim=-1)
        logp = logsm.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        ent = -(logsm.exp() * logsm).sum(-1)
        return logp, ent

    def mcore_ce(x, labels):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        return -vocab_parallel_cross_entropy(x, labels), None

    def mcore_ce_h(x, labels):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logp = -vocab_parallel_cross_entropy(x.clone(), labels)
        z = x.float()
        ent = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
        return logp, ent

    return {"ours": ours, "naive": naive, "mcore_ce": mcore_ce, "mcore_ce+H": mcore_ce_h}[name]


def run_variant(name: str, tokens: int, vocab: int, reps: int, chunk: int | None = None) -> dict:
    """One variant in THIS process: returns seconds per fwd+bwd (median) and peak extra bytes."""
    import torch

    dev = _device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if name.startswith("mcore"):
        _init_megatron_tp1(dev)
    from megatron_a3po.ops.logprobs import default_chunk_size

    chunk = chunk or default_chunk_size(dev, vocab)
    fn = _variant_fn(name, chunk)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens, vocab, generator=g, device=dev, dtype=torch.float32).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=dev)
    times = []
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
        _reset_rss_peak()
    for _ in range(reps):
        x.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logp, ent = fn(x, labels)
        out = logp.sum() if ent is None else logp.sum() + ent.sum()
        out.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del logp, ent, out
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_peak_bytes()) - base
    all_times = list(times)
    times.sort()
    return {"variant": name, "seconds": times[len(times) // 2], "all_seconds": all_times, "peak_extra_bytes": int(peak),
            "device": dev.type, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "vocab": vocab,
            "chunk_size": chunk if name == "ours" else None, "reps": reps}


def bench_kernels(tokens: int, vocab: int, reps: int, threads: int, chunk: int | None = None) -> tuple[list[dict], dict]:
    rows = []
    for name in VARIANTS:
        cmd = [sys.executable, "-m", "bench.loss", "--one", name, "--tokens", str(tokens), "--vocab", str(vocab),
               "--reps", str(reps), "--threads", str(threads)] + (["--chunk", str(chunk)] if chunk else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env,
                             cwd=Path(__file__).resolve().parent.parent)
        if res.returncode != 0:
            raise RuntimeError(f"variant {name} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    cmd = [sys.executable, "-m", "bench.loss", "--paired", "--tokens", str(tokens), "--vocab", str(vocab),
           "--reps", str(max(reps, 5)), "--threads", str(threads)] + (["--chunk", str(chunk)] if chunk else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                         cwd=Path(__file__).resolve().parent.parent)
    if res.returncode != 0:
        raise RuntimeError(f"paired timing failed:\n{res.stderr[-3000:]}")
    paired = json.loads(res.stdout.strip().splitlines()[-1])
    ref_t = {r["variant"]: r["seconds"] for r in rows}
    ref_m = {r["variant"]: r["peak_extra_bytes"] for r in rows}
    for r in rows:
        r["time_vs_mcore_ce"] = r["seconds"] / ref_t["mcore_ce"]
        r["mem_vs_naive"] = r["peak_extra_bytes"] / ref_m["naive"]
        r["mem_vs_mcore_ce+H"] = r["peak_extra_bytes"] / ref_m["mcore_ce+H"]
    return rows, paired


def run_paired(a: str, b: str, tokens: int, vocab: int, reps: int, chunk: int | None = None) -> dict:
    """Time variants ``a`` and ``b`` alternately in THIS process on copies of one logits tensor."""
    import torch

    dev = _device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if a.startswith("mcore") or b.startswith("mcore"):
        _init_megatron_tp1(dev)
    from megatron_a3po.ops.logprobs import default_chunk_size

    chunk = chunk or default_chunk_size(dev, vocab)
    g = torch.Generator(device=dev).manual_seed(0)
    base = torch.randn(tokens, vocab, generator=g, device=dev, dtype=torch.float32).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=dev)
    fns = {a: _variant_fn(a, chunk), b: _variant_fn(b, chunk)}
    times = {a: [], b: []}
    for i in range(reps + 1):  # the first pair warms up (allocator, thread pool) and is dropped
        for name in ((a, b) if i % 2 == 0 else (b, a)):
            x = base.clone().requires_grad_(True)  # mcore CE overwrites its input: a fresh copy each time
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logp, ent = fns[name](x, labels)
            (logp.sum() if ent is None else logp.sum() + ent.sum()).backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times[name].append(time.perf_counter() - t0)
            del x, logp, ent
    ratios = sorted(ta / tb for ta, tb in zip(times[a], times[b]))
    return {"a": a, "b": b, "seconds": {k: sorted(v)[len(v) // 2] for k, v in times.items()},
            "all_seconds": times, "ratio_median": ratios[len(ratios) // 2], "ratios": ratios, "reps": reps}


# ------------------------------------------------------------------------------------------ part (a)

def bench_prox_cost(batch: int = 4, seq: int = 512, hidden: int = 256, layers: int = 2, vocab: int = 32000,
                    reps: int = 3) -> dict:
    """PART (a): proximal log-prob cost, recompute vs A-3PO's approximation, on the same batch.

    recompute = one forward-only pass of a ``layers``-layer Megatron GPTModel built by
    ``megatron_a3po.models.build_model`` from a small Qwen2 config (on CPU: local layer spec with SDPA core
    attention and the platform's CPU patches) plus log-probs from its logits; approx =
    ``approximate_prox_logp`` (loglinear) on per-token tensors of the same batch. A real policy is far
    larger, so this ratio understates the saving.
    """
    import torch
    from megatron.core import parallel_state as ps

    from megatron_a3po.loss import approximate_prox_logp
    from megatron_a3po.models import build_model
    from megatron_a3po.models.tiny import tiny_hf_config
    from megatron_a3po.ops import vocab_parallel_logprobs_entropy
    from megatron_a3po.platform import init_distributed

    dev = _device()
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                     LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    init_distributed(tp=1, pp=1, seed=0)
    hf_cfg = tiny_hf_config("qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, max_position_embeddings=seq)
    model = build_model(hf_cfg, params_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model.eval()
    g = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g).to(dev)
    pos = torch.arange(seq, device=dev).unsqueeze(0).expand(batch, -1)
    labels = torch.roll(tokens, -1, dims=1)
    tp_group = ps.get_tensor_model_parallel_group()

    def recompute():
        with torch.no_grad():
            logits = model(tokens, pos, attention_mask=None)        # [b, s, V/TP]
            return vocab_parallel_logprobs_entropy(logits, labels, tp_group=tp_group, vocab_size=vocab)[0]

    lb = -torch.rand(batch, seq, generator=g).to(dev)
    lt = lb + 0.1 * torch.randn(batch, seq, generator=g).to(dev)
    versions = torch.randint(0, 5, (batch, seq), generator=g).to(dev)

    def approx():
        return approximate_prox_logp(lb, lt, versions, 5, "loglinear")

    def timed(fn):
        fn()
        ts = []
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    t_rec, t_apx = timed(recompute), timed(approx)
    return {"model": f"megatron_a3po.models.build_model(qwen2, {layers} layers, hidden {hidden})", "batch": batch,
            "seq": seq, "hidden": hidden, "layers": layers, "vocab": vocab, "device": dev.type,
            "recompute_s": t_rec, "approx_s": t_apx, "recompute_over_approx": t_rec / t_apx}


# ------------------------------------------------------------------------------------------ CLI

def _table(rows, prox):
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"log-prob + entropy, fwd+bwd, {rows[0]['tokens']} x {rows[0]['vocab']} {rows[0]['dtype']} "
                    f"on {rows[0]['device']} (ours: chunk {rows[0]['chunk_size']})")
    for col in ("variant", "time (s)", "time / mcore CE", "peak extra (GiB)", "mem / naive", "mem / mcore CE+H"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["variant"], f"{r['seconds']:.3f}", f"{r['time_vs_mcore_ce']:.2f}",
                  f"{r['peak_extra_bytes'] / 2**30:.2f}", f"{r['mem_vs_naive']:.2f}", f"{r['mem_vs_mcore_ce+H']:.2f}")
    Console().print(t)
    if prox:
        Console().print(f"prox cost: recompute {prox['recompute_s'] * 1e3:.1f} ms vs approx "
                        f"{prox['approx_s'] * 1e3:.3f} ms  ->  {prox['recompute_over_approx']:.0f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["a", "b", "ab"], default="ab")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--chunk", type=int, default=None, help="token chunk of ours (default: the op's default_chunk_size)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)   # internal: run one variant, print JSON
    ap.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)  # internal: ours vs mcore_ce paired
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_variant(args.one, args.tokens, args.vocab, args.reps, args.chunk)))
        return
    if args.paired:
        print(json.dumps(run_paired("ours", "mcore_ce", args.tokens, args.vocab, args.reps, args.chunk)))
        return
    rows, paired = (bench_kernels(args.tokens, args.vocab, args.reps, args.threads, args.chunk)
                    if "b" in args.part else ([], None))
    prox = bench_prox_cost() if "a" in args.part else None
    if rows:
        _table(rows, prox)
        print(f"paired timing, ours / mcore CE: median of {paired['reps']} per-pair ratios = "
              f"{paired['ratio_median']:.2f} (pairs: {', '.join(f'{r:.2f}' for r in paired['ratios'])}; "
              f"medians {paired['seconds']['ours']:.2f} s / {paired['seconds']['mcore_ce']:.2f} s)")
    elif prox:
        print(json.dumps(prox, indent=2))
    from megatron_a3po.io import write_json_atomic

    result = json.loads(args.out.read_text()) if args.out.exists() else {}   # keep the part not re-run
    result["machine"] = machine()
    result["host"] = {"threads": args.threads, "torch": torch.__version__}
    if rows:
        result["kernels"] = rows
        result["paired_ours_vs_mcore_ce"] = paired
    if prox:
        result["prox_cost"] = prox
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
