"""Checkpoint conversion throughput next to a plain copy of the same safetensors files, in one run.

    python -m bench.convert [--layers 12] [--hidden 1024] [--tp 1] [--pp 1] [--reps 3]

A random Qwen2-shaped HF checkpoint (bf16, a few hundred MB, several shards) is written to a scratch
dir on the same disk; then, page cache warm for every contender:
  * plain copy: ``shutil.copyfile`` + fsync of each safetensors file (median of ``--reps``; both
    converters fsync what they write, so this is the like-for-like baseline),
  * hf-to-mcore and mcore-to-hf through the CLI (python -m tools.convert_ckpt), each timed twice:
    "work" = read + write inside the rank (what scales with the model), and "end to end" = the whole
    command, including starting the rank processes and importing torch + megatron (a fixed cost of
    seconds that a 70B conversion amortises).
The round trip's output is checked bit for bit against the input. Ratios are GB/s over the plain
copy's GB/s (1.0 = as fast as copying the files). Prints a table, saves bench/results/convert.json.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine, parse_args, save_result


def build_hf(out: Path, layers: int, hidden: int, vocab: int) -> Path:
    import torch

    from megatron_a3po.models.tiny import save_tiny_hf_model

    return save_tiny_hf_model(out, "qwen2", seed=0, dtype=torch.bfloat16, randomize_norms=True,
                              hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                              num_hidden_layers=layers, num_attention_heads=hidden // 64,
                              num_key_value_heads=max(1, hidden // 512), vocab_size=vocab,
                              max_position_embeddings=4096, max_shard_size="100MB")


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plain_copy(src: Path, root: Path, reps: int) -> float:
    times = []
    for r in range(reps):
        dst = root / f"copy{r}"
        dst.mkdir()
        t0 = time.perf_counter()
        for f in sorted(src.glob("*.safetensors")):
            shutil.copyfile(f, dst / f.name)
            _fsync(dst / f.name)
        times.append(time.perf_counter() - t0)
        shutil.rmtree(dst)
    return statistics.median(times)


def _warm(d: Path):
    for p in d.rglob("*"):
        if p.is_file():
            p.read_bytes()


def _same_tensors(a: Path, b: Path) -> int:
    import torch

    from megatron_a3po.convert import HFReader

    ra, rb = HFReader(a), HFReader(b)
    if set(ra.weight_map) != set(rb.weight_map):
        raise AssertionError(f"round trip changed the tensor names: {set(ra.weight_map) ^ set(rb.weight_map)}")
    for n in ra.weight_map:
        x, y = ra.get(n), rb.get(n)
        if x.dtype != y.dtype or not torch.equal(x, y):
            raise AssertionError(f"round trip changed {n}")
    return len(ra.weight_map)


def main(argv=None):
    args = parse_args(argv, __doc__.split("\n\n")[0], layers=12, hidden=1024, vocab=32000, tp=1, pp=1, reps=3,
                      workdir=None, helps={"workdir": "scratch dir on the disk to measure (default: a temp dir)"})
    from tools.convert_ckpt.cli import build_parser, hf_to_mcore, mcore_to_hf

    work = Path(tempfile.mkdtemp(prefix="a3po-convert-bench-", dir=args.workdir))
    cli = build_parser()
    try:
        hf = build_hf(work / "hf", args.layers, args.hidden, args.vocab)
        nbytes = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
        _warm(hf)
        copy_s = plain_copy(hf, work, args.reps)
        runs = {"hf-to-mcore": [], "mcore-to-hf": []}
        for r in range(args.reps):
            mc, back = work / f"mc{r}", work / f"back{r}"
            t0 = time.perf_counter()
            a = hf_to_mcore(cli.parse_args(["hf-to-mcore", "--hf", str(hf), "--out", str(mc),
                                            "--tp", str(args.tp), "--pp", str(args.pp)]))
            runs["hf-to-mcore"].append(dict(a, e2e_s=time.perf_counter() - t0))
            _warm(mc)
            t0 = time.perf_counter()
            b = mcore_to_hf(cli.parse_args(["mcore-to-hf", "--mcore", str(mc), "--out", str(back),
                                            "--tp", str(args.tp), "--pp", str(args.pp)]))
            runs["mcore-to-hf"].append(dict(b, e2e_s=time.perf_counter() - t0))
            checked = _same_tensors(hf, back)
            shutil.rmtree(mc)
            shutil.rmtree(back)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gb = nbytes / 1e9
    copy_gbs = gb / copy_s
    rows = []
    for name, rs in runs.items():
        work_s = statistics.median(x["read_s"] + x["write_s"] for x in rs)
        e2e_s = statistics.median(x["e2e_s"] for x in rs)
        rows.append({"what": name, "read_s": statistics.median(x["read_s"] for x in rs),
                     "write_s": statistics.median(x["write_s"] for x in rs), "work_s": work_s, "e2e_s": e2e_s,
                     "work_gb_s": gb / work_s, "e2e_gb_s": gb / e2e_s,
                     "work_x_copy": gb / work_s / copy_gbs, "e2e_x_copy": gb / e2e_s / copy_gbs})
    res = {"machine": machine(), "bytes": nbytes, "tensors": checked, "tp": args.tp, "pp": args.pp,
           "model": {"family": "qwen2", "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
                     "dtype": "bfloat16"},
           "reps": args.reps, "plain_copy_s": copy_s, "plain_copy_gb_s": copy_gbs, "rows": rows,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"conversion on {res['machine']}: {nbytes / 1e6:.0f} MB bf16 safetensors ({checked} tensors, "
          f"round trip bit-identical), TP={args.tp} PP={args.pp}, median of {args.reps}")
    print("| operation | read s | write s | work s | GB/s (work) | x plain copy | end-to-end s | x plain copy (e2e) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| plain copy + fsync (baseline) | | | {copy_s:.2f} | {copy_gbs:.2f} | 1.00x | | |")
    for r in rows:
        print(f"| {r['what']} | {r['read_s']:.2f} | {r['write_s']:.2f} | {r['work_s']:.2f} | {r['work_gb_s']:.2f} | "
              f"{r['work_x_copy']:.2f}x | {r['e2e_s']:.1f} | {r['e2e_x_copy']:.2f}x |")
    print(f"saved {save_result('convert', res)}")
    return res


if __name__ == "__main__":
    main()
