"""Trainer step time, ``recompute`` vs ``loglinear`` (A-3PO), on the same replayed rollouts.

One fixed batch of samples (random prompts/responses with staleness 1-3, behaviour log-probs near the
model's own) is saved once and replayed, so generation noise is out. Two actors start from the same
weights; their steps are interleaved so machine noise hits both alike. Reported:

    ideal saving    = the recompute mode's forward-only pass time (what A-3PO removes)
    measured saving = step time(recompute) - step time(loglinear)
    fraction        = measured / ideal          (target >= 0.95)

    python -m bench.e2e [--hidden 512 --layers 6 --steps 6 --batch 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS, machine


def _recipe(mode, args):
    from megatron_a3po.config import Recipe

    return Recipe.model_validate({
        "name": f"bench_e2e_{mode}",
        "model": {"hf_path": "unused"},
        "trainer": {"mode": mode, "lr": 1e-5, "ppo_n_minibatches": args.minibatches,
                    "max_tokens_per_mb": args.max_tokens_per_mb, "steps": args.steps + 1},
        "rollout": {"n_samples": args.n_samples, "temperature": 1.0},
    })


def _samples(hf_dir, args, vocab):
    """A fixed batch whose behaviour log-probs are the model's own, slightly perturbed, and staleness 1-3."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for k in range(args.batch * args.n_samples):
            P, R = args.prompt_len, args.response_len
            seq = torch.randint(3, vocab, (P + R,), generator=g)
            lp = torch.log_softmax(model(seq[None]).logits[0].float(), -1)
            blp = lp[torch.arange(P - 1, P + R - 1), seq[P:]] + 0.05 * torch.randn(R, generator=g)
            out.append(dict(prompt_ids=seq[:P].tolist(), response_ids=seq[P:].tolist(),
                            behave_logprobs=blp.tolist(),
                            versions=(10 - torch.randint(1, 4, (R,), generator=g)).tolist(),
                            advantage=float(torch.randn((), generator=g))))
    return out


def model_and_batch(tmp, args):
    """A random Qwen2-shaped HF model of the options' size in ``tmp`` and the fixed batch replayed every
    step: (hf_dir, its config, [TrainSample])."""
    from transformers import AutoConfig

    from megatron_a3po.models.tiny import save_tiny_hf_model
    from megatron_a3po.trainer.batch import TrainSample

    hf_dir = save_tiny_hf_model(Path(tmp) / "m", "qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                                intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                                randomize_norms=False)
    return hf_dir, AutoConfig.from_pretrained(hf_dir), [TrainSample(**s) for s in _samples(hf_dir, args, args.vocab)]


def add_batch_args(ap, *, layers: int) -> None:
    """The model and replayed-batch options (shared with bench.scaling)."""
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8, help="prompt groups per step")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=192)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--max-tokens-per-mb", type=int, default=4096)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_batch_args(ap, layers=6)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up)")
    ap.add_argument("--out", default=str(RESULTS / "e2e.json"))
    args = ap.parse_args(argv)

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_a3po.platform.procs import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    from megatron_a3po.platform import init_distributed
    from megatron_a3po.trainer.loop import build_actor

    init_distributed(tp=1, pp=1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, cfg, samples = model_and_batch(tmp, args)
        actors = {m: build_actor(_recipe(m, args), cfg, hf_dir=str(hf_dir)) for m in ("recompute", "loglinear")}
        rows = {m: [] for m in actors}
        for step in range(args.steps + 1):
            for mode, actor in actors.items():
                t0 = time.perf_counter()
                st = actor.train_step(samples, 10 + step, group_size=args.n_samples)
                dt = time.perf_counter() - t0
                if step > 0:  # first step warms up allocators and caches
                    rows[mode].append({"step_s": dt, "prox_s": st["time/prox_logp"]})
    med = {m: statistics.median(r["step_s"] for r in rows[m]) for m in rows}
    ideal = statistics.median(r["prox_s"] for r in rows["recompute"])
    measured = med["recompute"] - med["loglinear"]
    loglin_prox = statistics.median(r["prox_s"] for r in rows["loglinear"])
    res = {
        "machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "out"},  # no machine paths
        "step_s": med, "ideal_saving_s": ideal, "measured_saving_s": measured,
        "saving_fraction_of_ideal": measured / ideal if ideal > 0 else float("nan"),
        "prox_s": {"recompute": ideal, "loglinear": loglin_prox},
        "prox_ratio": ideal / loglin_prox if loglin_prox > 0 else float("inf"),
        "speedup": med["recompute"] / med["loglinear"],
        "tokens_per_step": sum(s.length for s in samples),
        "raw": rows,
    }
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Trainer step, recompute vs loglinear (same replayed batch) - {res['machine']}")
    for c in ("quantity", "recompute", "loglinear (A-3PO)", "ratio / fraction"):
        t.add_column(c, justify="right")
    t.add_row("step time (median)", f"{med['recompute']:.3f} s", f"{med['loglinear']:.3f} s",
              f"{res['speedup']:.3f}x faster")
    t.add_row("proximal log-probs", f"{ideal * 1e3:.1f} ms", f"{loglin_prox * 1e3:.3f} ms", f"{res['prox_ratio']:.0f}x cheaper")
    t.add_row("saving vs ideal", f"ideal {ideal:.3f} s", f"measured {measured:.3f} s",
              f"{res['saving_fraction_of_ideal']:.3f}")
    Console().print(t)
    from megatron_a3po.io import write_json_atomic

    write_json_atomic(args.out, res)
    print(f"saved {args.out}")
    return res


if __name__ == "__main__":
    main()
