"""Data-parallel scaling of the trainer step: DP=1 vs DP=2 on the same global batch.

One fixed batch of prompt groups (bench.e2e's replayed samples) is trained on by one process (DP=1)
and by two processes (DP=2, gloo on CPU, NCCL on GPU), each rank with one intra-op thread. At DP=2
each rank packs only its token-balanced share of every minibatch; Megatron's DDP reduce-scatters the
gradients and the distributed optimizer all-gathers the weights. Reported (median over the timed
steps, after one warm-up step; the step time of a DP run is its slowest rank's):

    speed-up            = step(DP=1) / step(DP=2)        (ideal 2)
    scaling efficiency  = speed-up / 2                   (ideal 1)
    ratio               = step(DP=2) / step(DP=1)        (target <= 0.6)

    python -m bench.scaling [--hidden 512 --layers 4 --batch 8 --steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import machine, save_result


def _worker(rank, world, hf_dir, samples, args):
    import torch
    from transformers import AutoConfig

    from bench.e2e import _recipe
    from megatron_a3po.platform import init_distributed
    from megatron_a3po.trainer.loop import build_actor
    from megatron_a3po.trainer.batch import TrainSample

    torch.set_num_threads(1)
    init_distributed(tp=1, pp=1, seed=0)
    actor = build_actor(_recipe(args.mode, args), AutoConfig.from_pretrained(hf_dir), hf_dir=hf_dir)
    batch = [TrainSample(**s) for s in samples]
    times = []
    for step in range(args.steps + 1):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        actor.train_step(batch, 10 + step, group_size=args.n_samples)
        torch.distributed.barrier()  # the step ends when the slowest rank is done
        if step > 0:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from bench.e2e import add_batch_args

    add_batch_args(ap, layers=4)
    ap.add_argument("--mode", default="loglinear")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per layout (after one warm-up)")
    args = ap.parse_args(argv)

    from bench.e2e import _samples
    from megatron_a3po.models.tiny import save_tiny_hf_model
    from megatron_a3po.platform.procs import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = str(save_tiny_hf_model(Path(tmp) / "m", "qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                                        intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                                        num_attention_heads=8, num_key_value_heads=2,
                                        max_position_embeddings=1024, randomize_norms=False))
        samples = _samples(hf_dir, args, args.vocab)
        env = {"A3PO_THREADS_PER_RANK": "1"}
        raw = {}
        for dp in (1, 2):
            per_rank = run_distributed(_worker, dp, hf_dir, samples, args, timeout=3600, env=env)
            raw[dp] = [max(ts) for ts in zip(*per_rank)]
    med = {dp: statistics.median(v) for dp, v in raw.items()}
    speedup = med[1] / med[2]
    res = {
        "machine": machine(), "args": vars(args),
        "step_s": {"dp1": med[1], "dp2": med[2]}, "speedup": speedup, "efficiency": speedup / 2,
        "ratio_dp2_over_dp1": med[2] / med[1], "tokens_per_step": sum(len(s["prompt_ids"]) + len(s["response_ids"])
                                                                      for s in samples),
        "raw": {f"dp{k}": v for k, v in raw.items()},
    }
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Trainer step, DP=1 vs DP=2 (same global batch) - {res['machine']}")
    for c in ("layout", "step time (median)", "speed-up", "scaling efficiency"):
        t.add_column(c, justify="right")
    t.add_row("DP=1", f"{med[1]:.3f} s", "1.00x", "-")
    t.add_row("DP=2", f"{med[2]:.3f} s", f"{speedup:.2f}x", f"{speedup / 2:.2f}")
    Console().print(t)
    print(f"saved {save_result('scaling', res)}")
    return res


if __name__ == "__main__":
    main()
