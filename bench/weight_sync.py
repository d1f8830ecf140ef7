"""Weight sync: pushing the trainer's weights to a rollout engine, next to a plain copy / broadcast of
the same bytes, measured side by side in one run.

    python -m bench.weight_sync [--layers 8] [--hidden 1024] [--reps 3]

A Qwen2-shaped model (random weights, built locally) lives in a Megatron GPTModel in this process and
in one rollout engine (the CPU engine here; SGLang on a GPU node speaks the same API). Two transports:

* disk: export the Megatron weights to an HF safetensors dir (megatron_a3po.convert.save_hf_checkpoint)
  + ``POST /update_weights_from_disk`` (the engine reads and loads them). Baseline: ``shutil.copyfile``
  of the same safetensors files (same disk, page cache warm, no fsync on either side).
* distributed: ``NcclTransport`` (gloo on CPU, NCCL on GPU) broadcasting bucketed HF tensors straight
  from the streaming export into the engine, which loads them. Baseline: a raw ``dist.broadcast`` of the
  same bytes in flat buffers of the same bucket size, between this process and a receiver process in a
  group made the same way.

"x of baseline" is baseline seconds / our seconds: 1.0 means as fast as moving the bytes, nothing more.
Prints a table, saves bench/results/weight_sync.json.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine, parse_args, save_result


def _build(root: Path, layers: int, hidden: int, vocab: int):
    from megatron_a3po.models.tiny import build_char_tokenizer, save_tiny_hf_model

    tok = build_char_tokenizer("0123456789+-=* abcdefghijklmnopqrstuvwxyz")
    d = save_tiny_hf_model(root / "hf", "qwen2", seed=0, tokenizer=tok, hidden_size=hidden,
                           intermediate_size=int(hidden * 2.75) // 64 * 64, num_hidden_layers=layers,
                           num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 512),
                           vocab_size=vocab, max_position_embeddings=256, randomize_norms=False)
    return str(d)


def _receiver(master: str, port: int, sizes: list[int], q):
    from megatron_a3po.platform.stores import init_update_group
    import torch.distributed as dist

    g = init_update_group(master, port, 1, 2, "bench_raw", "gloo")
    for n in sizes:
        dist.broadcast(torch.empty(n, dtype=torch.uint8), src=0, group=g)
    dist.broadcast(torch.ones(1), src=1, group=g)  # ack: everything arrived
    q.put("ok")


def raw_broadcast(sizes: list[int], reps: int) -> float:
    """Median seconds to broadcast flat uint8 buffers of ``sizes`` bytes to one receiver process."""
    import torch.distributed as dist

    from megatron_a3po.platform.procs import free_port
    from megatron_a3po.platform.stores import init_update_group

    ctx = mp.get_context("spawn")
    times = []
    for _ in range(reps):
        port, q = free_port(), ctx.Queue()
        p = ctx.Process(target=_receiver, args=("127.0.0.1", port, sizes, q))
        p.start()
        g = init_update_group("127.0.0.1", port, 0, 2, "bench_raw", "gloo")
        bufs = [torch.full((n,), 7, dtype=torch.uint8) for n in sizes]
        t0 = time.perf_counter()
        for b in bufs:
            dist.broadcast(b, src=0, group=g)
        dist.broadcast(torch.zeros(1), src=1, group=g)
        times.append(time.perf_counter() - t0)
        q.get(timeout=60)
        p.join(60)
        dist.destroy_process_group(g)
    return statistics.median(times)


def plain_copy(src: Path, dst: Path, reps: int) -> float:
    times = []
    for r in range(reps):
        out = dst / f"copy{r}"
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        for f in sorted(src.glob("*.safetensors")):
            shutil.copyfile(f, out / f.name)
        times.append(time.perf_counter() - t0)
        shutil.rmtree(out)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv, __doc__.split("\n\n")[0], layers=8, hidden=1024, vocab=32000, bucket_mb=64, reps=3)

    import httpx
    from transformers import AutoConfig

    from megatron_a3po.convert import export_hf_weights, load_hf_into_model, save_hf_checkpoint
    from megatron_a3po.engine.launch import launch_engine
    from megatron_a3po.models import build_model
    from megatron_a3po.platform import init_distributed
    from megatron_a3po.platform.procs import free_port
    from megatron_a3po.rollout import NcclTransport
    from megatron_a3po.rollout.fleet import Fleet

    bucket = args.bucket_mb << 20
    work = Path(tempfile.mkdtemp(prefix="a3po-wsync-bench-"))
    eng = None
    try:
        hf = _build(work, args.layers, args.hidden, args.vocab)
        cfg = AutoConfig.from_pretrained(hf)
        for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                         LOCAL_RANK="0").items():
            os.environ.setdefault(k, v)
        init_distributed(tp=1, pp=1)
        model = build_model(cfg)
        load_hf_into_model([model], hf, cfg)
        sizes = [t.numel() * t.element_size() for b in export_hf_weights([model], cfg, bucket) for _, t in b]
        nbytes = sum(sizes)
        eng = launch_engine(hf, threads=1)

        # ---------------------------------------------------------------- disk
        write_s, load_s = [], []
        for r in range(args.reps):
            wdir = work / f"w{r}"
            t0 = time.perf_counter()
            save_hf_checkpoint([model], cfg, wdir, bucket_bytes=bucket)
            t1 = time.perf_counter()
            resp = httpx.post(f"{eng.url}/update_weights_from_disk", timeout=600,
                              json={"model_path": str(wdir), "weight_version": str(r + 1), "flush_cache": True})
            load_s.append(time.perf_counter() - t1)
            write_s.append(t1 - t0)
            if resp.status_code != 200 or not resp.json().get("success", False):
                raise RuntimeError(f"update_weights_from_disk failed: {resp.text}")
        copy_s = plain_copy(work / "w0", work / "copies", args.reps)
        for r in range(1, args.reps):
            shutil.rmtree(work / f"w{r}", ignore_errors=True)

        # ---------------------------------------------------------------- distributed
        flat = []  # bucket-sized flat buffers: the raw baseline moves the same bytes in the same chunks
        cur = 0
        for n in sizes:
            if cur and cur + n > bucket:
                flat.append(cur)
                cur = 0
            cur += n
        flat.append(cur)
        raw_s = raw_broadcast(flat, args.reps)

        async def dist_push():
            fleet = Fleet([eng.url])
            await fleet.start()
            tr = NcclTransport("127.0.0.1", free_port(), backend="gloo", bucket_bytes=bucket, group_name="bench_w")
            await tr.init(fleet)
            push_s, push_pre_s = [], []
            try:
                for r in range(args.reps):
                    t0 = time.perf_counter()
                    named = ((n, t) for b in export_hf_weights([model], cfg, bucket) for n, t in b)
                    await tr.push(fleet, 100 + r, named_tensors=named)
                    push_s.append(time.perf_counter() - t0)
                pre = [(n, t.clone()) for b in export_hf_weights([model], cfg, bucket) for n, t in b]
                for r in range(args.reps):
                    t0 = time.perf_counter()
                    await tr.push(fleet, 200 + r, named_tensors=iter(pre))
                    push_pre_s.append(time.perf_counter() - t0)
            finally:
                await tr.destroy(fleet)
                await fleet.close()
            return statistics.median(push_s), statistics.median(push_pre_s)

        push_s, push_pre_s = asyncio.run(dist_push())
    finally:
        if eng is not None:
            eng.stop()
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    disk_total = med(write_s) + med(load_s)
    rows = [
        ("disk: export + write HF safetensors", med(write_s), copy_s),
        ("disk: engine load (/update_weights_from_disk)", med(load_s), copy_s),
        ("disk: total push", disk_total, copy_s),
        ("gloo broadcast: transport only (tensors ready)", push_pre_s, raw_s),
        ("gloo broadcast: streaming export + transport", push_s, raw_s),
    ]
    res = {"machine": machine(), "model": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
                                            "dtype": "float32"},
           "bytes": nbytes, "tensors": len(sizes), "bucket_bytes": bucket, "reps": args.reps,
           "plain_copy_s": copy_s, "raw_broadcast_s": raw_s,
           "rows": [{"what": w, "seconds": s, "baseline_s": b, "x_of_baseline": b / s, "gb_s": nbytes / s / 1e9}
                    for w, s, b in rows],
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"weight sync on {res['machine']}: {nbytes / 1e6:.0f} MB in {len(sizes)} HF tensors, "
          f"bucket {args.bucket_mb} MB, median of {args.reps}")
    print(f"baselines: plain copy {copy_s:.3f} s ({nbytes / copy_s / 1e9:.2f} GB/s), raw broadcast "
          f"{raw_s:.3f} s ({nbytes / raw_s / 1e9:.2f} GB/s)")
    print("| path | seconds | GB/s | baseline s | x of baseline |")
    print("|---|---:|---:|---:|---:|")
    for r in res["rows"]:
        print(f"| {r['what']} | {r['seconds']:.3f} | {r['gb_s']:.2f} | {r['baseline_s']:.3f} | {r['x_of_baseline']:.2f}x |")
    print(f"saved {save_result('weight_sync', res)}")
    return res


if __name__ == "__main__":
    main()
