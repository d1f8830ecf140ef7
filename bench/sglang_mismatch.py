"""Training-inference mismatch: for the same tokens and weights, the behaviour log-probs the real SGLang
0.5.23 server returns while sampling, against the log-probs the trainer computes for those tokens (its
Megatron forward and vocab-parallel log-prob kernel, the pass recompute mode runs), in fp32 and bf16.

    python -m bench.sglang_mismatch [--samples 64] [--new-tokens 48] [--hidden 256] [--layers 4]

A Qwen2-shaped model (random weights, built locally) is served by SGLang on this CPU (its environment:
scripts/sglang_env.sh; ``--dtype float32`` / ``bfloat16``), which samples ``--samples`` responses at
temperature 1 to random prompts; the trainer's actor (``model.params_dtype`` float32 / bfloat16, TP 1)
loads the same HF weights and computes the log-prob of every sampled token. Per precision: mean and max
|diff| over response tokens, and the k3 estimate of KL(SGLang || trainer) (``exp(r) - 1 - r`` with
``r = logp_trainer - logp_sglang``, mean over tokens; samples are SGLang's). Prints a table, saves
bench/results/sglang_mismatch.json. Rollout correction (importance weights for this mismatch) builds on
these numbers.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import httpx
import torch

from bench.common import machine, parse_args, save_result


def _model(root: Path, hidden: int, layers: int) -> str:
    from megatron_a3po.models.tiny import build_char_tokenizer, save_tiny_hf_model

    tok = build_char_tokenizer("0123456789+-=* abcdefghijklmnopqrstuvwxyz")
    return str(save_tiny_hf_model(root / "model", "qwen2", seed=0, tokenizer=tok, hidden_size=hidden,
                                  intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=8,
                                  num_key_value_heads=2, max_position_embeddings=512, randomize_norms=True))


def _sample(model_dir: str, dtype: str, prompts: list[list[int]], new_tokens: int, log_dir: Path):
    """SGLang (``--dtype dtype``) samples one response per prompt: [(prompt, response, its log-probs)]."""
    from megatron_a3po.engine.launch import launch_engine

    ep = launch_engine(model_dir, backend="sglang", version="0", log_dir=log_dir, extra_args=["--dtype", dtype])
    try:
        r = httpx.post(f"{ep.url}/generate", timeout=600, json={
            "input_ids": prompts, "return_logprob": True,
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True}})
        r.raise_for_status()
        return [(p, o["output_ids"], [e[0] for e in o["meta_info"]["output_token_logprobs"]])
                for p, o in zip(prompts, r.json())]
    finally:
        ep.stop()


def _trainer_logprobs(model_dir: str, params_dtype: str, samples) -> list[list[float]]:
    """The trainer's log-probs of each sampled response token: its actor (Megatron GPTModel on this CPU,
    loaded from the HF weights) in the forward-only pass of recompute mode."""
    from transformers import AutoConfig

    from megatron_a3po.config import load_recipe
    from megatron_a3po.trainer.batch import TrainSample, collate
    from megatron_a3po.trainer.loop import build_actor

    recipe = load_recipe("demo_cpu", [f"model.params_dtype={params_dtype}", "rollout.temperature=1.0"])
    actor = build_actor(recipe, AutoConfig.from_pretrained(model_dir), hf_dir=model_dir, mcore_dir=None)
    ts = [TrainSample(prompt_ids=p, response_ids=r, behave_logprobs=lp, versions=[0] * len(r), advantage=0.0)
          for p, r, lp in samples]
    out = []
    for i, s in enumerate(ts):
        mb = collate(ts, [i], s.length)
        actor.recompute_logprobs([mb])
        out.append(mb.prox_logp[0][mb.loss_mask[0] > 0].double().tolist())
    return out


def _stats(samples, trainer) -> dict:
    d, k3 = [], []
    for (_, _, lp_s), lp_t in zip(samples, trainer):
        assert len(lp_s) == len(lp_t)
        for a, b in zip(lp_s, lp_t):
            r = b - a
            d.append(abs(r))
            k3.append(math.expm1(r) - r)
    return {"tokens": len(d), "mean_abs_diff": sum(d) / len(d), "max_abs_diff": max(d), "k3_kl": sum(k3) / len(k3)}


def main(argv=None) -> dict:
    args = parse_args(argv, __doc__.splitlines()[0], prog="python -m bench.sglang_mismatch", samples=64,
                      new_tokens=48, prompt_len=16, hidden=256, layers=4, seed=0)

    from megatron_a3po.platform import init_distributed
    from megatron_a3po.platform.procs import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    init_distributed(tp=1, pp=1, seed=args.seed)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = _model(root, args.hidden, args.layers)
        vocab = 40  # the character vocabulary's ordinary tokens (ids 5.. are characters)
        prompts = [(5 + torch.randint(0, vocab, (args.prompt_len,), generator=g)).tolist() for _ in range(args.samples)]
        rows = {}
        for dtype in ("float32", "bfloat16"):
            samples = _sample(model_dir, dtype, prompts, args.new_tokens, root / f"logs-{dtype}")
            rows[dtype] = _stats(samples, _trainer_logprobs(model_dir, dtype, samples))
    res = {"machine": machine(), "sglang": "0.5.23 (CPU, torch_native attention)",
           "model": f"Qwen2-shaped, hidden {args.hidden}, {args.layers} layers, random weights",
           "samples": args.samples, "new_tokens": args.new_tokens, "rows": rows}
    print(f"training-inference mismatch, {res['model']}, {args.samples} x {args.new_tokens} tokens ({res['machine']})")
    print(f"{'precision':<10} {'mean |diff|':>12} {'max |diff|':>12} {'k3 KL':>12}")
    for k, r in rows.items():
        print(f"{k:<10} {r['mean_abs_diff']:>12.3e} {r['max_abs_diff']:>12.3e} {r['k3_kl']:>12.3e}")
    print(save_result("sglang_mismatch", res))
    return res


if __name__ == "__main__":
    main()
